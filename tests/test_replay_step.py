"""The fused Mamba2 decode step in replay form (aim_kernels.mamba2_replay_step): its reference equals
the state-form step (mamba2_decode_step) step by step, and the Triton kernels (interpreter on CPU, the
registered op on CUDA) equal the float64 reference on stale histories, with poisoned outputs."""
import pytest
import torch

import aim_kernels as ak
from aim_kernels import _ext, _triton, decode, replay
from test_decode import make_inputs, poisoned_outputs, rel_err
from test_replay import garbage_

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
NAMES = ("zxbcdt", "conv_state", "hist_x", "hist_B", "hist_dt", "hist_cum", "step", "conv_weight", "conv_bias",
         "A_log", "D", "dt_bias", "norm_weight", "eps", "headdim", "ngroups")


def replay_inputs(rows, nheads, headdim, d_state, ngroups, width, max_len, dtype=torch.float32, device="cpu",
                  bias=True, row_stride_pad=0, d_out=None):
    """make_inputs' step arguments with stale histories instead of the SSM state (and out_proj if d_out)."""
    inp = make_inputs(rows, nheads, headdim, d_state, ngroups, width, width - 1, dtype=dtype, device=device,
                      bias=bias, row_stride_pad=row_stride_pad)
    del inp["ssm_state"]
    inp["conv_state"].zero_()
    hist = ak.allocate_replay_history(rows, max_len, nheads, headdim, ngroups, d_state, device,
                                      torch.float32 if dtype == F64 else dtype)
    inp.update(zip(("hist_x", "hist_B", "hist_dt", "hist_cum"), (garbage_(t) for t in hist)))
    inp["step"] = torch.zeros((), dtype=torch.long, device=device)
    if d_out:
        d_inner = nheads * headdim
        inp["out_weight"] = (torch.randn(d_out, d_inner, device=device) / d_inner ** 0.5).to(dtype)
    return inp


def args_of(inp):
    return [inp[k] for k in NAMES + (("out_weight",) if "out_weight" in inp else ())]


def copy_to(inp, dtype=None, device=None):
    """Deep copy; dtype converts the model tensors (A_log, hist_dt/hist_cum keep theirs, float64 for float64)."""
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor):
            keep = k in ("A_log", "step") or (k in ("hist_dt", "hist_cum") and dtype != F64)
            v = v.to(device=device, dtype=v.dtype if keep or dtype is None else dtype, copy=True)
        out[k] = v
    return out


def new_token(inp, generator=None):
    """A fresh in_proj output row per row (dt in the decode range), in place of inp's zxbcdt."""
    z = torch.randn(inp["zxbcdt"].shape, generator=generator, dtype=F64)
    z[:, -inp["A_log"].shape[0]:] = z[:, -inp["A_log"].shape[0]:] * 0.5 - 4.0
    return z


def run_steps(fn, inp, tokens):
    ys = []
    for tok in tokens:
        inp["zxbcdt"].copy_(tok.to(inp["zxbcdt"].dtype))
        ys.append(fn(*args_of(inp)))
        inp["step"] += 1
    return torch.stack(ys, 1)


# ---- reference -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ngroups,width", [(1, 4), (2, 3)])
def test_reference_equals_state_form(ngroups, width):
    """Every step of the replay form == the recurrent step from a zero state, and so is the conv state."""
    inp = copy_to(replay_inputs(3, 4, 8, 16, ngroups, width, 13, d_out=5), F64)
    state = dict(copy_to(inp), ssm_state=torch.zeros(3, 4, 8, 16, dtype=F64))
    tokens = [new_token(inp) for _ in range(11)]
    y = run_steps(ak.mamba2_replay_step, inp, tokens)
    names = ("zxbcdt", "conv_state", "ssm_state", "conv_weight", "conv_bias", "A_log", "D", "dt_bias",
             "norm_weight", "eps", "headdim", "ngroups", "out_weight")
    ys = []
    for tok in tokens:
        state["zxbcdt"].copy_(tok)
        ys.append(ak.mamba2_decode_step(*[state[k] for k in names]))
    assert y.shape == (3, 11, 5)
    assert rel_err(y, torch.stack(ys, 1)) < 1e-12
    assert torch.equal(inp["conv_state"], state["conv_state"])
    assert inp["step"].item() == 11


