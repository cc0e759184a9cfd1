"""Tests for the SSD-form decode step (aim_kernels/replay.py): the reference against the recurrent
step (selective_state_update) and the chunked scan in float64, the op's checks, and the Triton kernel
(interpreter on CPU, the registered op on CUDA) against the float64 reference."""
import math

import pytest
import torch

import aim_kernels.replay as replay
from aim_kernels import _ext, _triton
from aim_kernels.replay import allocate_replay_history, ssd_replay_step, ssd_replay_step_ref
from aim_kernels.ssm import selective_state_update, ssd_chunk_scan

F64 = torch.float64


def rel_err(out: torch.Tensor, exp: torch.Tensor) -> float:
    """||out - exp|| / ||exp||, NaN/inf counted as a failure."""
    out, exp = out.double().cpu(), exp.double().cpu()
    err = ((out - exp).norm() / exp.norm().clamp_min(1e-300)).item()
    return err if math.isfinite(err) else float("inf")


def sequence(rows, T, h, p, g, n, dtype=F64, device="cpu"):
    """Random Mamba2 inputs for a whole sequence: x (R, T, H, P), dt (R, T, H), B/C (R, T, G, N), ..."""
    f = dict(dtype=dtype, device=device)
    return dict(x=torch.randn(rows, T, h, p, **f), dt=torch.randn(rows, T, h, **f),
                A=-torch.exp(0.5 * torch.randn(h, dtype=F64)).to(**f), B=torch.randn(rows, T, g, n, **f),
                C=torch.randn(rows, T, g, n, **f), D=torch.randn(h, **f), dt_bias=(0.5 * torch.randn(h, **f)))


def garbage_(t: torch.Tensor) -> torch.Tensor:
    """Fill with what a previous generation may have left: random values, huge ones, inf and NaN."""
    vals = torch.randn(t.shape, dtype=F64) * 10.0 ** torch.randint(-3, 30, t.shape)
    vals.view(-1)[::7] = float("inf")
    vals.view(-1)[3::11] = -float("inf")
    vals.view(-1)[5::13] = float("nan")
    return t.copy_(vals.to(t.dtype))


def histories(seq, max_len, dtype, stale=True, device="cpu"):
    rows, _, h, p = seq["x"].shape
    g, n = seq["B"].shape[2:]
    hist = allocate_replay_history(rows, max_len, h, p, g, n, device, dtype)
    return [garbage_(t) if stale else t.zero_() for t in hist]


def step_args(seq, t, dtype=None):
    """The op's per-step arguments for step t (inputs cast to `dtype` when given)."""
    cast = (lambda v: v.to(dtype)) if dtype is not None else (lambda v: v)
    A = seq["A"] if dtype in (None, F64) else seq["A"].float()  # the model passes A in float32
    return (cast(seq["x"][:, t]), cast(seq["dt"][:, t]), A, cast(seq["B"][:, t]), cast(seq["C"][:, t]),
            cast(seq["D"]), cast(seq["dt_bias"]))


def run_steps(fn, seq, hist, step, dtype=None, steps=None):
    ys = []
    for t in range(seq["x"].shape[1] if steps is None else steps):
        ys.append(fn(*step_args(seq, t, dtype), *hist, step))
        step += 1
    return torch.stack(ys, dim=1)


