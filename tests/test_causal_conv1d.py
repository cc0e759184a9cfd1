"""causal_conv1d: the reference against a naive float64 loop (CPU), and the CUDA kernels against the
reference (GPU, `-m gpu`): values, gradients, the in-place decode state, layouts, opcheck."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import aim_kernels  # noqa: F401  (registers the ops and backends)
from aim_kernels import _ext
from aim_kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref

cc = sys.modules["aim_kernels.causal_conv1d"]
OPS = torch.ops.aim_kernels


def rel_err(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    denom = ref.norm().item()
    err = ((out - ref).norm() / (denom if denom > 0 else 1.0)).item()
    return err if err == err else float("inf")  # NaN never passes


def naive_conv(x, w, b, silu):
    """out[b, d, t] = act(bias[d] + sum_k w[d, k] x[b, d, t - W + 1 + k]) by explicit loops, float64."""
    x, w = x.double(), w.double()
    B, D, L = x.shape
    W = w.shape[1]
    out = torch.zeros(B, D, L, dtype=torch.float64)
    for t in range(L):
        acc = torch.zeros(B, D, dtype=torch.float64) if b is None else b.double().expand(B, D).clone()
        for k in range(W):
            s = t - W + 1 + k
            if s >= 0:
                acc += w[:, k] * x[:, :, s]
        out[:, :, t] = acc * torch.sigmoid(acc) if silu else acc
    return out


def make_x(B, D, L, layout, dtype=torch.float32, device="cpu"):
    """x (B, D, L) in the layout the model uses ('channel_last': a (B, L, D) tensor transposed), 'channel_first'
    (contiguous) or 'strided' (a non-dense slice)."""
    if layout == "channel_last":
        return torch.randn(B, L, D, dtype=dtype, device=device).transpose(1, 2)
    if layout == "channel_first":
        return torch.randn(B, D, L, dtype=dtype, device=device)
    if layout == "strided":  # like xBC sliced out of the in_proj output: stride(1) == 1, not dense
        return torch.randn(B, L, D + 5, dtype=dtype, device=device)[:, :, 3:3 + D].transpose(1, 2)
    raise ValueError(layout)


# ================================================ CPU ==============================================

@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", ["channel_last", "channel_first", "strided"])
@pytest.mark.parametrize("bias,silu", [(True, True), (False, False), (True, False)])
def test_reference_matches_naive_loop(width, layout, bias, silu):
    B, D, L = 2, 5, 11
    x = make_x(B, D, L, layout, torch.float64)
    w = torch.randn(D, width, dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64) if bias else None
    want = naive_conv(x, w, b, silu)
    assert rel_err(causal_conv1d_ref(x, w, b, silu), want) < 1e-12
    out = causal_conv1d(x, w, b, "silu" if silu else None)
    assert rel_err(out, want) < 1e-12
    assert out.stride() == torch.empty_like(x).stride()
    # float32 inputs compute in float32
    out32 = causal_conv1d(x.float(), w.float(), None if b is None else b.float(), "silu" if silu else None)
    assert out32.dtype == torch.float32 and rel_err(out32, want) < 1e-6


@pytest.mark.parametrize("width,state_len", [(2, 1), (3, 2), (4, 3), (4, 6)])
@pytest.mark.parametrize("silu", [False, True])
def test_update_steps_equal_full_sequence(width, state_len, silu):
    B, D, L = 3, 7, 9
    x = torch.randn(B, D, L, dtype=torch.float64)
    w = torch.randn(D, width, dtype=torch.float64)
    b = torch.randn(D, dtype=torch.float64)
    full = causal_conv1d(x, w, b, "silu" if silu else None)
    state = torch.zeros(B, D, state_len, dtype=torch.float64)
    outs = [causal_conv1d_update(x[:, :, t], state, w, b, "silu" if silu else None) for t in range(L)]
    assert rel_err(torch.stack(outs, -1), full) < 1e-12
    assert torch.equal(state, x[:, :, L - state_len:])  # newest input last


def test_update_matches_reference_in_place():
    B, D, W, S = 2, 6, 4, 3
    x, w, b = torch.randn(B, D), torch.randn(D, W), torch.randn(D)
    s1 = torch.randn(B, D, S)
    s2 = s1.clone()
    out = causal_conv1d_update(x, s1, w, b, "silu")
    want = causal_conv1d_update_ref(x, s2, w, b, True)
    assert rel_err(out, want) < 1e-6 and torch.equal(s1, s2)


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("layout", ["channel_last", "channel_first"])
@pytest.mark.parametrize("silu", [False, True])
def test_gradcheck(width, layout, silu):
    B, D, L = 2, 3, 7
    x = make_x(B, D, L, layout, torch.float64).requires_grad_()
    w = torch.randn(D, width, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, dtype=torch.float64, requires_grad=True)
    act = "silu" if silu else None
    assert torch.autograd.gradcheck(lambda x_, w_, b_: causal_conv1d(x_, w_, b_, act), (x, w, b))
    wn = torch.randn(D, width, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w_: causal_conv1d(x_, w_, None, act), (x, wn))


def _opcheck_cases(device, dtype):
    B, D, L, W = 2, 5, 7, 4
    cases = []
    for layout in ("channel_last", "channel_first"):
        x = make_x(B, D, L, layout, dtype, device)
        w = torch.randn(D, W, dtype=dtype, device=device)
        b = torch.randn(D, dtype=dtype, device=device)
        cases.append((OPS.causal_conv1d, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), True)))
        cases.append((OPS.causal_conv1d, (x.detach(), w.detach(), None, False)))
        dout = torch.randn_like(x.detach())
        cases.append((OPS.causal_conv1d_bwd, (x.detach(), w.detach(), b.detach(), dout, True)))
        cases.append((OPS.causal_conv1d_bwd, (x.detach(), w.detach(), None, dout, False)))
    st = torch.randn(B, D, W - 1, dtype=dtype, device=device)
    xs = torch.randn(B, D, dtype=dtype, device=device)
    cases.append((OPS.causal_conv1d_update, (xs, st, w.detach(), b.detach(), True)))
    cases.append((OPS.causal_conv1d_update, (xs, st, w.detach(), None, False)))
    return cases


def test_opcheck_cpu():
    for op, args in _opcheck_cases("cpu", torch.float64):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("bad", ["width5", "width1", "shape", "bias_shape", "activation", "state_short",
                                 "state_batch", "int_dtype", "x_2d"])
def test_bad_inputs_raise_clear_errors(bad):
    x, w, b = torch.randn(2, 4, 6), torch.randn(4, 4), torch.randn(4)
    if bad == "width5":
        with pytest.raises(ValueError, match="widths 2..4"):
            causal_conv1d(x, torch.randn(4, 5))
    elif bad == "width1":
        with pytest.raises(ValueError, match="widths 2..4"):
            causal_conv1d(x, torch.randn(4, 1))
    elif bad == "shape":
        with pytest.raises(ValueError, match="x must have shape"):
            causal_conv1d(torch.randn(2, 3, 6), w)
    elif bad == "bias_shape":
        with pytest.raises(ValueError, match="bias must have shape"):
            causal_conv1d(x, w, torch.randn(5))
    elif bad == "activation":
        with pytest.raises(ValueError, match="activation"):
            causal_conv1d(x, w, b, "relu")
    elif bad == "state_short":
        with pytest.raises(ValueError, match="at least 3"):
            causal_conv1d_update(torch.randn(2, 4), torch.randn(2, 4, 2), w)
    elif bad == "state_batch":
        with pytest.raises(ValueError, match="conv_state must have shape"):
            causal_conv1d_update(torch.randn(2, 4), torch.randn(3, 4, 3), w)
    elif bad == "int_dtype":
        with pytest.raises(TypeError, match="dtype"):
            causal_conv1d(x.long(), w)
    elif bad == "x_2d":
        with pytest.raises(ValueError, match=r"x must be \(batch, dim, seqlen\)"):
            causal_conv1d(torch.randn(2, 4), w)


def test_cpu_inputs_use_reference_and_say_why():
    x, w = torch.randn(1, 4, 5), torch.randn(4, 3)
    reasons = cc.not_supported_reasons(x, w)
    assert any("not a CUDA device" in r for r in reasons)
    assert _ext.backend_for(cc._causal_conv1d, x, w, None, False) == "reference"
    assert any("float64" in r for r in cc.not_supported_reasons(x.double(), w.double()))


def test_kernel_params_pass_through_or_convert():
    """The CUDA kernels read weight and bias of x's dtype or float32 as they are (no per-call conversion);
    other mixes go to float32, and non-contiguous or misaligned parameters are copied."""
    D, W = 24, 4
    for xdt, pdt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                     (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)):
        x, w, b = torch.randn(2, D, 5, dtype=xdt), torch.randn(D, W, dtype=pdt), torch.randn(D, dtype=pdt)
        kw, kb = cc._kernel_params(x, w, b)
        assert kw is w and kb is b  # the same tensors: nothing converted or copied
        kw, kb = cc._kernel_params(x, w, None)
        assert kw is w and kb is None
    x = torch.randn(2, D, 5, dtype=torch.bfloat16)
    for wdt, bdt in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                     (torch.float16, None)):
        w = torch.randn(D, W, dtype=wdt)
        b = None if bdt is None else torch.randn(D, dtype=bdt)
        kw, kb = cc._kernel_params(x, w, b)
        assert kw.dtype == torch.float32 and torch.equal(kw, w.float())
        assert kb is None if b is None else (kb.dtype == torch.float32 and torch.equal(kb, b.float()))
    # a view at an odd offset (2 bytes past an aligned base) and a transposed weight are copied
    flat = torch.randn(D * W + 1, dtype=torch.bfloat16)
    w_odd, b_odd = flat[1:].view(D, W), flat[1:D + 1]
    kw, kb = cc._kernel_params(x, w_odd, b_odd)
    assert w_odd.data_ptr() % 16 != 0 and kw.data_ptr() % 16 == 0 and kb.data_ptr() % 16 == 0
    assert kw.dtype == torch.bfloat16 and torch.equal(kw, w_odd) and torch.equal(kb, b_odd)
    w_t = torch.randn(W, D, dtype=torch.bfloat16).t()
    kw, _ = cc._kernel_params(x, w_t, None)
    assert kw.is_contiguous() and torch.equal(kw, w_t)


def test_info_reports_every_op(capsys):
    from aim_kernels import info
    info.main([])
    text = capsys.readouterr().out
    for name in ("aim_kernels::causal_conv1d", "aim_kernels::causal_conv1d_bwd", "aim_kernels::causal_conv1d_update"):
        assert name in text
    assert "torch" in text and "reference" in text


def test_extension_registers_ops_when_built():
    """Where the extension is built (CI compiles it), loading it registers the compiled ops, GPU or not."""
    if _ext.extension_path() is None:
        if os.environ.get("AIM_KERNELS_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"AIM_KERNELS_REQUIRE_CUDA_EXT=1 but {_ext.extension_error()}")
        pytest.skip(_ext.extension_error())
    for name in ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update", "build_info"):
        assert hasattr(torch.ops.aim_kernels_cuda, name)
    assert _ext.build_info()["cuda_archs"]


# ================================================ GPU ==============================================

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
PARAM_DTYPES = {dt: sorted({dt, torch.float32}, key=str) for dt in DTYPES}  # what the raw ops take for weight, bias


@pytest.fixture
def cuda_ext():
    if _ext.extension_path() is None:
        msg = f"CUDA extension not loaded: {_ext.extension_error()}"
        if os.environ.get("AIM_KERNELS_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs every run
    return "cuda"


def _ref64(x, w, b, silu):
    return causal_conv1d_ref(x.double(), w.double(), None if b is None else b.double(), silu)


def _ref64_grads(x, w, b, dout, silu):
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    out = causal_conv1d_ref(x64, w64, b64, silu)
    grads = torch.autograd.grad(out, [t for t in (x64, w64, b64) if t is not None], dout.double())
    return grads


SHAPES = [(2, 256, 64), (3, 67, 97), (1, 1792, 256), (2, 24, 5)]  # aligned (vector path) and odd sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", ["channel_last", "channel_first", "strided"])
def test_cuda_fwd_matches_reference(cuda_ext, dtype, width, layout):
    for (B, D, L), (bias, silu) in zip(SHAPES, [(True, True), (False, True), (True, False), (False, False)]):
        x = make_x(B, D, L, layout, dtype, "cuda")
        w = torch.randn(D, width, device="cuda", dtype=dtype) / width ** 0.5
        b = torch.randn(D, device="cuda", dtype=dtype) if bias else None
        assert _ext.backend_for(cc._causal_conv1d, x, w, b, silu) == "cuda"
        want = _ref64(x, w, b, silu)
        out = causal_conv1d(x, w, b, "silu" if silu else None)
        assert out.stride() == torch.empty_like(x).stride()
        assert rel_err(out, want) < TOL[dtype], (B, D, L, bias, silu)
        # the raw compiled op writes every element of a poisoned output, with weight and bias of x's dtype
        # (read as they are) or float32 (the mixed-precision case)
        for pdt in PARAM_DTYPES[dtype]:
            raw = torch.full_like(x, float("nan"))
            torch.ops.aim_kernels_cuda.causal_conv1d_fwd(x, w.to(pdt), None if b is None else b.to(pdt), raw, silu)
            assert not raw.isnan().any()
            assert rel_err(raw, want) < TOL[dtype], pdt


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", ["channel_last", "channel_first", "strided"])
def test_cuda_bwd_matches_reference(cuda_ext, dtype, width, layout):
    for (B, D, L), (bias, silu) in zip(SHAPES, [(True, True), (False, True), (True, False), (False, False)]):
        x = make_x(B, D, L, layout, dtype, "cuda")
        w = torch.randn(D, width, device="cuda", dtype=dtype) / width ** 0.5
        b = torch.randn(D, device="cuda", dtype=dtype) if bias else None
        dout = make_x(B, D, L, layout, dtype, "cuda")
        want = _ref64_grads(x, w, b, dout, silu)
        # through autograd (the op's backward dispatches to the CUDA kernel)
        xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
        bg = None if b is None else b.detach().requires_grad_()
        causal_conv1d(xg, wg, bg, "silu" if silu else None).backward(dout)
        got = [xg.grad, wg.grad] + ([] if b is None else [bg.grad])
        for name, g, r in zip(("dx", "dw", "db"), got, want):
            assert g.dtype == dtype and rel_err(g, r) < TOL[dtype], (name, B, D, L, bias, silu)
        if layout != "strided":  # autograd may re-stride the gradient of a non-dense leaf
            assert xg.grad.stride() == torch.empty_like(x).stride()
        # raw op: poisoned dx, the float32 [dweight | dbias] accumulator; weight and bias of x's dtype or float32
        for pdt in PARAM_DTYPES[dtype]:
            dx = torch.full_like(x, float("nan"))
            dwb = torch.zeros(D, width + 1, device="cuda", dtype=torch.float32)
            torch.ops.aim_kernels_cuda.causal_conv1d_bwd(x, w.to(pdt), None if b is None else b.to(pdt), dout, dx,
                                                         dwb, silu)
            assert not dx.isnan().any() and rel_err(dx, want[0]) < TOL[dtype], pdt
            assert rel_err(dwb[:, :width], want[1]) < (1e-5 if dtype == torch.float32 else 1e-2), pdt
            if b is not None:
                assert rel_err(dwb[:, width], want[2]) < (1e-5 if dtype == torch.float32 else 1e-2), pdt


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width,state_len", [(2, 1), (3, 2), (4, 3), (4, 5)])
def test_cuda_update_matches_reference_in_place(cuda_ext, dtype, width, state_len):
    for B, D, silu, bias in ((128, 3328, True, True), (3, 37, False, False), (5, 200, True, False)):
        x = torch.randn(B, D, device="cuda", dtype=dtype)
        w = torch.randn(D, width, device="cuda", dtype=dtype) / width ** 0.5
        b = torch.randn(D, device="cuda", dtype=dtype) if bias else None
        state = torch.randn(B, D, state_len, device="cuda", dtype=dtype)
        st64 = state.double()
        want = causal_conv1d_update_ref(x.double(), st64, w.double(), None if b is None else b.double(), silu)
        assert _ext.backend_for(cc._causal_conv1d_update, x, state, w, b, silu) == "cuda"
        out = causal_conv1d_update(x, state, w, b, "silu" if silu else None)
        assert rel_err(out, want) < TOL[dtype]
        assert torch.equal(state, st64.to(dtype)), "state must be shifted in place, x appended, bit-exact"
        # raw op with a poisoned output and a strided state (a slice of a larger buffer); weight and bias
        # of x's dtype or float32
        for pdt in PARAM_DTYPES[dtype]:
            big = torch.randn(B, D, state_len + 3, device="cuda", dtype=dtype)
            sview = big[:, :, 2:2 + state_len]
            s64 = sview.double().clone()
            want = causal_conv1d_update_ref(x.double(), s64, w.double(), None if b is None else b.double(), silu)
            raw = torch.full_like(x, float("nan"))
            before = big.clone()
            torch.ops.aim_kernels_cuda.causal_conv1d_update(x, sview, w.to(pdt), None if b is None else b.to(pdt),
                                                            raw, silu)
            assert not raw.isnan().any() and rel_err(raw, want) < TOL[dtype], pdt
            assert torch.equal(sview, s64.to(dtype)), pdt
            assert torch.equal(big[:, :, :2], before[:, :, :2]) and torch.equal(big[:, :, -1], before[:, :, -1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_update_steps_equal_full_sequence(cuda_ext, dtype):
    B, D, L, W = 4, 160, 12, 4
    x = make_x(B, D, L, "channel_last", dtype, "cuda")
    w = torch.randn(D, W, device="cuda", dtype=dtype) / 2
    b = torch.randn(D, device="cuda", dtype=dtype)
    full = causal_conv1d(x, w, b, "silu")
    state = torch.zeros(B, D, W - 1, device="cuda", dtype=dtype)
    steps = torch.stack([causal_conv1d_update(x[:, :, t], state, w, b, "silu") for t in range(L)], -1)
    assert rel_err(steps, full) < TOL[dtype]
    assert torch.equal(state, x[:, :, L - W + 1:])


@pytest.mark.gpu
def test_cuda_falls_back_for_unsupported_inputs(cuda_ext):
    x = torch.randn(2, 8, 9, device="cuda", dtype=torch.float64)
    w = torch.randn(8, 4, device="cuda", dtype=torch.float64)
    assert any("float64" in r for r in cc.not_supported_reasons(x, w))
    assert _ext.backend_for(cc._causal_conv1d, x, w, None, True) == "reference"
    assert rel_err(causal_conv1d(x, w, None, "silu"), naive_conv(x.cpu(), w.cpu(), None, True)) < 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("wdt,bdt", [(torch.float32, torch.float32), (torch.float32, None), (torch.float16, torch.float16),
                                     (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                     (torch.bfloat16, "odd_offset")], ids=str)
def test_cuda_mixed_param_dtypes(cuda_ext, wdt, bdt):
    """bf16 x with parameters of other dtypes (float32: read as they are; other mixes converted by the op)
    and a misaligned weight view: the kernels run, values and gradients (in the parameters' dtypes) match."""
    B, D, L, W = 2, 256, 40, 4
    x = make_x(B, D, L, "channel_last", torch.bfloat16, "cuda")
    if bdt == "odd_offset":  # weight and bias views 2 bytes past an aligned base
        flat = torch.randn(D * W + D + 1, device="cuda", dtype=wdt) / 2
        w, b = flat[1:1 + D * W].view(D, W), flat[1 + D * W:]
        assert w.data_ptr() % 16 != 0
    else:
        w = (torch.randn(D, W, device="cuda") / 2).to(wdt)
        b = None if bdt is None else torch.randn(D, device="cuda").to(bdt)
    assert _ext.backend_for(cc._causal_conv1d, x, w, b, True) == "cuda"
    out = causal_conv1d(x, w, b, "silu")
    assert rel_err(out, _ref64(x, w, b, True)) < 1e-2
    dout = torch.randn_like(out)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    bg = None if b is None else b.detach().requires_grad_()
    causal_conv1d(xg, wg, bg, "silu").backward(dout)
    got = [xg.grad, wg.grad] + ([] if b is None else [bg.grad])
    for name, g, r, dt in zip(("dx", "dw", "db"), got, _ref64_grads(x, w, b, dout, True),
                              (torch.bfloat16, w.dtype, None if b is None else b.dtype)):
        assert g.dtype == dt and rel_err(g, r) < 1e-2, name
    state = torch.randn(B, D, W - 1, device="cuda", dtype=torch.bfloat16)
    st64 = state.double()
    want = causal_conv1d_update_ref(x[:, :, 0].double(), st64, w.double(), None if b is None else b.double(), True)
    assert rel_err(causal_conv1d_update(x[:, :, 0], state, w, b, "silu"), want) < 1e-2
    assert torch.equal(state, st64.to(torch.bfloat16))


@pytest.mark.gpu
def test_cuda_raw_ops_check_param_dtype_and_alignment(cuda_ext):
    D, W = 64, 4
    x = torch.randn(2, D, 8, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    w = torch.randn(D, W, device="cuda", dtype=torch.bfloat16)
    fwd = torch.ops.aim_kernels_cuda.causal_conv1d_fwd
    with pytest.raises(RuntimeError, match="weight must be float32 or x's dtype"):
        fwd(x, w.half(), None, out, True)
    with pytest.raises(RuntimeError, match="bias must have weight's dtype"):
        fwd(x, w, torch.randn(D, device="cuda"), out, True)
    flat = torch.randn(D * W + 1, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        fwd(x, flat[1:].view(D, W), None, out, True)


@pytest.mark.gpu
def test_cuda_bf16_fwd_and_update_launch_one_kernel(cuda_ext):
    """bf16 weight and bias are read by the kernels as they are: the op launches no conversion kernels."""
    from torch.profiler import ProfilerActivity, profile
    B, D, L, W = 2, 512, 64, 4
    x = make_x(B, D, L, "channel_last", torch.bfloat16, "cuda")
    w = torch.randn(D, W, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(B, D, W - 1, device="cuda", dtype=torch.bfloat16)
    for name, call in (("fwd_kernel", lambda: causal_conv1d(x, w, b, "silu")),
                       ("update_kernel", lambda: causal_conv1d_update(x[:, :, 0], state, w, b, "silu"))):
        call()  # warm up
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events()  # kernels, copies and memsets (not op annotations) on the GPU
                   if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith(("aten::", "aim_kernels"))]
        if not kernels:
            pytest.skip("the profiler recorded no CUDA activity (CUPTI unavailable)")
        assert len(kernels) == 1 and name in kernels[0], kernels


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_opcheck(cuda_ext, dtype):
    for op, args in _opcheck_cases("cuda", dtype):
        torch.library.opcheck(op, args, atol=1e-2 if dtype != torch.float32 else None,
                              rtol=1e-2 if dtype != torch.float32 else None)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [1792, 2304, 3328])
def test_cuda_aim_shapes_bf16(cuda_ext, D):
    """The AiM training shape (channel-last, width 4, bias, SiLU) at a reduced batch."""
    B, L, W = 4, 256, 4
    x = make_x(B, D, L, "channel_last", torch.bfloat16, "cuda")
    w = torch.randn(D, W, device="cuda", dtype=torch.bfloat16) / 2
    b = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    out = causal_conv1d(x, w, b, "silu")
    assert rel_err(out, _ref64(x, w, b, True)) < 1e-2
    dout = torch.randn_like(out)
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
    causal_conv1d(xg, wg, bg, "silu").backward(dout)
    for g, r in zip((xg.grad, wg.grad, bg.grad), _ref64_grads(x, w, b, dout, True)):
        assert rel_err(g, r) < 1e-2
