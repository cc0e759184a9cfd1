"""Tests for the RMSNorm family (aim_kernels/norm.py) against naive float64 formulas.

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w, eps 1e-5 by default; modulate(x) = x * (1 + scale) + shift
with shift/scale (batch, dim) broadcast over the sequence axis.
"""
import math

import pytest
import torch

from aim_kernels import adaln_modulate, add_rmsnorm, add_rmsnorm_modulate, rmsnorm_gated

F64 = torch.float64
OPS = torch.ops.aim_kernels
EPS = 1e-5
BATCH, SEQ, DIM = 3, 7, 20

# x shapes: (batch, seq, dim) for prefill / training, (batch, dim) for one decoding step
SHAPES = [(BATCH, SEQ, DIM), (BATCH, DIM)]


def rel_err(out: torch.Tensor, exp: torch.Tensor) -> float:
    err = ((out.double() - exp.double()).abs().max() / exp.double().abs().max().clamp_min(1e-300)).item()
    return err if math.isfinite(err) else float("inf")


def naive_rmsnorm(x, w, eps=EPS):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w.double()


def naive_modulate(x, shift, scale):
    mid = (1,) * (x.dim() - 2)
    shift = shift.double().reshape(shift.shape[0], *mid, shift.shape[1])
    scale = scale.double().reshape(scale.shape[0], *mid, scale.shape[1])
    return x.double() * (1 + scale) + shift


def naive_rmsnorm_gated(x, z, w, group_size, eps=EPS):
    h = x.double()
    if z is not None:
        z = z.double()
        h = h * z * torch.sigmoid(z)
    groups = [naive_rmsnorm(chunk, torch.ones(chunk.shape[-1], dtype=F64), eps)
              for chunk in h.split(group_size, dim=-1)]
    return torch.cat(groups, dim=-1) * w.double()


def inputs(shape, dtype=F64):
    x = torch.randn(shape, dtype=dtype)
    return dict(x=x, residual=torch.randn(shape, dtype=dtype), weight=(1 + 0.3 * torch.randn(DIM)).to(dtype),
                shift=torch.randn(shape[0], DIM, dtype=dtype), scale=(0.5 * torch.randn(shape[0], DIM)).to(dtype),
                z=torch.randn(shape, dtype=dtype))


# ---- values vs naive formulas --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("group_size", [DIM, DIM // 4, None])
def test_rmsnorm_gated(group_size, with_z, shape):
    kw = inputs(shape)
    z = kw["z"] if with_z else None
    out = rmsnorm_gated(kw["x"], z, kw["weight"], group_size=group_size)  # default eps 1e-5
    exp = naive_rmsnorm_gated(kw["x"], z, kw["weight"], group_size or DIM)
    assert out.dtype == F64 and out.shape == kw["x"].shape
    assert rel_err(out, exp) < 1e-12


def test_rmsnorm_gated_groups_are_independent():
    """With group_size dim/4, scaling one group of x leaves the other groups' outputs unchanged."""
    kw = inputs((BATCH, DIM))
    g = DIM // 4
    out = rmsnorm_gated(kw["x"], None, kw["weight"], group_size=g)
    x2 = kw["x"].clone()
    x2[:, :g] *= 10
    out2 = rmsnorm_gated(x2, None, kw["weight"], group_size=g)
    assert torch.allclose(out[:, g:], out2[:, g:], rtol=1e-13, atol=0)
    full = rmsnorm_gated(x2, None, kw["weight"])  # one group over all channels: every output changes
    assert (full[:, g:] - out[:, g:]).abs().max() > 0.1


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rmsnorm_gated_eps(eps):
    kw = inputs((BATCH, DIM))
    out = rmsnorm_gated(kw["x"], kw["z"], kw["weight"], eps=eps, group_size=5)
    assert rel_err(out, naive_rmsnorm_gated(kw["x"], kw["z"], kw["weight"], 5, eps)) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm(with_residual, shape):
    kw = inputs(shape)
    residual = kw["residual"] if with_residual else None
    out, res_out = add_rmsnorm(kw["x"], residual, kw["weight"])
    res_exp = kw["x"] + residual if with_residual else kw["x"]
    assert out.dtype == F64 and res_out.dtype == F64
    assert rel_err(res_out, res_exp) < 1e-15
    assert rel_err(out, naive_rmsnorm(res_exp, kw["weight"])) < 1e-12
    if not with_residual:
        assert res_out.data_ptr() != kw["x"].data_ptr()  # a fresh tensor, not an alias of x


@pytest.mark.parametrize("shape", SHAPES)
def test_adaln_modulate(shape):
    kw = inputs(shape)
    out = adaln_modulate(kw["x"], kw["shift"], kw["scale"])
    assert out.dtype == F64 and out.shape == kw["x"].shape
    assert rel_err(out, naive_modulate(kw["x"], kw["shift"], kw["scale"])) < 1e-14