def recurrent(seq):
    """The same sequence through selective_state_update (Mamba2 layout: A/dt/D/dt_bias broadcast over p)."""
    x, dt, A, B, C, D, dt_bias = (seq[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    rows, T, h, p = x.shape
    n = B.shape[-1]
    state = torch.zeros(rows, h, p, n, dtype=F64)
    ys = [selective_state_update(state, x[:, t], dt[:, t, :, None].expand(rows, h, p),
                                 A[:, None, None].expand(h, p, n), B[:, t], C[:, t], D=D[:, None].expand(h, p),
                                 dt_bias=dt_bias[:, None].expand(h, p), dt_softplus=True) for t in range(T)]
    return torch.stack(ys, dim=1)


def chunked(seq, chunk_size=4):
    return ssd_chunk_scan(seq["x"], seq["dt"], seq["A"], seq["B"], seq["C"], chunk_size, D=seq["D"],
                          dt_bias=seq["dt_bias"], dt_softplus=True)


# ---- the reference in float64 ---------------------------------------------------------------------

# (rows, T, heads, headdim, groups, d_state, extra history length)
SIZES = [(1, 5, 2, 4, 1, 8, 0), (3, 17, 6, 16, 2, 16, 3), (3, 5, 6, 4, 3, 16, 4), (1, 17, 2, 16, 2, 8, 1)]


@pytest.mark.parametrize("stale", [False, True])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "-".join(map(str, s)))
def test_replay_equals_recurrence_and_chunk_scan(size, stale):
    rows, T, h, p, g, n, extra = size
    seq = sequence(rows, T, h, p, g, n)
    hist = histories(seq, T + extra, F64, stale=stale)
    step = torch.zeros((), dtype=torch.long)
    y = run_steps(ssd_replay_step, seq, hist, step)
    assert y.dtype == F64 and y.shape == seq["x"].shape
    assert rel_err(y, recurrent(seq)) < 1e-12
    assert rel_err(y, chunked(seq)) < 1e-12
    assert step.item() == T
    # the appended entries: x, B as given, dt after softplus, cum = cumsum(dt A)
    hist_x, hist_B, hist_dt, hist_cum = hist
    dt = torch.nn.functional.softplus(seq["dt"] + seq["dt_bias"])
    assert torch.equal(hist_x[:, :T], seq["x"]) and torch.equal(hist_B[:, :T], seq["B"])
    assert rel_err(hist_dt[:, :T], dt) < 1e-15
    assert rel_err(hist_cum[:, :T], torch.cumsum(dt * seq["A"], dim=1)) < 1e-14


def test_new_generation_reuses_history():
    """Restarting at step 0 over a used history gives the same outputs as a fresh history."""
    seq = sequence(2, 9, 4, 8, 1, 8)
    hist = histories(seq, 12, F64, stale=False)
    step = torch.zeros((), dtype=torch.long)
    run_steps(ssd_replay_step, sequence(2, 12, 4, 8, 1, 8), hist, step)  # another sequence, all 12 steps
    step.zero_()
    y = run_steps(ssd_replay_step, seq, hist, step)
    assert rel_err(y, chunked(seq)) < 1e-12


def test_reference_model_dtype_history():
    """float32 model: x/B histories in float32, dt/cum in float32; float32 output close to float64."""
    seq = sequence(2, 9, 4, 8, 2, 8)
    seq32 = {k: v.float() for k, v in seq.items()}
    hist = histories(seq32, 9, torch.float32)
    assert [t.dtype for t in hist] == [torch.float32] * 4
    y = run_steps(ssd_replay_step, seq32, hist, torch.zeros((), dtype=torch.long))
    assert y.dtype == torch.float32
    assert rel_err(y, chunked(seq)) < 1e-5


def test_opcheck():
    seq = sequence(3, 6, 4, 4, 2, 8)
    hist = histories(seq, 8, F64, stale=False)
    run_steps(ssd_replay_step, seq, hist, torch.zeros((), dtype=torch.long), steps=3)
    args = (*step_args(seq, 3), *hist, torch.tensor(3))
    torch.library.opcheck(replay._ssd_replay_step, args)


def test_validation_errors():
    seq = sequence(2, 4, 4, 8, 2, 8)
    hist = histories(seq, 4, F64, stale=False)
    args = list(step_args(seq, 0)) + hist + [torch.tensor(0)]
    ssd_replay_step(*args)

    def fails(exc, pos, value, match):
        bad = list(args)
        bad[pos] = value
        with pytest.raises(exc, match=match):
            ssd_replay_step(*bad)

    fails(ValueError, 0, args[0][0], "x must be")                       # x not 3-D
    fails(ValueError, 1, args[1][:, :3], "dt must have shape")
    fails(ValueError, 2, args[2][:3], "A must have shape")
    fails(ValueError, 3, torch.randn(2, 3, 8, dtype=F64), "multiple of the number of B/C groups")
    fails(ValueError, 4, args[4][:, :1], "C must have shape")
    fails(ValueError, 7, hist[0][:, :, :3], "hist_x must have shape")
    fails(ValueError, 8, hist[1][:, :3], "hist_B must have shape")
    fails(ValueError, 7, hist[0][:, :0], "at least one step")
    fails(TypeError, 9, hist[2].bfloat16(), "hist_dt must have dtype")
    fails(TypeError, 10, hist[3].half(), "hist_cum must have dtype")
    fails(ValueError, 11, torch.tensor([0]), "step must have shape")
    fails(TypeError, 11, torch.tensor(0, dtype=torch.int32), "step must have dtype")
    fails(TypeError, 11, torch.tensor(0.0), "step must have dtype")
    fails(ValueError, 11, torch.tensor(0, device="meta"), "step is on meta")
    fails(TypeError, 5, [1.0] * 4, "D must be a torch.Tensor")


# ---- Triton ---------------------------------------------------------------------------------------

def poisoned_outputs(monkeypatch):
    """Make the kernel's output and partial-sum buffers start as NaN."""
    alloc = replay._alloc_outputs
    monkeypatch.setattr(replay, "_alloc_outputs", lambda *a, **k: tuple(t.fill_(float("nan")) for t in alloc(*a, **k)))


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
# y rounds to its dtype before the gate in both, but a last-bit difference before the rounding can flip an
# element by an ulp, moving a head's mean square by up to ~2 ulp when one element dominates it. Measured:
# fp16 with 16 channels per head (interpreter) up to 2.6e-4, 2.05e-4 the most over 25 seeds; bf16 at
# AiM's shapes (GPU) up to 4.5e-5.
MEAN_SQ_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-4, torch.float16: 1e-3}


