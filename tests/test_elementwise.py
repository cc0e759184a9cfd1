"""add_bias: the reference against float64, the Triton kernel (interpreter on
CPU, the GPU at the VQ decoder's sizes) against the reference, with poisoned outputs; checks, opcheck,
gradients."""
import pytest
import torch

import aim_kernels as ak
from aim_kernels import _ext, _triton
from aim_kernels import elementwise as ew

needs_triton = pytest.mark.skipif(bool(_triton.reasons()), reason="; ".join(_triton.reasons()))
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU tests cover CUDA)")

# one rounding of a float32 sum to the output dtype
TOL = {torch.float32: 1e-6, torch.bfloat16: 5e-3, torch.float16: 1e-3}


def rel_err(out, ref) -> float:
    ref = ref.double().to(out.device)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err == err, "NaN in output"
    return err


def make(shape, dtype, device="cpu", channels_last=False):
    x = torch.randn(shape, device=device).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def add_bias_float64(x, bias, residual):
    y = x.double() + bias.double().reshape((-1,) + (1,) * (x.dim() - 2))
    return y if residual is None else y + residual.double()


@pytest.fixture
def poisoned(monkeypatch):
    alloc = ew._alloc_like
    monkeypatch.setattr(ew, "_alloc_like", lambda *a, **k: alloc(*a, **k).fill_(float("nan")))


# ---- references and ops ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_bias_op(dtype, channels_last, with_residual):
    x = make((2, 24, 5, 7), dtype, channels_last=channels_last)
    bias = torch.randn(24).to(dtype)
    residual = make((2, 24, 5, 7), dtype, channels_last=channels_last) if with_residual else None
    out = ak.add_bias(x, bias, residual)
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    assert rel_err(out, add_bias_float64(x, bias, residual)) < TOL.get(dtype, 1e-15)


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(channels_last):
    x = make((2, 6, 3, 5), torch.float64, channels_last=channels_last).requires_grad_()
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    residual = make((2, 6, 3, 5), torch.float64, channels_last=channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.aim_kernels.add_bias.default, (x, bias, residual))
    torch.library.opcheck(torch.ops.aim_kernels.add_bias.default, (x, bias, None))


def test_gradcheck():
    x = make((2, 4, 3, 2), torch.float64, channels_last=True).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ak.add_bias, (x, bias, residual))


@pytest.mark.parametrize("call,error,match", [
    (lambda x, b: ak.add_bias(x[0, 0, 0], b[:1]), ValueError, r"\(N, C, \*\)"),
    (lambda x, b: ak.add_bias(x, b[:3]), ValueError, r"bias must have shape \(8\)"),
    (lambda x, b: ak.add_bias(x, b, x[:1]), ValueError, r"residual must have shape \(2, 8, 3, 3\)"),
    (lambda x, b: ak.add_bias(x, b.long()), TypeError, "bias must have dtype"),
])
def test_input_checks(call, error, match):
    x, b = torch.randn(2, 8, 3, 3), torch.randn(8)
    with pytest.raises(error, match=match):
        call(x, b)


def test_not_supported_reasons():
    x, b = torch.randn(2, 8, 4, 4), torch.randn(8)
    assert any("float64" in r for r in ew.add_bias_not_supported_reasons(x.double(), b, None))
    assert any("neither contiguous" in r for r in ew.add_bias_not_supported_reasons(x[:, :, ::2], b, None))
    assert any("strides" in r for r in ew.add_bias_not_supported_reasons(
        x, b, x.to(memory_format=torch.channels_last)))
    if not _triton.reasons(x.device):
        assert ew.add_bias_not_supported_reasons(x, b, x) == []


# ---- Triton, under the interpreter ----------------------------------------------------------------------

@needs_triton
@interpreter_only
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (3, 5, 9, 2), (1, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_bias_triton_interpreter(poisoned, monkeypatch, shape, dtype):
    monkeypatch.setattr(ew, "TILE_ELEMS", 64)  # several programs along both tile axes
    for channels_last in ((False, True) if len(shape) == 4 else (False,)):
        x, r = make(shape, dtype, channels_last=channels_last), make(shape, dtype, channels_last=channels_last)
        bias = torch.randn(shape[1]).to(dtype)
        for residual in (None, r):
            out = ew.add_bias_triton(x, bias, residual)
            assert out.stride() == x.stride()
            assert rel_err(out, add_bias_float64(x, bias, residual)) < TOL[dtype]


# ---- GPU ---------------------------------------------------------------------------------------------

# the decoder's largest maps at batch 64 (channels_last bf16), and odd ones
GPU_SHAPES = [(64, 128, 256, 256), (64, 256, 64, 64), (64, 512, 16, 16), (3, 96, 33, 17), (5, 3, 7, 9)]
GPU_IDS = [("aim_shapes_" if s[0] == 64 else "") + "x".join(map(str, s)) for s in GPU_SHAPES]  # the sanitizer skips aim_shapes


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=GPU_IDS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_add_bias(poisoned, shape, channels_last):
    dtype = torch.bfloat16 if shape[0] == 64 else torch.float32
    x, r = (make(shape, dtype, "cuda", channels_last) for _ in range(2))
    bias = torch.randn(shape[1], device="cuda").to(dtype)
    for residual in (None, r):
        assert _ext.backend_for(ew._add_bias, x, bias, residual) == "triton"
        out = ak.add_bias(x, bias, residual)
        assert out.stride() == x.stride()
        assert rel_err(out, add_bias_float64(x, bias, residual)) < TOL[dtype]