def test_adaln_modulate_uses_each_rows_conditioning():
    """shift/scale row i applies to batch row i at every sequence position."""
    kw = inputs((BATCH, SEQ, DIM))
    out = adaln_modulate(kw["x"], kw["shift"], kw["scale"])
    for i in range(BATCH):
        for t in range(SEQ):
            exp = kw["x"][i, t] * (1 + kw["scale"][i]) + kw["shift"][i]
            assert torch.allclose(out[i, t], exp, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_modulate(with_residual, shape):
    kw = inputs(shape)
    residual = kw["residual"] if with_residual else None
    out, res_out = add_rmsnorm_modulate(kw["x"], residual, kw["weight"], kw["shift"], kw["scale"])
    res_exp = kw["x"] + residual if with_residual else kw["x"]
    exp = naive_modulate(naive_rmsnorm(res_exp, kw["weight"]), kw["shift"], kw["scale"])
    assert out.dtype == F64 and res_out.dtype == F64
    assert rel_err(res_out, res_exp) < 1e-15
    assert rel_err(out, exp) < 1e-12
    # the fused op equals the composition of the unfused ones
    out2, res2 = add_rmsnorm(kw["x"], residual, kw["weight"])
    assert rel_err(out, adaln_modulate(out2, kw["shift"], kw["scale"])) < 1e-13
    assert torch.equal(res_out, res2)


# ---- dtypes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,res_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                             (torch.float64, torch.float64)])
@pytest.mark.parametrize("residual_dtype", ["same", "float32", None])
def test_add_rmsnorm_dtypes(dtype, res_dtype, residual_dtype):
    kw = inputs((BATCH, SEQ, DIM), dtype)
    if residual_dtype is None:
        residual = None
    else:
        residual = kw["residual"] if residual_dtype == "same" else kw["residual"].float()
    want_res = torch.float64 if (residual is not None and residual.dtype == F64) else res_dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    res_exp = kw["x"].double() + (0 if residual is None else residual.double())
    for out, res_out in (add_rmsnorm(kw["x"], residual, kw["weight"]),
                         add_rmsnorm_modulate(kw["x"], residual, kw["weight"], kw["shift"], kw["scale"])):
        assert out.dtype == dtype
        assert res_out.dtype == want_res
        assert rel_err(res_out, res_exp) < 1e-6  # the residual stream is not rounded to x's dtype
    out, _ = add_rmsnorm_modulate(kw["x"], residual, kw["weight"], kw["shift"], kw["scale"])
    exp = naive_modulate(naive_rmsnorm(res_exp, kw["weight"]), kw["shift"], kw["scale"])
    assert rel_err(out, exp) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_gated_and_modulate_dtypes(dtype):
    kw = inputs((BATCH, SEQ, DIM), dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    out = rmsnorm_gated(kw["x"], kw["z"], kw["weight"], group_size=5)
    assert out.dtype == dtype
    assert rel_err(out, naive_rmsnorm_gated(kw["x"], kw["z"], kw["weight"], 5)) < tol
    out = adaln_modulate(kw["x"], kw["shift"], kw["scale"])
    assert out.dtype == dtype
    assert rel_err(out, naive_modulate(kw["x"], kw["shift"], kw["scale"])) < tol


# ---- gradients -------------------------------------------------------------------------------------------

def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("with_z", [True, False])
def test_rmsnorm_gated_gradcheck(with_z):
    kw = inputs((2, 3, 8))
    kw["weight"] = torch.randn(8, dtype=F64)
    leaves = _leaves(kw["x"], kw["weight"], *([kw["z"][..., :8]] if with_z else []))
    fn = (lambda x, w, z: rmsnorm_gated(x, z, w, group_size=4)) if with_z else \
        (lambda x, w: rmsnorm_gated(x, None, w, group_size=4))
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_gradcheck(with_residual):
    x, r = torch.randn(2, 3, 8, dtype=F64), torch.randn(2, 3, 8, dtype=F64)
    w = torch.randn(8, dtype=F64)
    if with_residual:
        assert torch.autograd.gradcheck(lambda x, r, w: add_rmsnorm(x, r, w), _leaves(x, r, w))
    else:
        assert torch.autograd.gradcheck(lambda x, w: add_rmsnorm(x, None, w), _leaves(x, w))


@pytest.mark.parametrize("shape", [(2, 3, 8), (2, 8)])
def test_adaln_modulate_gradcheck(shape):
    x, shift, scale = torch.randn(shape, dtype=F64), torch.randn(2, 8, dtype=F64), torch.randn(2, 8, dtype=F64)
    assert torch.autograd.gradcheck(adaln_modulate, _leaves(x, shift, scale))


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rmsnorm_modulate_gradcheck(with_residual):
    x, r = torch.randn(2, 3, 8, dtype=F64), torch.randn(2, 3, 8, dtype=F64)
    w, shift, scale = torch.randn(8, dtype=F64), torch.randn(2, 8, dtype=F64), torch.randn(2, 8, dtype=F64)
    if with_residual:
        fn, leaves = add_rmsnorm_modulate, _leaves(x, r, w, shift, scale)
    else:
        fn, leaves = (lambda x, w, s, c: add_rmsnorm_modulate(x, None, w, s, c)), _leaves(x, w, shift, scale)
    assert torch.autograd.gradcheck(fn, leaves)


def test_add_rmsnorm_residual_output_gradient_flows():
    """A loss on the residual output alone differentiates through to x and residual."""
    x, r = _leaves(torch.randn(2, 3, 8, dtype=F64), torch.randn(2, 3, 8, dtype=F64))
    w = torch.randn(8, dtype=F64)
    _, res = add_rmsnorm(x, r, w)
    (res * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0)) and torch.equal(r.grad, torch.full_like(r, 3.0))


# ---- opcheck ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("with_z", [True, False])
def test_rmsnorm_gated_opcheck(with_z, requires_grad):
    kw = inputs((BATCH, SEQ, DIM))
    args = [kw["x"], kw["z"] if with_z else None, kw["weight"]]
    args = [a.requires_grad_(requires_grad) if a is not None else None for a in args]
    torch.library.opcheck(OPS.rmsnorm_gated.default, (*args, 1e-5, 5))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("modulate", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_add_rmsnorm_modulate_opcheck(dtype, with_residual, modulate, requires_grad):
    kw = inputs((BATCH, SEQ, DIM), dtype)
    args = [kw["x"], kw["residual"].float() if with_residual else None, kw["weight"],
            kw["shift"] if modulate else None, kw["scale"] if modulate else None]
    args = [a.requires_grad_(requires_grad) if a is not None else None for a in args]
    torch.library.opcheck(OPS.add_rmsnorm_modulate.default, (*args, 1e-5, None))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_adaln_modulate_opcheck(shape, requires_grad):
    kw = inputs(shape)
    args = [kw[k].requires_grad_(requires_grad) for k in ("x", "shift", "scale")]
    torch.library.opcheck(OPS.adaln_modulate.default, args)


# ---- bad inputs ------------------------------------------------------------------------------------------

def _call(fn_name, kw):
    if fn_name == "rmsnorm_gated":
        return rmsnorm_gated(kw["x"], kw["z"], kw["weight"], group_size=kw.get("group_size"))
    if fn_name == "add_rmsnorm":
        return add_rmsnorm(kw["x"], kw["residual"], kw["weight"])
    if fn_name == "adaln_modulate":
        return adaln_modulate(kw["x"], kw["shift"], kw["scale"])
    return add_rmsnorm_modulate(kw["x"], kw["residual"], kw["weight"], kw["shift"], kw["scale"])


BAD = [
    ("rmsnorm_gated", "group_size 7 does not divide 20", dict(group_size=7), "group_size"),
    ("rmsnorm_gated", "group_size 0", dict(group_size=0), "group_size"),
    ("rmsnorm_gated", "group_size > dim", dict(group_size=40), "group_size"),
    ("rmsnorm_gated", "z shape", dict(z=torch.randn(BATCH, SEQ, DIM - 1)), "z"),
    ("rmsnorm_gated", "weight shape", dict(weight=torch.randn(DIM + 1)), "weight"),
    ("rmsnorm_gated", "x 1-D", dict(x=torch.randn(DIM), z=None), "x"),
    ("rmsnorm_gated", "x integer", dict(x=torch.ones(BATCH, SEQ, DIM, dtype=torch.int64), z=None), "x"),
    ("add_rmsnorm", "residual shape", dict(residual=torch.randn(BATCH, SEQ + 1, DIM)), "residual"),
    ("add_rmsnorm", "weight shape", dict(weight=torch.randn(DIM - 2)), "weight"),
    ("add_rmsnorm", "weight on meta", dict(weight=torch.randn(DIM, device="meta")), "weight"),
    ("add_rmsnorm", "x 1-D", dict(x=torch.randn(DIM), residual=None), "x"),
    ("adaln_modulate", "shift 3-D", dict(shift=torch.randn(BATCH, 1, DIM)), "shift"),
    ("adaln_modulate", "scale batch", dict(scale=torch.randn(BATCH + 1, DIM)), "scale"),
    ("adaln_modulate", "scale dim", dict(scale=torch.randn(BATCH, DIM - 1)), "scale"),
    ("adaln_modulate", "shift integer", dict(shift=torch.ones(BATCH, DIM, dtype=torch.int32)), "shift"),
    ("add_rmsnorm_modulate", "residual shape", dict(residual=torch.randn(BATCH, DIM)), "residual"),
    ("add_rmsnorm_modulate", "shift dim", dict(shift=torch.randn(BATCH, DIM + 1)), "shift"),
    ("add_rmsnorm_modulate", "scale batch", dict(scale=torch.randn(1, DIM)), "scale"),
    ("add_rmsnorm_modulate", "weight 2-D", dict(weight=torch.randn(1, DIM)), "weight"),
]


@pytest.mark.parametrize("fn_name,case,changes,name", BAD, ids=[f"{b[0]}: {b[1]}" for b in BAD])
def test_bad_input(fn_name, case, changes, name):
    kw = {k: v.float() for k, v in inputs((BATCH, SEQ, DIM)).items()}
    _call(fn_name, kw)  # valid as generated
    kw.update(changes)
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        _call(fn_name, kw)