def check_triton_steps(seq, dtype, max_len, device, config=None, steps=None):
    """Run the Triton path over the sequence on stale histories; compare every step's y and the
    histories with the float64 reference run on the same (dtype-rounded) inputs."""
    seq_in = {k: v.to(device, torch.float32 if k == "A" else dtype) for k, v in seq.items()}
    seq_ref = {k: v.double().cpu() for k, v in seq_in.items()}
    hist = histories(seq_in, max_len, dtype, device=device)
    hist_ref = [t.double().cpu() for t in hist]  # the same stale garbage
    step, step_ref = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long)
    if device == "cpu":
        fn = lambda *a: replay.ssd_replay_step_triton(*a, config=config)  # noqa: E731
    else:
        args = (*step_args(seq_in, 0, dtype), *hist, step)
        assert replay.not_supported_reasons(*args) == []
        assert _ext.backend_for(replay._ssd_replay_step, *args) == "triton"
        fn = ssd_replay_step
    y = run_steps(fn, seq_in, hist, step, dtype, steps)
    y_ref = run_steps(ssd_replay_step_ref, seq_ref, hist_ref, step_ref, F64, steps)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert not y.isnan().any()
    for t in range(y.shape[1]):
        assert rel_err(y[:, t], y_ref[:, t]) < TOL[dtype], t
    T = y.shape[1]
    for got, exp in zip(hist, hist_ref):
        assert rel_err(got[:, :T], exp[:, :T]) < 1e-6
        assert torch.equal(got[:, T:].cpu().double().nan_to_num(), exp[:, T:].nan_to_num())  # untouched
    return y


def needs_interpreter():
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")


# (rows, T, heads, headdim, groups, d_state, extra, dtype, config (HEADS, BLOCK_S, SPLITS, WARPS) or None)
INTERPRETER_CASES = [
    (3, 17, 6, 16, 2, 16, 3, torch.float32, None),
    (1, 17, 2, 4, 1, 8, 0, torch.float32, (2, 4, 3, 4)),
    (3, 9, 6, 16, 1, 8, 2, torch.float32, (4, 4, 2, 2)),
    (2, 17, 6, 16, 2, 16, 3, torch.bfloat16, (2, 8, 2, 4)),
    (1, 5, 2, 16, 1, 16, 0, torch.float16, None),
]


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_interpreter(case, monkeypatch):
    needs_interpreter()
    rows, T, h, p, g, n, extra, dtype, config = case
    poisoned_outputs(monkeypatch)
    check_triton_steps(sequence(rows, T, h, p, g, n), dtype, T + extra, "cpu", config)


