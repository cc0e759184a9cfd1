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


def check(args, out, residual_out, tol):
    x, r, w, shift, scale = (t.double() if t is not None else None for t in args)
    if shift is None:
        ref, ref_r = ak.add_rmsnorm_ref(x, r, w, 1e-5)
    else:
        ref, ref_r = ak.add_rmsnorm_modulate_ref(x, r, w, shift, scale, 1e-5)
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
    assert _ext.backend_for(norm._add_rmsnorm_modulate, *args, 1e-5) == "triton"
    out, residual_out = ak.add_rmsnorm_modulate(*args, 1e-5)
    check(args, out, residual_out, tol)
    out, residual_out = ak.add_rmsnorm(args[0], args[1], args[2], 1e-5)
    check(args[:3] + (None, None), out, residual_out, tol)


def test_float64_is_not_supported():
    x = torch.randn(2, 8, dtype=torch.float64)
    reasons = norm.add_rmsnorm_modulate_not_supported_reasons(x, None, x[0], None, None, 1e-5)
    assert any("float64" in r for r in reasons)