def test_opcheck():
    for inp in (replay_inputs(2, 2, 8, 8, 1, 4, 5), replay_inputs(2, 4, 8, 8, 2, 3, 5, bias=False, d_out=3)):
        for k in ("hist_x", "hist_B", "hist_dt", "hist_cum"):
            inp[k].zero_()  # opcheck compares two runs: no NaN garbage
        inp["step"].fill_(2)
        torch.library.opcheck(replay._mamba2_replay_step, args_of(inp))


def test_wrapper_rejects_bad_inputs():
    inp = replay_inputs(2, 2, 8, 8, 1, 4, 5)

    def fails(exc, match, **change):
        with pytest.raises(exc, match=match):
            ak.mamba2_replay_step(*args_of(dict(inp, **change)))

    fails(ValueError, "zxbcdt", zxbcdt=inp["zxbcdt"][:, :-1])
    fails(ValueError, "hist_x must have shape", hist_x=inp["hist_x"][:, :, :1])
    fails(ValueError, "at least one step", hist_x=inp["hist_x"][:, :0])
    fails(ValueError, "hist_B must have shape", hist_B=inp["hist_B"][:, :4])
    fails(TypeError, "hist_cum must have dtype", hist_cum=inp["hist_cum"].half())
    fails(ValueError, "step must have shape", step=torch.zeros(1, dtype=torch.long))
    fails(TypeError, "step must have dtype", step=torch.tensor(0, dtype=torch.int32))
    fails(ValueError, "ngroups", ngroups=3)
    fails(ValueError, "out_weight", out_weight=torch.randn(4, 15))


def test_not_supported_reasons():
    inp = replay_inputs(2, 2, 8, 8, 1, 4, 5)
    reasons = lambda **c: " ".join(replay.not_supported_reasons(*args_of(dict(inp, **c))))  # noqa: E731
    assert "hist_cum is torch.float64" in reasons(hist_cum=inp["hist_cum"].double())
    assert "hist_x is not contiguous" in reasons(hist_x=inp["hist_x"].transpose(0, 1).contiguous().transpose(0, 1))
    assert "headdim 6 is not a power of two" in reasons(headdim=6)
    if not _triton.interpreting():
        assert "not a CUDA device" in reasons()


# ---- Triton --------------------------------------------------------------------------------------

def check_triton(inp, steps, device, config=None, tol=None):
    """Run `steps` tokens through the Triton path and the float64 reference from the same stale
    histories; every step's output, the histories written and the conv state must match."""
    dtype = inp["zxbcdt"].dtype
    tokens = [new_token(inp).to(dtype).double() for _ in range(steps)]  # both sides get the same rounded input
    ref = copy_to(inp, F64, "cpu")
    run = copy_to(inp, device=device)
    if device == "cpu":
        fn = lambda *a: replay.mamba2_replay_step_triton(*a, config=config)  # noqa: E731
    else:
        assert replay.not_supported_reasons(*args_of(run)) == []
        assert _ext.backend_for(replay._mamba2_replay_step, *args_of(run)) == "triton"
        fn = ak.mamba2_replay_step
    y = run_steps(fn, run, tokens)
    y_ref = run_steps(replay.mamba2_replay_step_ref, ref, tokens)
    assert y.dtype == dtype and y.shape == y_ref.shape and not y.isnan().any()
    for t in range(steps):
        assert rel_err(y[:, t], y_ref[:, t]) < (tol or TOL[dtype]), t
    start = inp["step"].item()
    written = torch.zeros(inp["hist_x"].shape[1], dtype=torch.bool)
    written[start:start + steps] = True
    for k in ("hist_x", "hist_B", "hist_dt", "hist_cum"):
        got, exp = run[k].cpu().double(), ref[k]
        # x and B are stored in the model dtype (rounded), dt and cum in float32
        assert rel_err(got[:, written], exp[:, written]) < (TOL[dtype] if k in ("hist_x", "hist_B") else 1e-6), k
        assert torch.equal(got[:, ~written].nan_to_num(), inp[k][:, ~written].cpu().double().nan_to_num()), k
    assert rel_err(run["conv_state"], ref["conv_state"]) < 1e-6