def test_triton_interpreter_strided_inputs(monkeypatch):
    """x, dt, B, C as the model passes them: views into one in_proj/conv output row."""
    needs_interpreter()
    poisoned_outputs(monkeypatch)
    rows, T, h, p, g, n = 2, 6, 4, 8, 2, 16
    seq = sequence(rows, T, h, p, g, n)
    packed = torch.cat([seq["x"].flatten(2), seq["B"].flatten(2), seq["C"].flatten(2), seq["dt"]], dim=-1)
    x, B, C, dt = packed.split([h * p, g * n, g * n, h], dim=-1)
    seq.update(x=x.unflatten(-1, (h, p)), B=B.unflatten(-1, (g, n)), C=C.unflatten(-1, (g, n)), dt=dt)
    assert seq["x"][:, 0].stride(0) != h * p
    check_triton_steps(seq, torch.float32, T, "cpu")


def test_triton_interpreter_nan_fails():
    """The comparison catches a NaN in the result (so the poisoned-buffer tests can fail)."""
    needs_interpreter()
    seq = sequence(1, 3, 2, 4, 1, 8)
    seq["x"][0, 1, 0, 0] = float("nan")
    with pytest.raises(AssertionError):
        check_triton_steps(seq, torch.float32, 3, "cpu")


def test_not_supported_reasons():
    seq = sequence(2, 4, 4, 8, 1, 8, dtype=torch.float32)
    hist = histories(seq, 4, torch.float32)
    args = [*step_args(seq, 0, torch.float32), *hist, torch.tensor(0)]

    def reasons(pos, value):
        bad = list(args)
        bad[pos] = value
        return " ".join(replay.not_supported_reasons(*bad))

    assert "hist_cum is torch.float64" in reasons(10, hist[3].double())
    assert "x is torch.float64" in reasons(0, args[0].double())
    assert "hist_x is not contiguous" in reasons(7, hist[0].transpose(0, 1).contiguous().transpose(0, 1))
    assert "headdim 6 is not a power of two" in reasons(0, torch.randn(2, 4, 6))
    assert "d_state 12 is not a power of two" in reasons(3, torch.randn(2, 1, 12))
    if _triton.interpreting():
        assert replay.not_supported_reasons(*args) == []
        with pytest.raises(ValueError, match="cannot run these inputs"):
            replay.ssd_replay_step_triton(*args[:10], hist[3].double(), args[11])
    else:
        assert "not a CUDA device" in " ".join(replay.not_supported_reasons(*args))


# ---- GPU ------------------------------------------------------------------------------------------

def aim_history(rows, T, h, p, g, n, upto, dtype):
    """A valid history for steps < upto at AiM shapes, garbage beyond (built directly, not stepped)."""
    seq = sequence(rows, T, h, p, g, n, dtype=torch.float32, device="cuda")
    seq["dt"] = seq["dt"] - 3.0  # typical decode dts: softplus(.) ~ 0.01-0.2
    hist = [garbage_(t) for t in allocate_replay_history(rows, T, h, p, g, n, "cuda", dtype)]
    dt = torch.nn.functional.softplus(seq["dt"] + seq["dt_bias"])
    hist[0][:, :upto] = seq["x"][:, :upto].to(dtype)
    hist[1][:, :upto] = seq["B"][:, :upto].to(dtype)
    hist[2][:, :upto] = dt[:, :upto]
    hist[3][:, :upto] = torch.cumsum(dt * seq["A"], dim=1)[:, :upto]
    return seq, hist


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0, 1, 100, 255])
def test_triton_gpu_aim_shapes(t, dtype, monkeypatch):
    poisoned_outputs(monkeypatch)
    rows, T, h, p, g, n = 128, 256, 48, 64, 1, 128
    seq, hist = aim_history(rows, T, h, p, g, n, t, dtype)
    args = step_args(seq, t, dtype)
    step = torch.tensor(t, device="cuda")
    assert replay.not_supported_reasons(*args, *hist, step) == []
    assert _ext.backend_for(replay._ssd_replay_step, *args, *hist, step) == "triton"
    hist_ref = [v.double() for v in hist]
    y_ref = ssd_replay_step_ref(*(v.double() for v in args), *hist_ref, step)
    y = ssd_replay_step(*args, *hist, step)
    assert y.dtype == dtype and not y.isnan().any()
    assert rel_err(y, y_ref) < TOL[dtype]
    for got, exp in zip(hist, hist_ref):  # the appended entry; the stale ones untouched
        assert rel_err(got[:, t], exp[:, t]) < 1e-6
        assert torch.equal(got[:, t + 1:].double().nan_to_num(), exp[:, t + 1:].nan_to_num())


