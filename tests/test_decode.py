"""The fused Mamba2 decode step: reference vs the un-fused ops, vs the full-sequence scan, and the
Triton kernel (interpreter on CPU, the registered op on CUDA) vs the float64 reference."""
import pytest
import torch

import aim_kernels as ak
from aim_kernels import _ext, _triton, decode, gemv

HAS_CUDA = torch.cuda.is_available()


def rel_err(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm()).item()


def make_inputs(rows, nheads, headdim, d_state, ngroups, width, state_len, dtype=torch.float32,
                state_dtype=torch.float32, device="cpu", bias=True, row_stride_pad=0):
    """Random step inputs with realistic magnitudes (dt around softplus^-1 of 1e-3..1e-1, A < 0)."""
    d_inner = nheads * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    total = d_inner + conv_dim + nheads
    zxbcdt = torch.randn(rows, total + row_stride_pad, device=device)[:, :total]  # strided rows when padded
    zxbcdt[:, -nheads:] = zxbcdt[:, -nheads:] * 0.5 - 4.0
    dt_bias = torch.log(torch.expm1(torch.empty(nheads, device=device).uniform_(1e-3, 0.1)))
    return dict(
        zxbcdt=zxbcdt.to(dtype),
        conv_state=torch.randn(rows, conv_dim, state_len, device=device).to(dtype),
        ssm_state=torch.randn(rows, nheads, headdim, d_state, device=device).to(state_dtype),
        conv_weight=(torch.randn(conv_dim, width, device=device) / width ** 0.5).to(dtype),
        conv_bias=(torch.randn(conv_dim, device=device) * 0.1).to(dtype) if bias else None,
        A_log=torch.log(torch.empty(nheads, device=device).uniform_(1, 16)),
        D=torch.randn(nheads, device=device).to(dtype),
        dt_bias=dt_bias.to(dtype),
        norm_weight=(1 + 0.1 * torch.randn(d_inner, device=device)).to(dtype),
        eps=1e-5, headdim=headdim, ngroups=ngroups)


def args_of(inp):
    """The op's arguments; with an "out_weight" entry, the step includes out_proj."""
    names = ("zxbcdt", "conv_state", "ssm_state", "conv_weight", "conv_bias", "A_log", "D", "dt_bias",
             "norm_weight", "eps", "headdim", "ngroups") + (("out_weight",) if "out_weight" in inp else ())
    return [inp[k] for k in names]


def with_out_proj(inp, d_out):
    d_inner = inp["norm_weight"].shape[0]
    w = torch.randn(d_out, d_inner, device=inp["zxbcdt"].device) / d_inner ** 0.5
    return dict(inp, out_weight=w.to(inp["zxbcdt"].dtype))


def cloned(inp, dtype=None, state_dtype=None, device=None):
    """Deep copy; dtype converts the model tensors, state_dtype the SSM state (A_log stays as it is)."""
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor):
            to = state_dtype if k == "ssm_state" else (None if k == "A_log" else dtype)
            v = v.to(device=device, dtype=to or v.dtype, copy=True)
            if k == "A_log" and dtype == torch.float64:
                v = v.double()
        out[k] = v
    return out


def poisoned_outputs(monkeypatch):
    """Make the kernel's output and scratch buffers start as NaN."""
    alloc = gemv._alloc_output

    def nan_alloc(*a, **k):
        return alloc(*a, **k).fill_(float("nan"))

    monkeypatch.setattr(gemv, "_alloc_output", nan_alloc)


