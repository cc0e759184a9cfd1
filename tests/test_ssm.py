"""Tests for the selective state-space ops (aim_kernels/ssm.py).

The references in this file are written independently of the ops, step by step in float64:
- Mamba2 / SSD, per head i using B/C group i // (h / g):
    dt <- softplus(dt + dt_bias);  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T;  y_t = h_t C_t + D x_t
- Mamba1 / selective scan, per channel:
    delta <- softplus(delta + delta_bias);  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t;
    y_t = h_t . C_t + D u_t;  y *= silu(z)
"""
import itertools
import math

import pytest
import torch

from aim_kernels import selective_scan, selective_state_update, ssd_chunk_scan

F64 = torch.float64
OPS = torch.ops.aim_kernels


def rel_err(out: torch.Tensor, exp: torch.Tensor) -> float:
    """max |out - exp| / max |exp|, NaN/inf counted as a failure."""
    err = ((out.double() - exp.double()).abs().max() / exp.double().abs().max().clamp_min(1e-300)).item()
    return err if math.isfinite(err) else float("inf")


def softplus(t: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(t))


# ---- naive references ----------------------------------------------------------------------------

def naive_ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, initial_state=None):
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = softplus(dt)
    group = torch.arange(h) // (h // g)  # head i reads B/C group i // (h / g)
    Bh, Ch = B[:, :, group], C[:, :, group]  # (b, l, h, n)
    state = torch.zeros(b, h, p, n, dtype=F64) if initial_state is None else initial_state.double().clone()
    y = torch.zeros(b, l, h, p, dtype=F64)
    for t in range(l):
        d = dt[:, t, :, None, None]  # (b, h, 1, 1)
        state = torch.exp(d * A[:, None, None]) * state + d * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        y[:, t] = (state * Ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y[:, t] += D.double()[:, None] * x[:, t]
    return y, state


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True):
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, d, l = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = softplus(delta)
    state = torch.zeros(b, d, A.shape[1], dtype=F64)
    y = torch.zeros(b, d, l, dtype=F64)
    for t in range(l):
        for c in range(d):
            dl = delta[:, c, t, None]
            state[:, c] = torch.exp(dl * A[c]) * state[:, c] + dl * u[:, c, t, None] * B[:, :, t]
            y[:, c, t] = (state[:, c] * C[:, :, t]).sum(-1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        z = z.double()
        y = y * z * torch.sigmoid(z)
    return y, state


# ---- input factories -------------------------------------------------------------------------------

def ssd_inputs(b=2, l=7, h=6, p=5, g=1, n=3, *, D=True, dt_bias=True, initial_state=True, dtype=F64,
               dt_softplus=True):
    """Random Mamba2 inputs; A < 0 as in the model. Returns a kwargs dict for ssd_chunk_scan."""
    dt = torch.randn(b, l, h) if dt_softplus else torch.rand(b, l, h) + 0.05  # positive when used raw
    return dict(
        x=torch.randn(b, l, h, p, dtype=dtype),
        dt=dt.to(dtype),
        A=-torch.exp(0.5 * torch.randn(h)).to(dtype),
        B=torch.randn(b, l, g, n, dtype=dtype),
        C=torch.randn(b, l, g, n, dtype=dtype),
        D=torch.randn(h, dtype=dtype) if D else None,
        dt_bias=(0.5 * torch.randn(h)).to(dtype) if dt_bias else None,
        initial_state=torch.randn(b, h, p, n, dtype=dtype) if initial_state else None,
        dt_softplus=dt_softplus,
    )


def scan_inputs(b=2, d=5, l=7, n=3, *, D=True, z=True, delta_bias=True, delta_softplus=True, dtype=F64):
    """Random Mamba1 inputs (per-channel A < 0). Returns a kwargs dict for selective_scan."""
    delta = torch.randn(b, d, l) if delta_softplus else torch.rand(b, d, l) + 0.05
    return dict(
        u=torch.randn(b, d, l, dtype=dtype),
        delta=delta.to(dtype),
        A=-torch.exp(0.5 * torch.randn(d, n)).to(dtype),
        B=torch.randn(b, n, l, dtype=dtype),
        C=torch.randn(b, n, l, dtype=dtype),
        D=torch.randn(d, dtype=dtype) if D else None,
        z=torch.randn(b, d, l, dtype=dtype) if z else None,
        delta_bias=(0.5 * torch.randn(d)).to(dtype) if delta_bias else None,
        delta_softplus=delta_softplus,
    )


def update_inputs(b=2, h=6, p=5, g=2, n=3, *, D=True, z=True, dt_bias=True, dtype=F64):
    """Random inputs for selective_state_update in the Mamba2 layout (A/dt/D/dt_bias stride 0 over p)."""
    return dict(
        state=torch.randn(b, h, p, n, dtype=dtype),
        x=torch.randn(b, h, p, dtype=dtype),
        dt=torch.randn(b, h, dtype=dtype)[..., None].expand(b, h, p),
        A=-torch.exp(0.5 * torch.randn(h)).to(dtype)[:, None, None].expand(h, p, n),
        B=torch.randn(b, g, n, dtype=dtype),
        C=torch.randn(b, g, n, dtype=dtype),
        D=torch.randn(h, dtype=dtype)[:, None].expand(h, p) if D else None,
        z=torch.randn(b, h, p, dtype=dtype) if z else None,
        dt_bias=(0.5 * torch.randn(h)).to(dtype)[:, None].expand(h, p) if dt_bias else None,
        dt_softplus=True,
    )


# ---- ssd_chunk_scan vs the recurrence -------------------------------------------------------------

@pytest.mark.parametrize("D,dt_bias,initial_state", list(itertools.product([False, True], repeat=3)))
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("seqlen", [1, 7, 17])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_ssd_chunk_scan_matches_recurrence(chunk_size, seqlen, groups, D, dt_bias, initial_state):
    kw = ssd_inputs(l=seqlen, g=groups, D=D, dt_bias=dt_bias, initial_state=initial_state)
    y, final_state = ssd_chunk_scan(**kw, chunk_size=chunk_size, return_final_state=True)
    y_exp, state_exp = naive_ssd(**kw)
    assert y.shape == y_exp.shape and y.dtype == F64
    assert final_state.shape == state_exp.shape and final_state.dtype == F64
    assert rel_err(y, y_exp) < 1e-12
    assert rel_err(final_state, state_exp) < 1e-12


@pytest.mark.parametrize("chunk_size", [4, 256])
def test_ssd_chunk_scan_without_softplus(chunk_size):
    kw = ssd_inputs(l=11, g=3, dt_softplus=False)
    y, final_state = ssd_chunk_scan(**kw, chunk_size=chunk_size, return_final_state=True)
    y_exp, state_exp = naive_ssd(**kw)
    assert rel_err(y, y_exp) < 1e-12
    assert rel_err(final_state, state_exp) < 1e-12


def test_ssd_chunk_scan_default_returns_y_only():
    kw = ssd_inputs(l=5)
    y = ssd_chunk_scan(**kw)
    assert isinstance(y, torch.Tensor)
    assert rel_err(y, naive_ssd(**kw)[0]) < 1e-12


def test_ssd_chunk_scan_initial_state_splits_sequence():
    """Scanning [a; b] equals scanning b from the final state of a."""
    kw = ssd_inputs(l=13, g=2)
    y, final = ssd_chunk_scan(**kw, chunk_size=4, return_final_state=True)
    first = {k: (v[:, :6] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()}
    second = {k: (v[:, 6:] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()}
    y1, s1 = ssd_chunk_scan(**first, chunk_size=4, return_final_state=True)
    second["initial_state"] = s1
    y2, s2 = ssd_chunk_scan(**second, chunk_size=4, return_final_state=True)
    assert rel_err(torch.cat([y1, y2], dim=1), y) < 1e-12
    assert rel_err(s2, final) < 1e-12


# ---- selective_scan vs the recurrence --------------------------------------------------------------

@pytest.mark.parametrize("D,z,delta_bias,delta_softplus", list(itertools.product([False, True], repeat=4)))
@pytest.mark.parametrize("seqlen", [1, 9])
def test_selective_scan_matches_recurrence(seqlen, D, z, delta_bias, delta_softplus):
    kw = scan_inputs(l=seqlen, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    out, last_state = selective_scan(**kw, return_last_state=True)
    out_exp, state_exp = naive_selective_scan(**kw)
    assert out.shape == out_exp.shape and out.dtype == F64
    assert last_state.shape == state_exp.shape
    assert rel_err(out, out_exp) < 1e-12
    assert rel_err(last_state, state_exp) < 1e-12
    assert isinstance(selective_scan(**kw), torch.Tensor)  # default: out only


# ---- selective_state_update -------------------------------------------------------------------------

@pytest.mark.parametrize("D,dt_bias", [(False, False), (True, True)])
@pytest.mark.parametrize("groups", [1, 3])
def test_state_update_mamba2_steps_equal_ssd_scan(groups, D, dt_bias):
    b, l, h, p, n = 2, 9, 6, 5, 4
    kw = ssd_inputs(b=b, l=l, h=h, p=p, g=groups, n=n, D=D, dt_bias=dt_bias)
    y_exp, state_exp = ssd_chunk_scan(**kw, chunk_size=4, return_final_state=True)

    state = kw["initial_state"].clone()
    ptr = state.data_ptr()
    A = kw["A"][:, None, None].expand(h, p, n)
    Dp = kw["D"][:, None].expand(h, p) if D else None
    dt_bias_p = kw["dt_bias"][:, None].expand(h, p) if dt_bias else None
    ys = []
    for t in range(l):
        dt = kw["dt"][:, t, :, None].expand(b, h, p)
        assert dt.stride(-1) == 0 and A.stride(-2) == 0
        ys.append(selective_state_update(state, kw["x"][:, t], dt, A, kw["B"][:, t], kw["C"][:, t],
                                         D=Dp, dt_bias=dt_bias_p, dt_softplus=True))
    y = torch.stack(ys, dim=1)
    assert y.dtype == F64 and y.shape == (b, l, h, p)
    assert state.data_ptr() == ptr  # updated in place
    assert rel_err(y, y_exp) < 1e-12
    assert rel_err(state, state_exp) < 1e-12


@pytest.mark.parametrize("D,z,delta_bias,softplus", [(False, False, False, True), (True, True, True, True),
                                                     (True, False, True, True), (True, True, False, False)])
def test_state_update_mamba1_steps_equal_selective_scan(D, z, delta_bias, softplus):
    b, d, l, n = 2, 7, 6, 3
    kw = scan_inputs(b=b, d=d, l=l, n=n, D=D, z=z, delta_bias=delta_bias, delta_softplus=softplus)
    out_exp, state_exp = selective_scan(**kw, return_last_state=True)

    state = torch.zeros(b, 1, d, n, dtype=F64)
    ptr = state.data_ptr()
    ys = []
    for t in range(l):
        ys.append(selective_state_update(
            state, kw["u"][:, None, :, t], kw["delta"][:, None, :, t], kw["A"][None], kw["B"][:, None, :, t],
            kw["C"][:, None, :, t], D=kw["D"][None] if D else None, z=kw["z"][:, None, :, t] if z else None,
            dt_bias=kw["delta_bias"][None] if delta_bias else None, dt_softplus=softplus))
    out = torch.stack(ys, dim=-1)[:, 0]  # (b, d, l)
    assert state.data_ptr() == ptr
    assert rel_err(out, out_exp) < 1e-12
    assert rel_err(state[:, 0], state_exp) < 1e-12


def test_state_update_in_place_and_single_step_formula():
    kw = update_inputs()
    state0 = kw["state"].clone()
    storage = kw["state"].untyped_storage().data_ptr()
    out = selective_state_update(**kw)
    assert kw["state"].untyped_storage().data_ptr() == storage
    assert not torch.equal(kw["state"], state0)
    # one step of the naive recurrence
    h, g = kw["x"].shape[1], kw["B"].shape[1]
    heads = torch.arange(h) // (h // g)
    dt = softplus(kw["dt"] + kw["dt_bias"])[..., None]                       # (b, h, p, 1)
    Bh, Ch = kw["B"][:, heads, None, :], kw["C"][:, heads, None, :]          # (b, h, 1, n)
    state_exp = torch.exp(dt * kw["A"]) * state0 + dt * kw["x"][..., None] * Bh
    y_exp = ((state_exp * Ch).sum(-1) + kw["D"] * kw["x"]) * torch.nn.functional.silu(kw["z"])
    assert rel_err(kw["state"], state_exp) < 1e-12
    assert rel_err(out, y_exp) < 1e-12


def test_state_update_writes_through_a_cache_view():
    """The state may be a non-contiguous view into a larger cache (e.g. one slot per layer)."""
    kw = update_inputs()
    b, h, p, n = kw["state"].shape
    cache = torch.randn(b, 3, h, p, n, dtype=F64)
    kw["state"] = cache[:, 1]
    assert not kw["state"].is_contiguous()
    expected_state = cache[:, 1].clone()
    out_exp = selective_state_update(**{**kw, "state": expected_state})
    others = cache[:, [0, 2]].clone()
    out = selective_state_update(**kw)
    assert torch.equal(out, out_exp)
    assert torch.equal(cache[:, 1], expected_state)
    assert torch.equal(cache[:, [0, 2]], others)


def test_state_update_float32_state_float32_inputs():
    kw = update_inputs(dtype=torch.float32)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    state = kw["state"]
    out = selective_state_update(**kw)
    out64 = selective_state_update(**kw64)
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert rel_err(out, out64) < 1e-5
    assert rel_err(state, kw64["state"]) < 1e-5


def test_state_update_bf16_inputs_float32_state():
    kw = update_inputs(dtype=torch.bfloat16)
    kw["state"] = kw["state"].float()
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = selective_state_update(**kw)
    out64 = selective_state_update(**kw64)
    assert out.dtype == torch.bfloat16 and kw["state"].dtype == torch.float32
    assert rel_err(out, out64) < 2e-2
    assert rel_err(kw["state"], kw64["state"]) < 1e-5


# ---- gradients ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("optionals", [True, False])
@pytest.mark.parametrize("dt_softplus", [True, False])
def test_ssd_chunk_scan_gradcheck(optionals, dt_softplus):
    kw = ssd_inputs(b=2, l=5, h=2, p=2, g=2, n=2, D=optionals, dt_bias=optionals, initial_state=optionals,
                    dt_softplus=dt_softplus)
    names = [k for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state") if kw[k] is not None]
    leaves = [kw[k].clone().requires_grad_() for k in names]

    def fn(*tensors):
        return ssd_chunk_scan(**{**kw, **dict(zip(names, tensors))}, chunk_size=2, return_final_state=True)

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("optionals", [True, False])
@pytest.mark.parametrize("delta_softplus", [True, False])
def test_selective_scan_gradcheck(optionals, delta_softplus):
    kw = scan_inputs(b=2, d=3, l=4, n=2, D=optionals, z=optionals, delta_bias=optionals,
                     delta_softplus=delta_softplus)
    names = [k for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias") if kw[k] is not None]
    leaves = [kw[k].clone().requires_grad_() for k in names]

    def fn(*tensors):
        return selective_scan(**{**kw, **dict(zip(names, tensors))}, return_last_state=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_ssd_chunk_scan_grad_of_y_only():
    """Backward when final_state is not used (its gradient is absent/zero)."""
    kw = ssd_inputs(l=5, h=2, p=2, n=2)
    x = kw.pop("x").requires_grad_()
    ssd_chunk_scan(x, **kw, chunk_size=2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    y_exp, _ = naive_ssd(x2, **kw)
    y_exp.sum().backward()
    assert rel_err(x.grad, x2.grad) < 1e-12


# ---- opcheck -------------------------------------------------------------------------------------------

def _ssd_args(kw, chunk_size, requires_grad):
    args = [kw[k] for k in ("x", "dt", "A", "B", "C")] + [chunk_size, kw["D"], kw["dt_bias"], kw["dt_softplus"],
                                                          kw["initial_state"]]
    return [a.requires_grad_() if requires_grad and isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("optionals,requires_grad,chunk_size", [(False, False, 4), (True, True, 3),
                                                                 (True, False, 16)])
def test_ssd_chunk_scan_opcheck(optionals, requires_grad, chunk_size):
    kw = ssd_inputs(l=7, h=4, p=3, g=2, n=2, D=optionals, dt_bias=optionals, initial_state=optionals)
    torch.library.opcheck(OPS.ssd_chunk_scan.default, _ssd_args(kw, chunk_size, requires_grad))


@pytest.mark.parametrize("optionals,requires_grad", [(False, False), (True, True), (True, False)])
def test_selective_scan_opcheck(optionals, requires_grad):
    kw = scan_inputs(d=3, l=5, n=2, D=optionals, z=optionals, delta_bias=optionals)
    args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")]
    args = [a.requires_grad_() if requires_grad and isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(OPS.selective_scan.default, args)


@pytest.mark.parametrize("optionals", [False, True])
def test_selective_state_update_opcheck(optionals):
    kw = update_inputs(D=optionals, z=optionals, dt_bias=optionals)
    args = [kw[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus")]
    torch.library.opcheck(OPS.selective_state_update.default, args)


# ---- dtypes --------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _to64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_chunk_scan_dtypes(dtype):
    kw = ssd_inputs(l=17, g=2, dtype=dtype)
    y, final_state = ssd_chunk_scan(**kw, chunk_size=8, return_final_state=True)
    y64, state64 = ssd_chunk_scan(**_to64(kw), chunk_size=8, return_final_state=True)
    assert y.dtype == dtype
    assert final_state.dtype == torch.float32  # states are kept in float32
    assert rel_err(y, y64) < TOL[dtype]
    assert rel_err(final_state, state64) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_dtypes(dtype):
    kw = scan_inputs(l=9, dtype=dtype)
    out, last_state = selective_scan(**kw, return_last_state=True)
    out64, state64 = selective_scan(**_to64(kw), return_last_state=True)
    assert out.dtype == dtype
    assert last_state.dtype == torch.float32
    assert rel_err(out, out64) < TOL[dtype]
    assert rel_err(last_state, state64) < 1e-5


# ---- bad inputs ----------------------------------------------------------------------------------------

META = torch.device("meta")


def _int(t):
    return torch.ones(t.shape, dtype=torch.int32)


SSD_BAD = {
    "x 3-D": (lambda kw: kw.update(x=kw["x"][0]), "x"),
    "dt 4-D": (lambda kw: kw.update(dt=kw["dt"][..., None]), "dt"),
    "A 2-D": (lambda kw: kw.update(A=kw["A"][None]), "A"),
    "B 3-D": (lambda kw: kw.update(B=kw["B"][0]), "B"),
    "C 3-D": (lambda kw: kw.update(C=kw["C"][0]), "C"),
    "D 2-D": (lambda kw: kw.update(D=kw["D"][None]), "D"),
    "dt_bias 2-D": (lambda kw: kw.update(dt_bias=kw["dt_bias"][None]), "dt_bias"),
    "initial_state 3-D": (lambda kw: kw.update(initial_state=kw["initial_state"][0]), "initial_state"),
    "dt batch": (lambda kw: kw.update(dt=kw["dt"][:1]), "dt"),
    "B batch": (lambda kw: kw.update(B=kw["B"][:1]), "B"),
    "C batch": (lambda kw: kw.update(C=kw["C"][:1]), "C"),
    "initial_state batch": (lambda kw: kw.update(initial_state=kw["initial_state"][:1]), "initial_state"),
    "dt seqlen": (lambda kw: kw.update(dt=kw["dt"][:, :3]), "dt"),
    "A heads": (lambda kw: kw.update(A=kw["A"][:4]), "A"),
    "initial_state headdim": (lambda kw: kw.update(initial_state=kw["initial_state"][:, :, :2]),
                              "initial_state"),
    "C groups differ from B": (lambda kw: kw.update(C=kw["C"].repeat(1, 1, 3, 1)), "C"),
    "C d_state differs from B": (lambda kw: kw.update(C=kw["C"][..., :2]), "C"),
    "heads not multiple of groups": (lambda kw: kw.update(B=torch.randn(2, 7, 4, 3), C=torch.randn(2, 7, 4, 3)),
                                     "groups"),
    "chunk_size 0": (lambda kw: kw.update(chunk_size=0), "chunk_size"),
    "chunk_size negative": (lambda kw: kw.update(chunk_size=-4), "chunk_size"),
    "chunk_size float": (lambda kw: kw.update(chunk_size=4.0), "chunk_size"),
    **{f"{k} integer": ((lambda k: lambda kw: kw.update({k: _int(kw[k])}))(k), k)
       for k in ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")},
    **{f"{k} on meta": ((lambda k: lambda kw: kw.update({k: kw[k].to(META)}))(k), k)
       for k in ("dt", "A", "B", "C", "D", "dt_bias", "initial_state")},
}


@pytest.mark.parametrize("case", list(SSD_BAD))
def test_ssd_chunk_scan_bad_input(case):
    modify, name = SSD_BAD[case]
    kw = ssd_inputs(l=7, h=6, g=2)
    kw["chunk_size"] = 4
    ssd_chunk_scan(**kw)  # valid as generated
    modify(kw)
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        ssd_chunk_scan(**kw)


SCAN_BAD = {
    "u 2-D": (lambda kw: kw.update(u=kw["u"][0]), "u"),
    "delta 2-D": (lambda kw: kw.update(delta=kw["delta"][0]), "delta"),
    "A 1-D": (lambda kw: kw.update(A=kw["A"][:, 0]), "A"),
    "B 2-D": (lambda kw: kw.update(B=kw["B"][0]), "B"),
    "D 2-D": (lambda kw: kw.update(D=kw["D"][None]), "D"),
    "delta batch": (lambda kw: kw.update(delta=kw["delta"][:1]), "delta"),
    "B batch": (lambda kw: kw.update(B=kw["B"][:1]), "B"),
    "C batch": (lambda kw: kw.update(C=kw["C"][:1]), "C"),
    "z batch": (lambda kw: kw.update(z=kw["z"][:1]), "z"),
    "A channels": (lambda kw: kw.update(A=kw["A"][:2]), "A"),
    "B d_state": (lambda kw: kw.update(B=kw["B"][:, :2]), "B"),
    "C seqlen": (lambda kw: kw.update(C=kw["C"][..., :3]), "C"),
    "delta_bias channels": (lambda kw: kw.update(delta_bias=kw["delta_bias"][:2]), "delta_bias"),
    **{f"{k} integer": ((lambda k: lambda kw: kw.update({k: _int(kw[k])}))(k), k)
       for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")},
    **{f"{k} on meta": ((lambda k: lambda kw: kw.update({k: kw[k].to(META)}))(k), k)
       for k in ("delta", "A", "B", "C", "D", "z", "delta_bias")},
}


@pytest.mark.parametrize("case", list(SCAN_BAD))
def test_selective_scan_bad_input(case):
    modify, name = SCAN_BAD[case]
    kw = scan_inputs(l=5)
    selective_scan(**kw)
    modify(kw)
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        selective_scan(**kw)


UPDATE_BAD = {
    "state 3-D": (lambda kw: kw.update(state=kw["state"][0]), "state"),
    "x 2-D": (lambda kw: kw.update(x=kw["x"][0]), "x"),
    "dt 2-D (not expanded over headdim)": (lambda kw: kw.update(dt=kw["dt"][..., 0]), "dt"),
    "A 1-D (not expanded)": (lambda kw: kw.update(A=kw["A"][:, 0, 0]), "A"),
    "B 2-D": (lambda kw: kw.update(B=kw["B"][0]), "B"),
    "D 1-D": (lambda kw: kw.update(D=kw["D"][:, 0]), "D"),
    "x batch": (lambda kw: kw.update(x=kw["x"][:1]), "x"),
    "B batch": (lambda kw: kw.update(B=kw["B"][:1]), "B"),
    "C batch": (lambda kw: kw.update(C=kw["C"][:1]), "C"),
    "z batch": (lambda kw: kw.update(z=kw["z"][:1]), "z"),
    "C groups differ from B": (lambda kw: kw.update(C=kw["C"][:, :1]), "C"),
    "heads not multiple of groups": (lambda kw: kw.update(B=torch.randn(2, 4, 3), C=torch.randn(2, 4, 3)),
                                     "groups"),
    **{f"{k} integer": ((lambda k: lambda kw: kw.update({k: _int(kw[k])}))(k), k)
       for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")},
    **{f"{k} on meta": ((lambda k: lambda kw: kw.update({k: kw[k].to(META)}))(k), k)
       for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")},
}


@pytest.mark.parametrize("case", list(UPDATE_BAD))
def test_selective_state_update_bad_input(case):
    modify, name = UPDATE_BAD[case]
    kw = update_inputs(h=6, g=2)
    selective_state_update(**{**kw, "state": kw["state"].clone()})
    modify(kw)
    state_before = kw["state"].clone() if kw["state"].dtype.is_floating_point else None
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        selective_state_update(**kw)
    if state_before is not None and kw["state"].device == state_before.device:
        assert torch.equal(kw["state"], state_before)  # a rejected call leaves the state alone


# ---- Triton backend of selective_state_update ------------------------------------------------------

from aim_kernels import _ext, _triton, ssm  # noqa: E402


def mamba1_update_inputs(b, d, n, dtype, device="cpu"):
    """Mamba1's layout: one head of headdim d, per-channel A (1, d, n), dt/D/dt_bias per channel."""
    f = dict(dtype=torch.float32, device=device)
    return dict(state=torch.randn(b, 1, d, n, **f), x=torch.randn(b, 1, d, **f).to(dtype),
                dt=(0.5 * torch.randn(b, 1, d, **f) - 3).to(dtype),
                A=-torch.arange(1, n + 1, **f).repeat(1, d, 1), B=torch.randn(b, 1, n, **f).to(dtype),
                C=torch.randn(b, 1, n, **f).to(dtype), D=torch.randn(1, d, **f), z=torch.randn(b, 1, d, **f).to(dtype),
                dt_bias=(0.1 * torch.randn(1, d, **f)), dt_softplus=True)


def check_state_update_triton(kw, tol, device):
    """The Triton path (interpreter on CPU, the registered op on CUDA) vs float64 on the same inputs,
    with the output buffer poisoned."""
    ref = {k: (v.detach().double().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out_ref = ssm.selective_state_update_ref(**ref)
    if device == "cpu":
        out = ssm.selective_state_update_triton(**kw)
    else:
        assert _ext.backend_for(ssm._selective_state_update, *kw.values()) == "triton"
        out = selective_state_update(**kw)
    assert out.dtype == kw["x"].dtype and not out.isnan().any()
    assert rel_err(out.cpu(), out_ref) < tol
    assert rel_err(kw["state"].cpu(), ref["state"]) < (1e-5 if kw["state"].dtype == torch.float32 else 1e-2)


@pytest.fixture
def poisoned_state_update_out(monkeypatch):
    alloc = ssm._alloc_state_update_out
    monkeypatch.setattr(ssm, "_alloc_state_update_out", lambda x: alloc(x).fill_(float("nan")))


# (layout, b, dims, dtype, optionals)
STATE_UPDATE_CASES = [("mamba1", 3, (40, 16), torch.float32, True), ("mamba1", 1, (300, 16), torch.float32, True),
                      ("mamba1", 2, (24, 5), torch.float16, True), ("mamba2", 2, (6, 5, 2, 3), torch.float32, True),
                      ("mamba2", 3, (4, 16, 1, 32), torch.float32, False),
                      ("mamba2", 1, (2, 8, 2, 16), torch.float16, True)]


@pytest.mark.parametrize("case", STATE_UPDATE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_state_update_triton_interpreter(case, poisoned_state_update_out):
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    layout, b, dims, dtype, optionals = case
    if layout == "mamba1":
        kw = mamba1_update_inputs(b, *dims, dtype)
    else:
        h, p, g, n = dims
        kw = update_inputs(b, h, p, g, n, D=optionals, z=optionals, dt_bias=optionals, dtype=torch.float32)
        kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k != "state" else v) for k, v in kw.items()}
    check_state_update_triton(kw, 1e-5 if dtype == torch.float32 else 2e-3, "cpu")


def test_state_update_triton_nan_fails():
    if not _triton.interpreting():
        pytest.skip("CPU Triton tests need TRITON_INTERPRET=1")
    kw = mamba1_update_inputs(1, 8, 4, torch.float32)
    kw["x"][0, 0, 3] = float("nan")
    with pytest.raises(AssertionError):
        check_state_update_triton(kw, 1e-5, "cpu")


def test_state_update_not_supported_reasons():
    kw = mamba1_update_inputs(1, 8, 4, torch.float32)
    assert "float64" in " ".join(ssm.state_update_not_supported_reasons(**{**kw, "x": kw["x"].double()}))
    assert "state is torch.float16" in " ".join(ssm.state_update_not_supported_reasons(
        **{**kw, "state": kw["state"].half()}))


@pytest.mark.gpu
@pytest.mark.parametrize("b,d,n", [(2, 1536, 16), (128, 2048, 16), (5, 999, 7)])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.bfloat16, torch.bfloat16)])
def test_state_update_triton_gpu_mamba1(b, d, n, dtype, state_dtype, poisoned_state_update_out):
    kw = mamba1_update_inputs(b, d, n, dtype, "cuda")
    kw["state"] = kw["state"].to(state_dtype)
    check_state_update_triton(kw, 1e-5 if dtype == torch.float32 else 2e-2, "cuda")


@pytest.mark.gpu
def test_state_update_triton_gpu_mamba2_broadcast(poisoned_state_update_out):
    kw = update_inputs(64, 48, 64, 1, 128, dtype=torch.float32)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    check_state_update_triton(kw, 1e-5, "cuda")