@pytest.mark.gpu
@pytest.mark.parametrize("rows,h", [(2, 48), (32, 24), (128, 32)])
def test_triton_gpu_steps(rows, h, monkeypatch):
    """Whole sequences step by step (the launch configs of small and large R) stay with the reference."""
    poisoned_outputs(monkeypatch)
    check_triton_steps(sequence(rows, 40, h, 64, 1, 128), torch.float32, 64, "cuda")


@pytest.mark.gpu
def test_triton_gpu_cuda_graph():
    """One step captured in a CUDA graph, replayed with the device step counter, equals the chunked scan."""
    rows, T, h, p, g, n = 4, 33, 8, 64, 1, 128
    seq = sequence(rows, T, h, p, g, n, dtype=torch.float32, device="cuda")
    hist = histories(seq, T, torch.float32, device="cuda")
    step = torch.zeros((), dtype=torch.long, device="cuda")
    inputs = [a.clone() for a in step_args(seq, 0)]
    y = ssd_replay_step(*inputs, *hist, step)  # warm up (compilation) outside the capture
    graph = torch.cuda.CUDAGraph()
    step.zero_()
    with torch.cuda.graph(graph):
        y = ssd_replay_step(*inputs, *hist, step)
        step += 1
    step.zero_()
    ys = []
    for t in range(T):
        for buf, new in zip(inputs, step_args(seq, t)):
            buf.copy_(new)
        graph.replay()
        ys.append(y.clone())
    assert step.item() == T
    seq64 = {k: v.double().cpu() for k, v in seq.items()}
    assert rel_err(torch.stack(ys, dim=1), chunked(seq64)) < 1e-5


# ---- mamba2_replay_step: the conv update inside the replay step ----------------------------------------

def conv_sequence(rows, T, h, p, g, n, width=4, state_len=3, bias=True, dtype=F64, device="cpu"):
    """Raw conv inputs xBC (R, T, H*P + 2*G*N) with the conv's weights and initial state, and the rest of
    `sequence`'s per-step inputs."""
    dim = h * p + 2 * g * n
    f = dict(dtype=dtype, device=device)
    seq = sequence(rows, T, h, p, g, n, dtype, device)
    seq.update(xBC=torch.randn(rows, T, dim, **f), conv_weight=0.5 * torch.randn(dim, width, **f),
               conv_bias=0.1 * torch.randn(dim, **f) if bias else None,
               conv_state=torch.randn(rows, dim, state_len, **f))
    for k in ("x", "B", "C"):
        del seq[k]
    return seq


def run_fused_steps(fn, seq, conv_state, hist, step):
    ys = []
    for t in range(seq["xBC"].shape[1]):
        ys.append(fn(seq["xBC"][:, t], seq["dt"][:, t], conv_state, seq["conv_weight"], seq["conv_bias"], seq["A"],
                     seq["D"], seq["dt_bias"], *hist, step))
        step += 1
    return torch.stack(ys, dim=1)


def test_fused_equals_full_sequence():
    """Stepping the fused reference from a zero conv state equals the full-sequence conv + chunked scan."""
    from aim_kernels.causal_conv1d import causal_conv1d_ref
    rows, T, h, p, g, n = 2, 11, 4, 8, 2, 8
    seq = conv_sequence(rows, T, h, p, g, n)
    hist = histories({"x": torch.empty(rows, T, h, p), "B": torch.empty(rows, T, g, n)}, T + 2, F64)
    conv_state = torch.zeros(rows, h * p + 2 * g * n, 3, dtype=F64)
    y = run_fused_steps(replay.mamba2_replay_step, seq, conv_state, hist, torch.zeros((), dtype=torch.long))
    xBC = causal_conv1d_ref(seq["xBC"].transpose(1, 2), seq["conv_weight"], seq["conv_bias"], True).transpose(1, 2)
    x, B, C = xBC.split([h * p, g * n, g * n], dim=-1)
    full = dict(seq, x=x.unflatten(-1, (h, p)), B=B.unflatten(-1, (g, n)), C=C.unflatten(-1, (g, n)))
    assert rel_err(y, chunked(full)) < 1e-12
    assert torch.equal(conv_state, seq["xBC"][:, -3:].transpose(1, 2))  # the last three inputs


