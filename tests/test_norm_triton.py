"""The Triton block prologue (add + RMSNorm + adaLN modulate) against the float64 reference."""
import pytest
import torch

import aim_kernels as ak
from aim_kernels import _ext, _triton, norm

needs_triton = pytest.mark.skipif(bool(_triton.reasons()), reason="; ".join(_triton.reasons()))


def rel_err(out, ref) -> float:
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err == err, "NaN in output"
    return err


def inputs(shape, dtype, device, residual=True, modulate=True):
    x = torch.randn(shape, device=device).to(dtype)
    r = torch.randn(shape, device=device) if residual else None
    w = torch.randn(shape[-1], device=device).to(dtype)
    mod = torch.randn(shape[0], 3, shape[-1], device=device).to(dtype) if modulate else None
    return x, r, w, (mod[:, 0] if modulate else None), (mod[:, 1] if modulate else None)


def check(args, out, residual_out, tol, x_gate=None):
    x, r, w, shift, scale, gate = (t.double() if t is not None else None for t in (*args, x_gate))
    if shift is None:
        ref, ref_r = ak.add_rmsnorm_ref(x, r, w, 1e-5, gate)
    else:
        ref, ref_r = ak.add_rmsnorm_modulate_ref(x, r, w, shift, scale, 1e-5, gate)
    assert out.dtype == args[0].dtype and residual_out.dtype == torch.float32
    assert rel_err(out, ref) < tol and rel_err(residual_out, ref_r) < 1e-6


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 768), (1, 1, 130)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("residual,modulate", [(True, True), (False, True), (True, False)])
def test_triton_interpreter(shape, dtype, tol, residual, modulate):
    args = inputs(shape, dtype, "cpu", residual, modulate)
    out, residual_out = norm.add_rmsnorm_modulate_triton(*args, 1e-5)
    check(args, out, residual_out, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 257, 768), (128, 1536), (2, 2048), (5, 7, 33)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_dispatch_uses_triton(shape, dtype, tol):
    args = inputs(shape, dtype, "cuda")
    assert _ext.backend_for(norm._add_rmsnorm_modulate, *args, 1e-5, args[3]) == "triton"
    out, residual_out = ak.add_rmsnorm_modulate(*args, 1e-5, x_gate=args[3])
    check(args, out, residual_out, tol, x_gate=args[3])
    out, residual_out = ak.add_rmsnorm_modulate(*args, 1e-5)
    check(args, out, residual_out, tol)
    out, residual_out = ak.add_rmsnorm(args[0], args[1], args[2], 1e-5)
    check(args[:3] + (None, None), out, residual_out, tol)


def test_float64_is_not_supported():
    x = torch.randn(2, 8, dtype=torch.float64)
    reasons = norm.add_rmsnorm_modulate_not_supported_reasons(x, None, x[0], None, None, 1e-5, None)
    assert any("float64" in r for r in reasons)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("modulate", [True, False])
def test_triton_interpreter_gated_add(modulate):
    x, r, w, shift, scale = inputs((3, 5, 40), torch.float32, "cpu", True, modulate)
    gate = torch.randn(3, 40)
    out, residual_out = norm.add_rmsnorm_modulate_triton(x, r, w, shift, scale, 1e-5, gate)
    check((x, r, w, shift, scale), out, residual_out, 1e-5, x_gate=gate)


def test_gated_add_reference_and_gradients():
    x, r, w = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    gate, shift, scale = (torch.randn(2, 8, dtype=torch.float64) for _ in range(3))
    out, res = ak.add_rmsnorm_modulate(x, r, w, shift, scale, 1e-5, x_gate=gate)
    ref, ref_res = ak.add_rmsnorm_modulate_ref(x * gate[:, None], r, w, shift, scale, 1e-5)
    assert rel_err(out, ref) < 1e-14 and rel_err(res, ref_res) < 1e-14
    leaves = [t.clone().requires_grad_() for t in (x, r, w, shift, scale, gate)]
    assert torch.autograd.gradcheck(lambda a, b, c, d, e, g: ak.add_rmsnorm_modulate(a, b, c, d, e, 1e-5, x_gate=g),
                                    leaves)
    torch.library.opcheck(torch.ops.aim_kernels.add_rmsnorm_modulate.default, (*leaves[:5], 1e-5, leaves[5]))


def gated_inputs(shape, dtype, device, with_z):
    x = torch.randn(shape, device=device).to(dtype)
    z = torch.randn(shape, device=device).to(dtype) if with_z else None
    return x, z, (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)