def needs_interpreter():
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")


# (rows, heads, headdim, d_state, groups, width, steps, extra history, dtype, d_out, config (HEADS, BLOCK_S, WARPS))
INTERPRETER_CASES = [
    (3, 6, 16, 16, 2, 4, 9, 2, torch.float32, None, None),
    (2, 4, 16, 32, 1, 4, 11, 0, torch.float32, None, (2, 4, 4)),
    (1, 6, 8, 16, 1, 3, 7, 1, torch.float32, 7, (2, 2, 4)),
    (3, 4, 16, 16, 1, 2, 6, 1, torch.float32, 5, (4, 8, 4)),
    (2, 4, 16, 32, 2, 4, 6, 0, torch.bfloat16, None, (1, 4, 4)),
    (9, 2, 16, 16, 1, 4, 4, 1, torch.float16, 3, None),
]


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_interpreter(case, monkeypatch):
    needs_interpreter()
    rows, h, p, n, g, w, steps, extra, dtype, d_out, config = case
    poisoned_outputs(monkeypatch)
    inp = replay_inputs(rows, h, p, n, g, w, steps + extra, dtype=dtype, row_stride_pad=3, d_out=d_out,
                        bias=w != 3)
    check_triton(inp, steps, "cpu", config)


def test_triton_interpreter_nan_fails():
    """The comparison catches a NaN in the result (so the poisoned-buffer tests can fail)."""
    needs_interpreter()
    inp = replay_inputs(1, 2, 8, 8, 1, 4, 3)
    inp["conv_weight"][0, 0] = float("nan")
    with pytest.raises(AssertionError):
        check_triton(inp, 2, "cpu")


# ---- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,h", [(128, 48), (128, 24), (32, 24), (4, 32)])
def test_triton_gpu_steps(rows, h, dtype, monkeypatch):
    """AiM shapes (the launch configs of large and small R), 40 steps, out_proj fused at few rows."""
    poisoned_outputs(monkeypatch)
    inp = replay_inputs(rows, h, 64, 128, 1, 4, 48, dtype=dtype, device="cuda", d_out=h * 32)
    check_triton(inp, 40, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gpu_late_step(dtype, monkeypatch):
    """A single step at t = 255 on a full AiM-XL history (built directly) against float64."""
    poisoned_outputs(monkeypatch)
    rows, h, T = 128, 48, 256
    inp = replay_inputs(rows, h, 64, 128, 1, 4, T, dtype=dtype, device="cuda")
    dt = torch.nn.functional.softplus(torch.randn(rows, T, h, device="cuda") * 0.5 - 4.0)
    inp["hist_x"].normal_()
    inp["hist_B"].normal_()
    inp["hist_dt"].copy_(dt)
    inp["hist_cum"].copy_(torch.cumsum(-dt * torch.exp(inp["A_log"]), dim=1))
    inp["step"].fill_(T - 1)
    check_triton(inp, 1, "cuda")


@pytest.mark.gpu
def test_triton_gpu_cuda_graph():
    """Steps captured in one CUDA graph with the device step counter == eager steps."""
    inp = replay_inputs(64, 24, 64, 128, 1, 4, 20, device="cuda", d_out=96)
    eager = copy_to(inp)
    tokens = [new_token(inp).float().cuda() for _ in range(20)]
    y_eager = run_steps(ak.mamba2_replay_step, eager, tokens)
    ak.mamba2_replay_step(*args_of(copy_to(inp)))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ak.mamba2_replay_step(*args_of(inp))
        inp["step"] += 1
    inp["step"].zero_()
    inp["conv_state"].zero_()
    ys = []
    for tok in tokens:
        inp["zxbcdt"].copy_(tok)
        graph.replay()
        ys.append(y.clone())
    assert torch.equal(torch.stack(ys, 1), y_eager)