# ---- reference -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ngroups", [1, 2])
def test_reference_equals_unfused_ops(ngroups):
    inp = cloned(make_inputs(3, 4, 8, 16, ngroups, 4, 3), torch.float64, torch.float64)
    ref_in = cloned(inp)
    y = ak.mamba2_decode_step(*args_of(inp))

    # the model's step before fusion, through the public ops
    r = ref_in
    d_inner, conv_dim, h, p, n = 32, 32 + 2 * ngroups * 16, 4, 8, 16
    z, xBC, dt = r["zxbcdt"].split([d_inner, conv_dim, h], -1)
    xBC = ak.causal_conv1d_update(xBC, r["conv_state"], r["conv_weight"], r["conv_bias"], "silu")
    x, B, C = xBC.split([d_inner, ngroups * n, ngroups * n], -1)
    yy = ak.selective_state_update(
        r["ssm_state"], x.unflatten(-1, (h, p)), dt[..., None].expand(-1, h, p), -torch.exp(r["A_log"].float())[:, None, None].expand(h, p, n),
        B.unflatten(-1, (ngroups, n)), C.unflatten(-1, (ngroups, n)), D=r["D"][:, None].expand(h, p),
        dt_bias=r["dt_bias"][:, None].expand(h, p), dt_softplus=True)
    expect = ak.rmsnorm_gated(yy.flatten(-2), z, r["norm_weight"], 1e-5, d_inner // ngroups)

    assert y.shape == (3, d_inner) and y.dtype == torch.float64
    assert rel_err(y, expect) < 1e-14
    assert torch.equal(inp["conv_state"], r["conv_state"])
    assert rel_err(inp["ssm_state"], r["ssm_state"]) < 1e-14


def test_reference_with_out_proj():
    inp = with_out_proj(cloned(make_inputs(3, 2, 8, 8, 1, 4, 3), torch.float64, torch.float64), 7)
    y = decode.mamba2_decode_step_ref(*args_of(cloned({k: v for k, v in inp.items() if k != "out_weight"})))
    assert torch.allclose(decode.mamba2_decode_step_ref(*args_of(inp)), y @ inp["out_weight"].t())


def test_opcheck():
    inp = make_inputs(2, 2, 8, 8, 1, 4, 3)
    torch.library.opcheck(decode._mamba2_decode_step, args_of(inp))
    torch.library.opcheck(decode._mamba2_decode_step, args_of(with_out_proj(inp, 5)))
    inp = make_inputs(2, 4, 8, 8, 2, 3, 3, bias=False)
    torch.library.opcheck(decode._mamba2_decode_step, args_of(inp))


@pytest.mark.parametrize("ngroups", [1, 2])
def test_steps_match_full_sequence(ngroups):
    """L decode steps from zero states == causal conv + SSD chunk scan + gated RMSNorm over the sequence."""
    b, L, h, p, n, w = 2, 11, 4, 8, 16, 4
    inp = cloned(make_inputs(b, h, p, n, ngroups, w, w - 1), torch.float64, torch.float64)
    d_inner, conv_dim = h * p, h * p + 2 * ngroups * n
    seq = torch.randn(b, L, inp["zxbcdt"].shape[1], dtype=torch.float64)
    seq[..., -h:] = seq[..., -h:] * 0.5 - 4.0

    z, xBC, dt = seq.split([d_inner, conv_dim, h], -1)
    xBC = ak.causal_conv1d_ref(xBC.transpose(1, 2), inp["conv_weight"], inp["conv_bias"], True).transpose(1, 2)
    x, B, C = xBC.split([d_inner, ngroups * n, ngroups * n], -1)
    y, final_state = ak.ssd_chunk_scan(x.unflatten(-1, (h, p)), dt, -torch.exp(inp["A_log"].float()), B.unflatten(-1, (ngroups, n)),
                                       C.unflatten(-1, (ngroups, n)), chunk_size=4, D=inp["D"],
                                       dt_bias=inp["dt_bias"], return_final_state=True)
    expect = ak.rmsnorm_gated(y.flatten(-2), z, inp["norm_weight"], 1e-5, d_inner // ngroups)

    inp["conv_state"].zero_()
    inp["ssm_state"].zero_()
    args = args_of(inp)
    steps = []
    for t in range(L):
        args[0] = seq[:, t]
        steps.append(ak.mamba2_decode_step(*args))
    assert rel_err(torch.stack(steps, 1), expect) < 1e-12
    assert rel_err(inp["ssm_state"], final_state) < 1e-12
    assert torch.equal(inp["conv_state"], seq[:, L - (w - 1):, d_inner:d_inner + conv_dim].transpose(1, 2))


def test_wrapper_rejects_bad_inputs():
    inp = make_inputs(2, 2, 8, 8, 1, 4, 3)
    bad = dict(inp, zxbcdt=inp["zxbcdt"][:, :-1])
    with pytest.raises(ValueError, match="zxbcdt"):
        ak.mamba2_decode_step(*args_of(bad))
    with pytest.raises(ValueError, match="conv_state holds"):
        ak.mamba2_decode_step(*args_of(dict(inp, conv_state=inp["conv_state"][:, :, :2])))
    with pytest.raises(ValueError, match="ssm_state"):
        ak.mamba2_decode_step(*args_of(dict(inp, ssm_state=inp["ssm_state"][:, :, :4])))
    with pytest.raises(ValueError, match="ngroups"):
        ak.mamba2_decode_step(*args_of(dict(inp, ngroups=3)))
    with pytest.raises(ValueError, match="conv width"):
        ak.mamba2_decode_step(*args_of(dict(inp, conv_weight=torch.randn(inp["conv_weight"].shape[0], 5))))
    with pytest.raises(TypeError, match="ssm_state"):
        ak.mamba2_decode_step(*args_of(dict(inp, ssm_state=inp["ssm_state"].int())))
    with pytest.raises(ValueError, match="out_weight"):
        ak.mamba2_decode_step(*args_of(dict(inp, out_weight=torch.randn(4, 15))))
    with pytest.raises(TypeError, match="out_weight"):
        ak.mamba2_decode_step(*args_of(dict(inp, out_weight=torch.randn(4, 16, dtype=torch.float64))))


def test_not_supported_reasons():
    inp = make_inputs(2, 2, 8, 8, 1, 4, 3)
    assert any("float64" in r for r in decode.not_supported_reasons(*args_of(cloned(inp, torch.float64))))
    assert any("power of two" in r for r in decode.not_supported_reasons(*args_of(make_inputs(1, 2, 12, 8, 1, 4, 3))))
    assert any("d_state" in r for r in decode.not_supported_reasons(
        *args_of(dict(inp, ssm_state=inp["ssm_state"].transpose(2, 3).contiguous().transpose(2, 3)))))
    wide = make_inputs(1, 129, 64, 8, 1, 4, 3)  # a gated-norm group of 8256 channels: over one tile
    assert any("group size 8256" in r for r in decode.not_supported_reasons(*args_of(wide)))


# ---- Triton (interpreter on CPU, or the GPU) -------------------------------------------------------

def check_triton(inp, tol, device):
    """Run the Triton path on a copy of `inp` (on `device`) and compare with the float64 reference."""
    state_dtype = inp["ssm_state"].dtype
    ref = cloned(inp, torch.float64, torch.float64, device="cpu")
    y_ref = decode.mamba2_decode_step_ref(*args_of(ref))
    run = cloned(inp, device=device)
    if device == "cpu":
        y = decode.mamba2_decode_step_triton(*args_of(run))
    else:
        assert decode.not_supported_reasons(*args_of(run)) == []
        assert _ext.backend_for(decode._mamba2_decode_step, *args_of(run)) == "triton"
        y = ak.mamba2_decode_step(*args_of(run))
    assert y.dtype == inp["zxbcdt"].dtype and y.shape == y_ref.shape
    assert not y.isnan().any()
    assert rel_err(y, y_ref) < tol
    state_tol = 1e-5 if state_dtype == torch.float32 else 1e-2
    assert rel_err(run["ssm_state"], ref["ssm_state"]) < state_tol
    if inp["conv_state"].dtype == torch.float32:
        assert torch.equal(run["conv_state"].cpu(), ref["conv_state"].float())
    else:
        assert torch.equal(run["conv_state"].cpu().double(), ref["conv_state"])


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}

# (rows, nheads, headdim, d_state, ngroups, width, state_len, dtype): each odd size at least once
INTERPRETER_CASES = [
    (1, 2, 16, 16, 1, 2, 1, torch.float32),
    (3, 5, 16, 16, 1, 4, 3, torch.float32),
    (3, 2, 64, 128, 1, 4, 4, torch.float32),
    (1, 5, 64, 16, 1, 2, 2, torch.bfloat16),
    (3, 2, 16, 128, 2, 4, 3, torch.bfloat16),
    (1, 2, 16, 16, 2, 3, 3, torch.float16),
]


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_interpreter(case, monkeypatch):
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    rows, h, p, n, g, w, s, dtype = case
    poisoned_outputs(monkeypatch)
    check_triton(make_inputs(rows, h, p, n, g, w, s, dtype=dtype, row_stride_pad=3), TOL[dtype], "cpu")


def test_triton_interpreter_bf16_state_no_bias(monkeypatch):
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    poisoned_outputs(monkeypatch)
    check_triton(make_inputs(2, 2, 16, 32, 1, 4, 3, state_dtype=torch.bfloat16, bias=False), 1e-5, "cpu")


def test_triton_interpreter_whole_heads(monkeypatch):
    """One program per head, looping over several (BLOCK_P, N) tiles (the large-batch configuration)."""
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    poisoned_outputs(monkeypatch)
    monkeypatch.setattr(decode, "_p_per_program", lambda rows, nheads, headdim: headdim)
    monkeypatch.setattr(decode, "TILE_ELEMENTS", 4 * 32)
    check_triton(make_inputs(3, 2, 16, 32, 1, 4, 3, row_stride_pad=1), 1e-5, "cpu")


# (rows, ngroups, dtype): the fused out_proj kernel (<= 8 rows, one group), and the fallbacks
OUT_PROJ_CASES = [(2, 1, torch.float32), (3, 1, torch.float16), (8, 1, torch.float32), (9, 1, torch.float32),
                  (2, 2, torch.float32)]


@pytest.mark.parametrize("case", OUT_PROJ_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_interpreter_out_proj(case, monkeypatch):
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    rows, g, dtype = case
    poisoned_outputs(monkeypatch)
    inp = with_out_proj(make_inputs(rows, 4, 16, 32, g, 4, 3, dtype=dtype, row_stride_pad=2), 37)
    check_triton(inp, TOL[dtype], "cpu")


def test_triton_interpreter_nan_fails(monkeypatch):
    """The comparison catches a NaN in the result (so the poisoned-buffer tests can fail)."""
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    inp = make_inputs(1, 2, 16, 16, 1, 4, 3)
    inp["zxbcdt"][0, 0] = float("nan")
    with pytest.raises(AssertionError):
        check_triton(inp, 1e-5, "cpu")


# ---- GPU ------------------------------------------------------------------------------------------

GPU_CASES = [(rows, h, dtype, state_dtype) for rows in (2, 128) for h in (24, 48)
             for dtype in (torch.float32, torch.bfloat16) for state_dtype in (torch.float32, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_gpu(case, monkeypatch):
    rows, h, dtype, state_dtype = case
    poisoned_outputs(monkeypatch)
    inp = make_inputs(rows, h, 64, 128, 1, 4, 3, dtype=dtype, state_dtype=state_dtype, device="cuda")
    check_triton(inp, TOL[dtype], "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [2, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_out_proj(rows, dtype, monkeypatch):
    """AiM-B's mixer (24 heads) from in_proj output to out_proj output; 16 rows take the unfused path."""
    poisoned_outputs(monkeypatch)
    inp = with_out_proj(make_inputs(rows, 24, 64, 128, 1, 4, 3, dtype=dtype, device="cuda"), 768)
    check_triton(inp, TOL[dtype], "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("ngroups,state_len", [(1, 3), (2, 4)])
def test_triton_gpu_steps(ngroups, state_len):
    """Many steps in a row on the GPU stay with the float64 reference (fp32 model and state)."""
    inp = make_inputs(4, 8, 64, 128, ngroups, 4, state_len, device="cuda")
    ref = cloned(inp, torch.float64, torch.float64, device="cpu")
    run, ref_args = args_of(inp), args_of(ref)
    for _ in range(20):
        zxbcdt = torch.randn_like(inp["zxbcdt"])
        zxbcdt[:, -8:] = zxbcdt[:, -8:] * 0.5 - 4.0
        run[0], ref_args[0] = zxbcdt, zxbcdt.double().cpu()
        y = ak.mamba2_decode_step(*run)
        y_ref = ak.mamba2_decode_step(*ref_args)
        assert rel_err(y, y_ref) < 1e-5
    assert rel_err(inp["ssm_state"], ref["ssm_state"]) < 1e-5
    assert torch.equal(inp["conv_state"].cpu().double(), ref["conv_state"])



# ---- the whole decode block (mamba2_block_step) ------------------------------------------------------

BLOCK_NAMES = ("x", "residual", "x_gate", "block_norm_weight", "shift", "scale", "in_weight", "conv_state",
               "ssm_state", "conv_weight", "conv_bias", "A_log", "D", "dt_bias", "norm_weight", "eps", "headdim",
               "ngroups", "out_weight")


def make_block_inputs(rows, d_model, nheads, headdim, d_state, ngroups, width, state_len, dtype=torch.float32,
                      state_dtype=torch.float32, device="cpu", bias=True, residual=True, gate=True):
    """A block's step inputs: the mixer's from make_inputs, the prologue's as the model passes them (a float32
    residual, shift and scale as strided views of one modulation tensor)."""
    inp = make_inputs(rows, nheads, headdim, d_state, ngroups, width, state_len, dtype, state_dtype, device, bias)
    features = inp.pop("zxbcdt").shape[1]
    d_inner = nheads * headdim
    mod = 0.1 * torch.randn(rows, 3, d_model, device=device)
    return dict(inp, x=torch.randn(rows, d_model, device=device).to(dtype),
                residual=torch.randn(rows, d_model, device=device) if residual else None,
                x_gate=(1 + 0.1 * torch.randn(rows, d_model, device=device)).to(dtype) if gate else None,
                block_norm_weight=(1 + 0.1 * torch.randn(d_model, device=device)).to(dtype),
                shift=mod[:, 0].to(dtype), scale=mod.to(dtype)[:, 1],
                in_weight=(torch.randn(features, d_model, device=device) / d_model ** 0.5).to(dtype),
                out_weight=(torch.randn(d_model, d_inner, device=device) / d_inner ** 0.5).to(dtype))


def block_args(inp):
    return [inp[k] for k in BLOCK_NAMES]


def test_block_step_is_the_two_ops():
    inp = cloned(make_block_inputs(3, 24, 2, 8, 16, 1, 4, 3), torch.float64, torch.float64)
    two = cloned(inp)
    out, residual = ak.mamba2_block_step(*block_args(inp))
    zxbcdt, residual_two = ak.add_rmsnorm_modulate_linear(two["x"], two["residual"], two["block_norm_weight"],
                                                          two["shift"], two["scale"], 1e-5, two["x_gate"],
                                                          two["in_weight"])
    out_two = ak.mamba2_decode_step(zxbcdt, *[two[k] for k in BLOCK_NAMES[7:]])
    assert torch.equal(out, out_two) and torch.equal(residual, residual_two)
    assert torch.equal(inp["ssm_state"], two["ssm_state"]) and torch.equal(inp["conv_state"], two["conv_state"])


def test_block_step_opcheck():
    torch.library.opcheck(decode._mamba2_block_step, block_args(make_block_inputs(2, 24, 2, 8, 8, 1, 4, 3)))
    inp = make_block_inputs(1, 16, 4, 8, 8, 2, 3, 3, bias=False, residual=False, gate=False)
    torch.library.opcheck(decode._mamba2_block_step, block_args(inp))


def test_block_step_rejects_bad_inputs():
    inp = make_block_inputs(2, 24, 2, 8, 8, 1, 4, 3)
    with pytest.raises(ValueError, match="in_weight"):
        ak.mamba2_block_step(*block_args(dict(inp, in_weight=inp["in_weight"][:-1])))
    with pytest.raises(ValueError, match="out_weight"):
        ak.mamba2_block_step(*block_args(dict(inp, out_weight=None)))
    with pytest.raises(ValueError, match="shift"):
        ak.mamba2_block_step(*block_args(dict(inp, shift=inp["shift"][:, :-1])))
    with pytest.raises(ValueError, match="conv_state"):
        ak.mamba2_block_step(*block_args(dict(inp, conv_state=inp["conv_state"][:1])))
    with pytest.raises(TypeError, match="in_weight"):
        ak.mamba2_block_step(*block_args(dict(inp, in_weight=inp["in_weight"].double())))


def test_block_step_not_supported_reasons():
    inp = make_block_inputs(9, 24, 2, 8, 8, 1, 4, 3)
    assert any("9 rows" in r for r in decode.block_step_not_supported_reasons(*block_args(inp)))
    inp = make_block_inputs(2, 24, 2, 12, 8, 1, 4, 3)
    assert any("power of two" in r for r in decode.block_step_not_supported_reasons(*block_args(inp)))


def check_block(inp, tol, device):
    """The block step on a copy of `inp` (on `device`: the Triton path on CPU, the registered op on CUDA)
    against the float64 reference: output, residual and both caches."""
    ref = cloned(inp, torch.float64, torch.float64, device="cpu")
    out_ref, residual_ref = decode.mamba2_block_step_ref(*block_args(ref))
    run = cloned(inp, device=device)
    if device == "cpu":
        out, residual = decode.mamba2_block_step_triton(*block_args(run))
    else:
        out, residual = ak.mamba2_block_step(*block_args(run))
    assert out.dtype == inp["x"].dtype and out.shape == out_ref.shape and residual.dtype == torch.float32
    assert not out.isnan().any()
    assert rel_err(out, out_ref) < tol
    assert rel_err(residual, residual_ref) < 1e-6
    state_tol = 1e-2 if inp["ssm_state"].dtype == torch.bfloat16 else min(tol, 1e-3)  # x, B, dt: model dtype
    assert rel_err(run["ssm_state"], ref["ssm_state"]) < state_tol
    # the windows hold in_proj's outputs, rounded to the model dtype
    assert rel_err(run["conv_state"], ref["conv_state"]) < (1e-6 if inp["x"].dtype == torch.float32 else tol)


# (rows, d_model, nheads, headdim, d_state, ngroups, width, state_len, dtype, bias, residual, gate)
BLOCK_CASES = [
    (1, 37, 3, 16, 16, 1, 4, 3, torch.float32, True, True, True),
    (2, 40, 2, 16, 32, 1, 2, 1, torch.float32, False, False, False),
    (3, 24, 4, 8, 16, 2, 3, 5, torch.float32, True, True, False),  # two norm groups: the unfused norm + GEMV
    (2, 33, 2, 16, 16, 1, 4, 3, torch.float16, True, True, True),
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: "-".join(map(str, c)))
def test_block_step_triton_interpreter(case, monkeypatch):
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    *sizes, dtype, bias, residual, gate = case
    poisoned_outputs(monkeypatch)
    inp = make_block_inputs(*sizes, dtype=dtype, bias=bias, residual=residual, gate=gate)
    assert decode.block_step_not_supported_reasons(*block_args(inp)) == []
    check_block(inp, TOL[dtype], "cpu")


def test_block_step_triton_interpreter_bf16_state(monkeypatch):
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    poisoned_outputs(monkeypatch)
    check_block(make_block_inputs(2, 24, 2, 16, 32, 1, 4, 3, state_dtype=torch.bfloat16), 1e-5, "cpu")


def test_block_step_triton_interpreter_nan_fails(monkeypatch):
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    inp = make_block_inputs(1, 24, 2, 16, 16, 1, 4, 3)
    inp["in_weight"][0, 0] = float("nan")  # a z row: only the gate reads it
    with pytest.raises(AssertionError):
        check_block(inp, 1e-5, "cpu")


# (d_model, nheads) of AiM-B, AiM-L, AiM-XL; AiM-XL's prologue is not fused (then the two ops run)
BLOCK_GPU_CASES = [(d, h, rows, dtype, state_dtype) for d, h in ((768, 24), (1024, 32), (1536, 48)) for rows in (1, 2, 4)
                   for dtype in (torch.float32, torch.bfloat16) for state_dtype in (torch.float32, torch.bfloat16)
                   if state_dtype == torch.float32 or rows == 2]


@pytest.mark.gpu
@pytest.mark.parametrize("case", BLOCK_GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_block_step_gpu(case, monkeypatch):
    d, h, rows, dtype, state_dtype = case
    poisoned_outputs(monkeypatch)
    inp = make_block_inputs(rows, d, h, 64, 128, 1, 4, 3, dtype=dtype, state_dtype=state_dtype, device="cuda")
    split = not decode.block_step_not_supported_reasons(*block_args(inp))
    if rows == 2:  # batch 1 with guidance: split for AiM-B/L, the two ops for AiM-XL
        assert split == (d < 1536), decode.block_step_not_supported_reasons(*block_args(inp))
    assert _ext.backend_for(decode._mamba2_block_step, *block_args(inp)) == ("triton" if split else "reference")
    check_block(inp, TOL[dtype], "cuda")


@pytest.mark.gpu
def test_block_step_gpu_steps():
    """20 steps in a row on the GPU stay with the float64 reference (AiM-B sizes, fp32, 2 rows)."""
    inp = make_block_inputs(2, 768, 24, 64, 128, 1, 4, 3, device="cuda")
    ref = cloned(inp, torch.float64, torch.float64, device="cpu")
    for _ in range(20):
        x = torch.randn_like(inp["x"])
        inp["x"], ref["x"] = x, x.double().cpu()
        out, inp["residual"] = ak.mamba2_block_step(*block_args(inp))
        out_ref, ref["residual"] = decode.mamba2_block_step_ref(*block_args(ref))
        assert rel_err(out, out_ref) < 1e-5
    assert rel_err(inp["ssm_state"], ref["ssm_state"]) < 1e-5
    assert rel_err(inp["conv_state"], ref["conv_state"]) < 1e-6