def fused_args(seq, conv_state, hist, t):
    return (seq["xBC"][:, t], seq["dt"][:, t], conv_state, seq["conv_weight"], seq["conv_bias"], seq["A"], seq["D"],
            seq["dt_bias"], *hist, torch.tensor(t, device=seq["A"].device))


def test_fused_opcheck_and_validation():
    seq = conv_sequence(3, 4, 4, 4, 2, 8)
    hist = histories({"x": torch.empty(3, 4, 4, 4), "B": torch.empty(3, 4, 2, 8)}, 6, F64, stale=False)
    args = fused_args(seq, seq["conv_state"].clone(), hist, 0)
    torch.library.opcheck(replay._mamba2_replay_step, args)

    def fails(exc, pos, value, match):
        bad = list(args)
        bad[pos] = value
        with pytest.raises(exc, match=match):
            replay.mamba2_replay_step(*bad)

    fails(ValueError, 0, args[0][:, :-1], r"xBC must have shape \(3, 48\)")
    fails(ValueError, 2, args[2][:, :, :1], "conv_state holds 1 steps")
    fails(ValueError, 3, torch.randn(48, 5, dtype=F64), "widths 2..4, got 5")
    fails(ValueError, 4, args[4][:5], r"bias must have shape \(48\)")
    fails(ValueError, 1, args[1][:, :3], "dt must have shape")
    fails(ValueError, 9, hist[1][:, :3], "hist_B must have shape")
    fails(ValueError, 8, hist[0][:, :, :3], r"xBC must have shape \(3, 44\)")  # H, P come from hist_x


def rounded_conv_ref(dtype):
    """mamba2_replay_step_ref in float64 with the conv outputs rounded to `dtype`, as the kernels (and the
    model's separate conv, whose output is in the model dtype) round them."""
    from aim_kernels.causal_conv1d import causal_conv1d_update_ref

    def ref(xBC, dt, conv_state, weight, bias, A, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step):
        out = causal_conv1d_update_ref(xBC, conv_state, weight, bias, True).to(dtype).double()
        x, B, C = replay._split_xBC(out, hist_x, hist_B)
        return ssd_replay_step_ref(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)
    return ref


def check_fused_steps(seq, dtype, max_len, device, config=None):
    """The Triton path over the sequence (stale histories, random initial conv windows) against the
    float64 reference on the same dtype-rounded inputs: y, the appended history entries, the windows."""
    seq_in = {k: v.to(device, torch.float32 if k == "A" else dtype) if isinstance(v, torch.Tensor) else v
              for k, v in seq.items()}
    seq_ref = {k: v.double().cpu() if isinstance(v, torch.Tensor) else v for k, v in seq_in.items()}
    rows, T, _ = seq["xBC"].shape
    shapes = {"x": torch.empty(rows, T, *seq["hp"]), "B": torch.empty(rows, T, *seq["gn"])}
    hist = histories(shapes, max_len, dtype, device=device)
    hist_ref = [t.double().cpu() for t in hist]
    conv_state, conv_ref = seq_in["conv_state"].clone(), seq_ref["conv_state"].clone()
    step, step_ref = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long)
    if device == "cpu":
        fn = lambda *a: replay.mamba2_replay_step_triton(*a, config=config)  # noqa: E731
    else:
        args = fused_args(seq_in, conv_state, hist, 0)
        assert replay.fused_not_supported_reasons(*args) == []
        assert _ext.backend_for(replay._mamba2_replay_step, *args) == "triton"
        fn = replay.mamba2_replay_step
    y = run_fused_steps(fn, seq_in, conv_state, hist, step)
    y_ref = run_fused_steps(rounded_conv_ref(dtype), seq_ref, conv_ref, hist_ref, step_ref)
    assert y.dtype == dtype and y.shape == y_ref.shape and not y.isnan().any()
    for t in range(T):
        assert rel_err(y[:, t], y_ref[:, t]) < TOL[dtype], t
    assert torch.equal(conv_state.cpu().double(), conv_ref)
    for got, exp in zip(hist, hist_ref):  # x and B entries are conv outputs, rounded to dtype by the kernel
        assert rel_err(got[:, :T], exp[:, :T]) < TOL[dtype]
        assert torch.equal(got[:, T:].cpu().double().nan_to_num(), exp[:, T:].nan_to_num())  # untouched
    return y