def check_gated(x, z, w, group_size, out, tol):
    ref = ak.rmsnorm_gated_ref(x.double(), None if z is None else z.double(), w.double(), 1e-5, group_size)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) < tol


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("shape,group_size", [((3, 48), 48), ((2, 5, 40), 10), ((1, 7), 7)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_z", [True, False])
def test_rmsnorm_gated_triton_interpreter(shape, group_size, dtype, tol, with_z):
    x, z, w = gated_inputs(shape, dtype, "cpu", with_z)
    check_gated(x, z, w, group_size, norm.rmsnorm_gated_triton(x, z, w, 1e-5, group_size), tol)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,group_size", [((128, 3072), 3072), ((2, 1536), 1536), ((4, 257, 2048), 1024)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_rmsnorm_gated_cuda_dispatch_uses_triton(shape, group_size, dtype, tol):
    x, z, w = gated_inputs(shape, dtype, "cuda", True)
    assert _ext.backend_for(norm._rmsnorm_gated, x, z, w, 1e-5, group_size) == "triton"
    check_gated(x, z, w, group_size, ak.rmsnorm_gated(x, z, w, 1e-5, group_size), tol)


# ---- deferred normalisation of x (x_mean_sq) -------------------------------------------------------

def test_deferred_norm_reference_and_gradients():
    """x scaled by rsqrt(sum(x_mean_sq) + x_eps) per row before the gated add; gradients reach x_mean_sq."""
    f64 = dict(dtype=torch.float64)
    x, r, w = torch.randn(2, 2, 8, **f64), torch.randn(2, 2, 8, **f64), torch.randn(8, **f64)
    gate, shift, scale = (torch.randn(2, 8, **f64) for _ in range(3))
    mean_sq = torch.rand(2, 2, 3, **f64)
    out, res = ak.add_rmsnorm_modulate(x, r, w, shift, scale, 1e-5, x_gate=gate, x_mean_sq=mean_sq, x_eps=1e-3)
    scaled = x * torch.rsqrt(mean_sq.sum(-1, keepdim=True) + 1e-3)
    ref, ref_res = ak.add_rmsnorm_modulate(scaled, r, w, shift, scale, 1e-5, x_gate=gate)
    assert rel_err(out, ref) < 1e-14 and rel_err(res, ref_res) < 1e-14
    out, _ = ak.add_rmsnorm(x, None, w, 1e-5, x_mean_sq=mean_sq, x_eps=1e-3)
    assert rel_err(out, ak.add_rmsnorm(scaled, None, w, 1e-5)[0]) < 1e-14
    args = [t.requires_grad_() for t in (x, r, w, shift, scale, gate, mean_sq)]
    torch.library.opcheck(torch.ops.aim_kernels.add_rmsnorm_modulate.default,
                          (args[0], args[1], args[2], args[3], args[4], 1e-5, args[5], args[6], 1e-3))
    assert torch.autograd.gradcheck(
        lambda *t: ak.add_rmsnorm_modulate(t[0], t[1], t[2], t[3], t[4], 1e-5, x_gate=t[5], x_mean_sq=t[6],
                                           x_eps=1e-3), args)


def test_deferred_norm_checks():
    x, w = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(ValueError, match=r"x_mean_sq must have shape \(4, \*\)"):
        ak.add_rmsnorm(x, None, w, x_mean_sq=torch.rand(3, 2))
    with pytest.raises(TypeError, match="x_mean_sq must have dtype"):
        ak.add_rmsnorm(x, None, w, x_mean_sq=torch.rand(4, 2).half())


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("modulate", [True, False])
@pytest.mark.parametrize("parts", [1, 24])
def test_triton_interpreter_deferred_norm(modulate, parts):
    x, r, w, shift, scale = inputs((6, 40), torch.float32, "cpu", True, modulate)
    gate, mean_sq = torch.randn(6, 40), torch.rand(6, parts)
    out, residual_out = norm.add_rmsnorm_modulate_triton(x, r, w, shift, scale, 1e-5, gate, mean_sq, 1e-3)
    scaled = x.double() * torch.rsqrt(mean_sq.double().sum(-1, keepdim=True) + 1e-3)
    check((scaled.float(), r, w, shift, scale), out, residual_out, 1e-5, x_gate=gate)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_deferred_norm(dtype, tol):
    args = inputs((128, 1536), dtype, "cuda")
    gate, mean_sq = torch.randn(128, 1536, device="cuda").to(dtype), torch.rand(128, 24, device="cuda")
    assert _ext.backend_for(norm._add_rmsnorm_modulate, *args, 1e-5, gate, mean_sq, 1e-5) == "triton"
    out, residual_out = ak.add_rmsnorm_modulate(*args, 1e-5, x_gate=gate, x_mean_sq=mean_sq)
    x, r, w, shift, scale = (t.double() for t in args)
    ref, ref_r = ak.add_rmsnorm_modulate_ref(x, r, w, shift, scale, 1e-5, gate.double(), mean_sq.double(), 1e-5)
    assert out.dtype == dtype and rel_err(out, ref) < tol and rel_err(residual_out, ref_r) < 1e-6
