"""GroupNorm (+ SiLU): the reference against a float64 computation, the Triton kernels (interpreter on CPU,
the GPU at the VQ decoder's sizes) against the float64 reference, the op's checks and registration."""
import sys

import pytest
import torch
import torch.nn.functional as F

import aim_kernels as ak
from aim_kernels import _ext, _triton

gn = sys.modules["aim_kernels.group_norm"]  # the module (aim_kernels.group_norm is the function)

needs_triton = pytest.mark.skipif(bool(_triton.reasons()), reason="; ".join(_triton.reasons()))
interpreter_only = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test (the GPU tests cover CUDA)")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out, ref) -> float:
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err == err, "NaN in output"
    return err


def naive(x, weight, bias, groups, eps, silu):
    """GroupNorm in float64 from its definition (biased variance over each sample's group)."""
    x = x.double()
    shape = x.shape
    g = x.reshape(shape[0], groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = (g - mean).square().mean(-1, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(shape)
    bshape = (1, -1) + (1,) * (len(shape) - 2)
    if weight is not None:
        y = y * weight.double().reshape(bshape)
    if bias is not None:
        y = y + bias.double().reshape(bshape)
    return y * torch.sigmoid(y) if silu else y


def make(shape, dtype, device="cpu", channels_last=False, affine=True, offset=0.0, std=1.0):
    x = (torch.randn(shape, device=device) * std + offset).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w = (1 + 0.5 * torch.randn(c, device=device)).to(dtype) if affine else None
    b = (0.5 * torch.randn(c, device=device)).to(dtype) if affine else None
    return x, w, b


def expected(x, w, b, groups, eps, silu, ib=None):
    return gn.group_norm_ref(x.double(), None if w is None else w.double(), None if b is None else b.double(),
                             groups, eps, silu, None if ib is None else ib.double())


def channel_bias(x, scale=2.0):
    """A convolution-bias-like input_bias: per channel, large against x's spread."""
    return (scale * torch.randn(x.shape[1], device=x.device)).to(x.dtype)


def with_bias(x, ib):
    return x.double() + ib.double().reshape((-1,) + (1,) * (x.dim() - 2))


# ---- reference and op --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,groups", [((2, 64, 5, 7), 32), ((3, 12, 9), 4), ((2, 6, 3, 4, 5), 3), ((4, 16), 8)])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_reference_matches_float64_definition(shape, groups, silu, affine):
    x, w, b = make(shape, torch.float64, affine=affine, offset=3.0)
    assert rel_err(gn.group_norm_ref(x, w, b, groups, 1e-6, silu), naive(x, w, b, groups, 1e-6, silu)) < 1e-12
    ib = channel_bias(x)
    assert rel_err(gn.group_norm_ref(x, w, b, groups, 1e-6, silu, ib),
                   naive(with_bias(x, ib), w, b, groups, 1e-6, silu)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_op_dtype_layout_and_accuracy(dtype, channels_last):
    """The op (CPU: the reference) keeps x's dtype and strides, and computes in float32."""
    x, w, b = make((2, 64, 7, 6), dtype, channels_last=channels_last)
    out = ak.group_norm(x, w, b, 32, 1e-6, silu=True)
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    assert rel_err(out, naive(x, w, b, 32, 1e-6, True)) < TOL[dtype]


def test_op_matches_torch_modules():
    """Drop-in for nn.GroupNorm followed by nn.SiLU (float64, both layouts)."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 64, 5, 9, dtype=torch.float64)
    for t in (x, x.to(memory_format=torch.channels_last)):
        out = ak.group_norm(t, norm.weight, norm.bias, 32, 1e-6, silu=True)
        assert rel_err(out, F.silu(norm(t))) < 1e-13


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(channels_last, affine):
    x, w, b = make((2, 8, 3, 5), torch.float64, channels_last=channels_last, affine=affine)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, w, b)]
    ib = channel_bias(x).requires_grad_()
    torch.library.opcheck(torch.ops.aim_kernels.group_norm.default, (*leaves, 4, 1e-5, True, None))
    torch.library.opcheck(torch.ops.aim_kernels.group_norm.default, (*leaves, 4, 1e-5, True, ib))
    torch.library.opcheck(torch.ops.aim_kernels.group_norm.default, (x.detach(), w, b, 2, 1e-5, False, None))


def test_gradcheck():
    x, w, b = make((2, 4, 2, 3), torch.float64, channels_last=True)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *t: ak.group_norm(*t, 2, 1e-5, True), leaves)
    ib = channel_bias(x).requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, ib_: ak.group_norm(x_, None, None, 2, 1e-5, True, ib_), (leaves[0], ib))
    assert torch.autograd.gradcheck(lambda t: ak.group_norm(t, None, None, 2, 1e-5, False), leaves[:1])


@pytest.mark.parametrize("args,error,match", [
    (lambda x, w: (x[0, 0, 0], w, w, 4), ValueError, r"\(N, C, \*\)"),
    (lambda x, w: (x, w, w, 3), ValueError, "dividing the 8 channels"),
    (lambda x, w: (x, w, w, True), ValueError, "num_groups"),
    (lambda x, w: (x, w[:4], w, 4), ValueError, r"weight must have shape \(8\)"),
    (lambda x, w: (x, w, w.long(), 4), TypeError, "bias must have dtype"),
    (lambda x, w: (x.int(), w, w, 4), TypeError, "x must have dtype"),
    (lambda x, w: (x, w, w, 4, 1e-5, False, w[:3]), ValueError, r"input_bias must have shape \(8\)"),
])
def test_input_checks(args, error, match):
    x, w, _ = make((2, 8, 3, 3), torch.float32)
    with pytest.raises(error, match=match):
        ak.group_norm(*args(x, w))


def test_not_supported_reasons():
    x, w, b = make((2, 8, 4, 4), torch.float32)
    assert any("float64" in r for r in gn.group_norm_not_supported_reasons(x.double(), w, b, 4, 1e-5, False))
    assert any("neither contiguous" in r
               for r in gn.group_norm_not_supported_reasons(x[:, :, ::2], w, b, 4, 1e-5, False))
    assert any("empty" in r for r in gn.group_norm_not_supported_reasons(x[:0], w, b, 4, 1e-5, False))
    big = torch.empty(1, gn.MAX_TRITON_CHANNELS * 2, 1, 2).to(memory_format=torch.channels_last)
    assert any("channels" in r for r in gn.group_norm_not_supported_reasons(big, None, None, 32, 1e-5, False))
    if not _triton.reasons(x.device):  # the interpreter: CPU tensors of both layouts are taken
        for t in (x, x.to(memory_format=torch.channels_last), x.reshape(2, 8, 16)):
            assert gn.group_norm_not_supported_reasons(t, w, b, 4, 1e-5, True) == []


# ---- Triton, under the interpreter ----------------------------------------------------------------------

def poisoned_outputs(monkeypatch):
    """Make the output, partial and parameter buffers start as NaN."""
    alloc = gn._alloc_outputs
    monkeypatch.setattr(gn, "_alloc_outputs", lambda *a, **k: tuple(t.fill_(float("nan")) for t in alloc(*a, **k)))


def check_triton(x, w, b, groups, silu, tol, ib=None, **tiling):
    out = gn.group_norm_triton(x, w, b, groups, 1e-6, silu, ib, **tiling)
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == x.stride()
    err = rel_err(out, expected(x, w, b, groups, 1e-6, silu, ib))
    assert err < tol, err


@needs_triton
@interpreter_only
@pytest.mark.parametrize("shape", [(2, 64, 5, 7), (2, 96, 9, 6)])  # 96 channels: 3 per group
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("silu", [False, True])
def test_triton_interpreter_channels_last(monkeypatch, shape, dtype, silu):
    poisoned_outputs(monkeypatch)
    x, w, b = make(shape, dtype, channels_last=True, offset=1.0)
    check_triton(x, w, b, 32, silu, TOL[dtype])
    check_triton(x, w, b, 32, silu, TOL[dtype], ib=channel_bias(x))


@needs_triton
@interpreter_only
@pytest.mark.parametrize("shape,dtype,silu", [((2, 64, 6, 5), torch.float32, True),
                                              ((2, 64, 9), torch.bfloat16, False),
                                              ((1, 64, 5, 8), torch.float16, True)])
def test_triton_interpreter_contiguous(monkeypatch, shape, dtype, silu):
    poisoned_outputs(monkeypatch)
    x, w, b = make(shape, dtype, offset=1.0)
    check_triton(x, w, b, 32, silu, TOL[dtype])
    check_triton(x, w, b, 32, silu, TOL[dtype], ib=channel_bias(x))


@needs_triton
@interpreter_only
@pytest.mark.parametrize("channels_last", [True, False])
def test_triton_interpreter_many_chunks(monkeypatch, channels_last):
    """Small tiles and odd chunks: several statistics programs per sample, partial tiles, uneven last chunk."""
    poisoned_outputs(monkeypatch)
    x, w, b = make((2, 64, 9, 7), torch.float32, channels_last=channels_last, offset=-2.0, std=3.0)
    groups = 32 if channels_last else 8  # contiguous: a program per (sample, group, chunk); keep them few
    for ib in (None, channel_bias(x)):  # chunks of 37 rows of a (sample, group) column cross channels
        check_triton(x, w, b, groups, True, TOL[torch.float32], ib, stats_elems=64, apply_elems=256,
                     chunk_rows=37 if not channels_last else 5)


@needs_triton
@interpreter_only
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # SiLU of masked-out lanes (never stored)
@pytest.mark.parametrize("channels_last", [True, False])
def test_triton_interpreter_large_mean(monkeypatch, channels_last):
    """|mean| = 1000 std: the statistics must not cancel (E[x^2] - E[x]^2 in float32 measures ~6e-2)."""
    poisoned_outputs(monkeypatch)
    x, _, _ = make((2, 64, 9, 9), torch.float32, channels_last=channels_last, offset=1000.0)
    ref = expected(x, None, None, 32, 1e-6, False)
    g = x.reshape(2, 32, -1)
    mean = g.mean(-1, keepdim=True)
    var = g.square().mean(-1, keepdim=True) - mean.square()
    assert rel_err((g - mean) / torch.sqrt(var.clamp_min(0) + 1e-6), ref.reshape(2, 32, -1)) > 1e-3
    check_triton(x, None, None, 32, False, 1e-4)
    if channels_last:  # small tiles, many chunks (few programs in this layout), and bf16
        check_triton(x, None, None, 32, False, 1e-4, stats_elems=64, chunk_rows=13)
        xb = (x - 700.0).to(torch.bfloat16)  # bf16 at 300: values 2 apart, std ~1.2
        check_triton(xb, None, None, 32, True, TOL[torch.bfloat16], stats_elems=64, chunk_rows=13)


# ---- GPU ---------------------------------------------------------------------------------------------

# The VQ decoder's GroupNorm inputs at batch 64 (256 x 256 images), and odd ones.
GPU_SHAPES = [(64, 512, 16, 16), (64, 256, 64, 64), (8, 128, 256, 256), (3, 256, 128, 128), (5, 96, 33, 17)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [(s, torch.bfloat16) for s in GPU_SHAPES] +
                         [(s, d) for s in GPU_SHAPES[-2:] for d in (torch.float32, torch.float16)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_dispatch_uses_triton(shape, dtype, channels_last):
    x, w, b = make(shape, dtype, "cuda", channels_last=channels_last, offset=0.5)
    for silu, ib in ((True, None), (False, None), (True, channel_bias(x))):
        assert _ext.backend_for(gn._group_norm, x, w, b, 32, 1e-6, silu, ib) == "triton"
        out = ak.group_norm(x, w, b, 32, 1e-6, silu, ib)
        assert out.stride() == x.stride()
        assert rel_err(out, expected(x, w, b, 32, 1e-6, silu, ib)) < TOL[dtype]


@pytest.mark.gpu
def test_cuda_decoder_size_batch_64():
    """The decoder's largest GroupNorm: 64 x 128 x 256 x 256 bf16 channels_last (1 GiB)."""
    x, w, b = make((64, 128, 256, 256), torch.bfloat16, "cuda", channels_last=True)
    out = ak.group_norm(x, w, b, 32, 1e-6, True)
    ref = expected(x, w, b, 32, 1e-6, True)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_large_mean(monkeypatch, channels_last):
    poisoned_outputs(monkeypatch)
    x, w, b = make((4, 128, 96, 80), torch.float32, "cuda", channels_last=channels_last, offset=1000.0)
    for ib in (None, channel_bias(x)):
        out = ak.group_norm(x, w, b, 32, 1e-6, True, ib)
        assert rel_err(out, expected(x, w, b, 32, 1e-6, True, ib)) < 1e-4


@pytest.mark.gpu
def test_cuda_poisoned_and_falls_back(monkeypatch):
    poisoned_outputs(monkeypatch)
    x, w, b = make((3, 64, 17, 19), torch.bfloat16, "cuda", channels_last=True)
    check_triton(x, w, b, 32, True, TOL[torch.bfloat16])
    check_triton(x, w, b, 32, True, TOL[torch.bfloat16], stats_elems=256, chunk_rows=29)
    check_triton(x, w, b, 32, True, TOL[torch.bfloat16], channel_bias(x), stats_elems=256, chunk_rows=29)
    xd = x.double()[:, :, ::2]  # float64, strided: the reference
    assert _ext.backend_for(gn._group_norm, xd, None, None, 32, 1e-6, True, None) == "reference"
    assert rel_err(ak.group_norm(xd, None, None, 32, 1e-6, True), naive(xd, None, None, 32, 1e-6, True)) < 1e-12


@pytest.mark.gpu
def test_cuda_vq_decoder_bf16_channels_last():
    """The VQ decoder as generation runs it (bf16, channels_last, Triton GroupNorm) against float64."""
    from aim.vq import VQConfig, VQModel
    torch.manual_seed(0)
    model = VQModel(VQConfig(n_embed=64, z_channels=64, ch=64, ch_mult=(1, 2, 2), num_res_blocks=1)).double().eval()
    codes = torch.randint(0, 64, (4, 8, 8))
    with torch.no_grad():
        ref = model.decode_code(codes)
        fast = model.to("cuda", torch.bfloat16, memory_format=torch.channels_last).decode_code(codes.cuda())
    assert fast.dtype == torch.bfloat16
    assert rel_err(fast.cpu(), ref) < 3e-2
