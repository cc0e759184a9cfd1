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


def norm_linear_inputs(rows, dim, n_out, dtype, device, gated=True):
    t = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    return (t(rows, dim), t(rows, dim) if gated else None,
            torch.randn(rows, dim, device=device) if gated else None, 1 + 0.1 * t(dim), t(rows, dim),
            0.1 * t(rows, dim), t(n_out, dim) / dim ** 0.5)


def check_norm_linear(args, out, residual_out, tol):
    x, g, r, nw, shift, scale, w = (a.double() if a is not None else None for a in args)
    ref, ref_r = ak.norm_linear_ref(x, g, r, nw, shift, scale, 1e-5, w)
    assert out.dtype == args[0].dtype and out.shape == ref.shape and residual_out.dtype == torch.float32
    assert rel_err(out, ref) < tol and rel_err(residual_out, ref_r) < 1e-6


def test_norm_linear_reference_is_the_composition():
    x, g, r, nw, shift, scale, w = norm_linear_inputs(3, 24, 10, torch.float64, "cpu")
    out, res = ak.norm_linear(x, g, r, nw, shift, scale, w)
    h, ref_res = ak.add_rmsnorm_modulate(x, r, nw, shift, scale, x_gate=g)
    assert rel_err(out, h @ w.T) < 1e-14 and torch.equal(res, ref_res)
    torch.library.opcheck(torch.ops.aim_kernels.norm_linear.default, (x, g, r, nw, shift, scale, 1e-5, w))
    torch.library.opcheck(torch.ops.aim_kernels.norm_linear.default, (x, None, None, nw, shift, scale, 1e-5, w))
    with pytest.raises(ValueError, match="weight"):
        ak.norm_linear(x, g, r, nw, shift, scale, w[:, :5])


# The interpreter's bf16 tl.dot is wrong (Triton 3.8: a bf16 dot there returns garbage), so bf16 runs on the GPU only.
@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU test covers CUDA)")
@pytest.mark.parametrize("rows,dim,n_out", [(2, 200, 40), (5, 64, 17), (16, 300, 70)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("gated", [True, False])
def test_norm_linear_triton_interpreter(rows, dim, n_out, dtype, tol, gated):
    args = norm_linear_inputs(rows, dim, n_out, dtype, "cpu", gated)
    check_norm_linear(args, *norm.norm_linear_triton(*args[:6], 1e-5, args[6]), tol)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,dim,n_out", [(2, 768, 3352), (16, 1536, 6448), (2, 1024, 16384), (40, 768, 3352)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_norm_linear_cuda(rows, dim, n_out, dtype, tol):
    args = norm_linear_inputs(rows, dim, n_out, dtype, "cuda")
    expected = "triton" if rows <= norm.MAX_NORM_LINEAR_ROWS else "reference"
    assert _ext.backend_for(norm._norm_linear, *args[:6], 1e-5, args[6]) == expected
    check_norm_linear(args, *ak.norm_linear(*args), tol)