def fused_case(rows, T, h, p, g, n, width=4, state_len=3, bias=True, device="cpu"):
    seq = conv_sequence(rows, T, h, p, g, n, width, state_len, bias, device=device)
    seq.update(hp=(h, p), gn=(g, n))
    return seq


# (rows, T, heads, headdim, groups, d_state, extra, width, state_len, conv bias, dtype, config, weights block);
# no bfloat16: the interpreter (Triton 3.8) truncates float32 -> bfloat16 casts (the GPU tests cover bf16)
FUSED_CASES = [
    (2, 9, 6, 16, 2, 16, 3, 4, 3, True, torch.float32, None, 32),
    (1, 7, 2, 4, 1, 8, 0, 3, 5, False, torch.float32, (2, 4, 3, 4), 32),
    (3, 9, 4, 16, 1, 16, 2, 4, 3, True, torch.float16, None, 4),    # 3 weights programs per row
    (2, 6, 2, 128, 1, 8, 1, 2, 1, True, torch.float16, None, 2),    # width 2, one-step windows
]


@pytest.mark.parametrize("op", ["fused", "gated"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "-".join(map(str, c)))
def test_fused_triton_interpreter(case, op, monkeypatch):
    """mamba2_replay_step and mamba2_replay_step_gated (gate applied, norm deferred) under the interpreter."""
    needs_interpreter()
    rows, T, h, p, g, n, extra, width, state_len, bias, dtype, config, block = case
    poisoned_outputs(monkeypatch)
    monkeypatch.setattr(replay, "WEIGHTS_BLOCK_S", block)
    check = check_fused_steps if op == "fused" else check_gated_steps
    check(fused_case(rows, T, h, p, g, n, width, state_len, bias), dtype, T + extra, "cpu", config)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,h,dtype", [(2, 48, torch.float32), (32, 24, torch.bfloat16), (128, 32, torch.float32),
                                          (128, 48, torch.bfloat16)],
                         ids=["2x48-fp32", "32x24-bf16", "aim_shapes_128x32-fp32", "aim_shapes_128x48-bf16"])
def test_fused_triton_gpu_steps(rows, h, dtype, monkeypatch):
    """AiM's layer shapes (P 64, N 128, width 4), 40 steps, the launch configs of small and large R."""
    poisoned_outputs(monkeypatch)
    check_fused_steps(fused_case(rows, 40, h, 64, 1, 128), dtype, 64, "cuda")


# ---- mamba2_replay_step_gated: the mixer's gate applied, its RMSNorm deferred --------------------------

def test_gated_reference_is_the_gated_norm():
    """u * rsqrt(mean_sq.sum(-1) + eps) is rmsnorm_gated(y, z, norm_weight) with one norm group."""
    from aim_kernels.norm import rmsnorm_gated_ref
    rows, h, p = 3, 4, 8
    y, z, w = torch.randn(rows, h, p, dtype=F64), torch.randn(rows, h * p, dtype=F64), torch.randn(h * p, dtype=F64)
    u, mean_sq = replay.gate_for_deferred_norm_ref(y, z, w)
    assert u.shape == (rows, h * p) and mean_sq.shape == (rows, h)
    normed = u * torch.rsqrt(mean_sq.sum(-1, keepdim=True) + 1e-5)
    assert rel_err(normed, rmsnorm_gated_ref(y.flatten(1), z, w, 1e-5, h * p)) < 1e-14


def gated_args(seq, conv_state, hist, t, zs, norm_weight):
    return (*fused_args(seq, conv_state, hist, t), zs[:, t], norm_weight)


