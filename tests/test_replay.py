"""Tests for the SSD-form SSM step (aim_kernels/replay.py's ssd_replay_step, reference only): against
the recurrent step (selective_state_update) and the chunked scan in float64, and the op's checks. The
fused step built on it (mamba2_replay_step) and its kernels: tests/test_replay_step.py."""
import math

import pytest
import torch

import aim_kernels.replay as replay
from aim_kernels.replay import allocate_replay_history, ssd_replay_step
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
