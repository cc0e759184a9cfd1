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