def test_gated_opcheck_and_validation():
    seq = conv_sequence(3, 4, 4, 4, 2, 8)
    hist = histories({"x": torch.empty(3, 4, 4, 4), "B": torch.empty(3, 4, 2, 8)}, 6, F64, stale=False)
    zs, norm_weight = torch.randn(3, 4, 16, dtype=F64), torch.randn(16, dtype=F64)
    args = gated_args(seq, seq["conv_state"].clone(), hist, 0, zs, norm_weight)
    torch.library.opcheck(replay._mamba2_replay_step_gated, args)
    with pytest.raises(ValueError, match=r"z must have shape \(3, 16\)"):
        replay.mamba2_replay_step_gated(*args[:-2], zs[:, 0, :8], norm_weight)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(16\)"):
        replay.mamba2_replay_step_gated(*args[:-1], norm_weight[:4])
    with pytest.raises(ValueError, match=r"xBC must have shape \(3, 48\)"):
        replay.mamba2_replay_step_gated(args[0][:, :-1], *args[1:])


def check_gated_steps(seq, dtype, max_len, device, config=None):
    """The gated op over the sequence against the float64 reference of the same dtype-rounded inputs, with y
    rounded to dtype before the gate as the kernel rounds it: u and mean_sq every step."""
    seq_in = {k: v.to(device, torch.float32 if k == "A" else dtype) if isinstance(v, torch.Tensor) else v
              for k, v in seq.items()}
    seq_ref = {k: v.double().cpu() if isinstance(v, torch.Tensor) else v for k, v in seq_in.items()}
    rows, T, _ = seq["xBC"].shape
    h, p = seq["hp"]
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(rows, T, h * p, generator=g).to(device, dtype)
    norm_weight = (1 + 0.1 * torch.randn(h * p, generator=g)).to(device, dtype)
    shapes = {"x": torch.empty(rows, T, h, p), "B": torch.empty(rows, T, *seq["gn"])}
    hist = histories(shapes, max_len, dtype, device=device)
    hist_ref = [t.double().cpu() for t in hist]
    conv_state, conv_ref = seq_in["conv_state"].clone(), seq_ref["conv_state"].clone()
    if device == "cpu":
        fn = lambda *a: replay.mamba2_replay_step_gated_triton(*a, config=config)  # noqa: E731
    else:
        args = gated_args(seq_in, conv_state, hist, 0, zs, norm_weight)
        assert replay.gated_not_supported_reasons(*args) == []
        assert _ext.backend_for(replay._mamba2_replay_step_gated, *args) == "triton"
        fn = replay.mamba2_replay_step_gated
    ref = rounded_conv_ref(dtype)
    for t in range(T):
        u, mean_sq = fn(*gated_args(seq_in, conv_state, hist, t, zs, norm_weight))
        y_ref = ref(*fused_args(seq_ref, conv_ref, hist_ref, t)).to(dtype).double()
        u_ref, ms_ref = replay.gate_for_deferred_norm_ref(y_ref, zs[:, t].cpu().double(), norm_weight.cpu().double())
        assert u.dtype == dtype and mean_sq.dtype == torch.float32 and not u.isnan().any()
        assert rel_err(u, u_ref) < TOL[dtype], t
        assert rel_err(mean_sq, ms_ref) < MEAN_SQ_TOL[dtype], t
    assert torch.equal(conv_state.cpu().double(), conv_ref)
    for got, exp in zip(hist, hist_ref):  # the appended entries; those beyond T untouched
        assert rel_err(got[:, :T], exp[:, :T]) < TOL[dtype]
        assert torch.equal(got[:, T:].cpu().double().nan_to_num(), exp[:, T:].nan_to_num())


@pytest.mark.gpu
@pytest.mark.parametrize("rows,h,dtype", [(2, 48, torch.float32), (32, 24, torch.bfloat16),
                                          (128, 48, torch.bfloat16)],
                         ids=["2x48-fp32", "32x24-bf16", "aim_shapes_128x48-bf16"])
def test_gated_triton_gpu_steps(rows, h, dtype, monkeypatch):
    """AiM's layer shapes (P 64, N 128, width 4), 40 steps; 2 rows split the history (the gate after the sum)."""
    poisoned_outputs(monkeypatch)
    check_gated_steps(fused_case(rows, 40, h, 64, 1, 128), dtype, 64, "cuda")
