"""RMSNorm family used by an AiM block: the mixer's gated RMSNorm, the residual add + RMSNorm of the
block input, and adaLN modulation x * (1 + scale) + shift, separately and fused.

The residual stream is kept in float32 (float64 for float64 inputs), as the official
`residual_in_fp32=True` does; normalised outputs take x's dtype. shift/scale are (batch, dim) and
broadcast over any middle (sequence) dimensions of x (batch, ..., dim).

Deferred normalisation (`x_mean_sq`): when x is a linear map of a row whose RMSNorm was not applied
(out_proj of the mixer's gated output u = v * weight, v's mean square handed over in parts), x is
first scaled by rsqrt(sum(x_mean_sq) + x_eps) per row: out_proj(RMSNorm(v) * w) = rstd * out_proj(v * w),
and the mixer's norm kernel disappears from the decode step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor, compute_dtype, placeholder_grads, reference_vjp


def _rms(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _broadcast(t: Tensor, x: Tensor) -> Tensor:
    """(batch, dim) -> (batch, 1, ..., 1, dim) to match x (batch, ..., dim)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 2)), t.shape[-1])


def rmsnorm_gated_ref(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: int) -> Tensor:
    """RMSNorm(x * silu(z)) * weight, the statistic taken over groups of `group_size` channels."""
    cd = compute_dtype(x, weight)
    h = x.to(cd)
    if z is not None:
        h = h * F.silu(z.to(cd))
    h = _rms(h.unflatten(-1, (-1, group_size)), eps).flatten(-2)
    return (h * weight.to(cd)).to(x.dtype)


def _residual_add(x: Tensor, x_gate: Optional[Tensor], residual: Optional[Tensor], cd: torch.dtype,
                  x_mean_sq: Optional[Tensor] = None, x_eps: float = 0.0) -> Tensor:
    """x_gate * x * x_rstd + residual in the compute dtype (x_gate (batch, dim) broadcast like shift/scale;
    x_rstd = rsqrt(x_mean_sq.sum(-1) + x_eps) per row of x when x_mean_sq (rows, parts) is given)."""
    r = x.to(cd)
    if x_mean_sq is not None:
        rstd = torch.rsqrt(x_mean_sq.to(cd).sum(-1) + x_eps)
        r = r * rstd.reshape(*x.shape[:-1], 1)
    r = r if x_gate is None else r * _broadcast(x_gate.to(cd), x)
    return r if residual is None else r + residual.to(cd)


def add_rmsnorm_ref(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                    x_gate: Optional[Tensor] = None, x_mean_sq: Optional[Tensor] = None,
                    x_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """residual' = x_gate * x + residual (kept in float32+); returns (RMSNorm(residual') * weight, residual')."""
    cd = compute_dtype(x, residual, weight, x_gate)
    r = _residual_add(x, x_gate, residual, cd, x_mean_sq, x_eps)
    return (_rms(r, eps) * weight.to(cd)).to(x.dtype), r


def adaln_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    cd = compute_dtype(x, shift, scale)
    out = x.to(cd) * (1 + _broadcast(scale.to(cd), x)) + _broadcast(shift.to(cd), x)
    return out.to(x.dtype)


def add_rmsnorm_modulate_ref(x: Tensor, residual: Optional[Tensor], weight: Tensor, shift: Tensor,
                             scale: Tensor, eps: float, x_gate: Optional[Tensor] = None,
                             x_mean_sq: Optional[Tensor] = None, x_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """The block prologue: (gated) residual add, RMSNorm and adaLN modulation, without rounding in between."""
    cd = compute_dtype(x, residual, weight, shift, scale, x_gate)
    r = _residual_add(x, x_gate, residual, cd, x_mean_sq, x_eps)
    out = _rms(r, eps) * weight.to(cd)
    out = out * (1 + _broadcast(scale.to(cd), x)) + _broadcast(shift.to(cd), x)
    return out.to(x.dtype), r


# ---- torch.library ops (forward, reference backward by recomputation) --------------------------

@torch.library.custom_op("aim_kernels::rmsnorm_gated", mutates_args=())
def _rmsnorm_gated(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: int) -> Tensor:
    return rmsnorm_gated_ref(x, z, weight, eps, group_size).contiguous()


@_rmsnorm_gated.register_fake
def _(x, z, weight, eps, group_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("aim_kernels::rmsnorm_gated_bwd", mutates_args=())
def _rmsnorm_gated_bwd(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: int,
                       dout: Tensor) -> list[Tensor]:
    return reference_vjp(lambda x_, z_, w_: (rmsnorm_gated_ref(x_, z_, w_, eps, group_size),),
                         (x, z, weight), (dout,))


@_rmsnorm_gated_bwd.register_fake
def _(x, z, weight, eps, group_size, dout):
    return placeholder_grads(x, z, weight)


def _rmsnorm_gated_setup(ctx, inputs, output):
    x, z, weight, eps, group_size = inputs
    ctx.save_for_backward(x, z, weight)
    ctx.eps, ctx.group_size, ctx.has_z = eps, group_size, z is not None


def _rmsnorm_gated_backward(ctx, dout):
    x, z, weight = ctx.saved_tensors
    dx, dz, dw = _rmsnorm_gated_bwd(x, z, weight, ctx.eps, ctx.group_size, dout)
    return dx, (dz if ctx.has_z else None), dw, None, None


_rmsnorm_gated.register_autograd(_rmsnorm_gated_backward, setup_context=_rmsnorm_gated_setup)


@torch.library.custom_op("aim_kernels::add_rmsnorm_modulate", mutates_args=())
def _add_rmsnorm_modulate(x: Tensor, residual: Optional[Tensor], weight: Tensor, shift: Optional[Tensor],
                          scale: Optional[Tensor], eps: float, x_gate: Optional[Tensor],
                          x_mean_sq: Optional[Tensor] = None, x_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    if shift is None:
        out, r = add_rmsnorm_ref(x, residual, weight, eps, x_gate, x_mean_sq, x_eps)
    else:
        out, r = add_rmsnorm_modulate_ref(x, residual, weight, shift, scale, eps, x_gate, x_mean_sq, x_eps)
    return out.contiguous(), r.clone(memory_format=torch.contiguous_format)  # r may alias x


@_add_rmsnorm_modulate.register_fake
def _(x, residual, weight, shift, scale, eps, x_gate, x_mean_sq=None, x_eps=0.0):
    cd = compute_dtype(x, residual, weight, shift, scale, x_gate)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, dtype=cd, memory_format=torch.contiguous_format))


@torch.library.custom_op("aim_kernels::add_rmsnorm_modulate_bwd", mutates_args=())
def _add_rmsnorm_modulate_bwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, shift: Optional[Tensor],
                              scale: Optional[Tensor], eps: float, x_gate: Optional[Tensor],
                              x_mean_sq: Optional[Tensor], x_eps: float, dout: Tensor,
                              dresidual_out: Optional[Tensor]) -> list[Tensor]:
    def fn(x_, r_, w_, shift_, scale_, gate_, ms_):
        if shift_ is None:
            return add_rmsnorm_ref(x_, r_, w_, eps, gate_, ms_, x_eps)
        return add_rmsnorm_modulate_ref(x_, r_, w_, shift_, scale_, eps, gate_, ms_, x_eps)
    return reference_vjp(fn, (x, residual, weight, shift, scale, x_gate, x_mean_sq), (dout, dresidual_out))


@_add_rmsnorm_modulate_bwd.register_fake
def _(x, residual, weight, shift, scale, eps, x_gate, x_mean_sq, x_eps, dout, dresidual_out):
    return placeholder_grads(x, residual, weight, shift, scale, x_gate, x_mean_sq)


def _arm_setup(ctx, inputs, output):
    x, residual, weight, shift, scale, eps, x_gate, x_mean_sq, x_eps = inputs
    ctx.save_for_backward(x, residual, weight, shift, scale, x_gate, x_mean_sq)
    ctx.eps, ctx.x_eps = eps, x_eps
    ctx.present = [t is not None for t in (x, residual, weight, shift, scale, x_gate, x_mean_sq)]


def _arm_backward(ctx, dout, dresidual_out):
    x, residual, weight, shift, scale, x_gate, x_mean_sq = ctx.saved_tensors
    grads = _add_rmsnorm_modulate_bwd(x, residual, weight, shift, scale, ctx.eps, x_gate, x_mean_sq, ctx.x_eps,
                                      dout, dresidual_out)
    dx, dres, dw, dshift, dscale, dgate, dms = (g if present else None for g, present in zip(grads, ctx.present))
    return dx, dres, dw, dshift, dscale, None, dgate, dms, None


_add_rmsnorm_modulate.register_autograd(_arm_backward, setup_context=_arm_setup)


@torch.library.custom_op("aim_kernels::adaln_modulate", mutates_args=())
def _adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return adaln_modulate_ref(x, shift, scale).contiguous()


@_adaln_modulate.register_fake
def _(x, shift, scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("aim_kernels::adaln_modulate_bwd", mutates_args=())
def _adaln_modulate_bwd(x: Tensor, shift: Tensor, scale: Tensor, dout: Tensor) -> list[Tensor]:
    return reference_vjp(lambda *a: (adaln_modulate_ref(*a),), (x, shift, scale), (dout,))


@_adaln_modulate_bwd.register_fake
def _(x, shift, scale, dout):
    return placeholder_grads(x, shift, scale)


def _mod_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mod_backward(ctx, dout):
    return tuple(_adaln_modulate_bwd(*ctx.saved_tensors, dout))


_adaln_modulate.register_autograd(_mod_backward, setup_context=_mod_setup)


_ext.declare_op(_adaln_modulate)  # reference only, for aim_kernels.info


# ---- public API --------------------------------------------------------------------------------

def _check_x(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape (batch, ..., dim)")
    check_tensor("x", x, tuple(x.shape), device=x.device)


def _check_last_dim(name: str, t: Tensor, x: Tensor) -> None:
    check_tensor(name, t, tuple(x.shape), device=x.device)


def _check_cond(name: str, t: Tensor, x: Tensor) -> None:
    check_tensor(name, t, (x.shape[0], x.shape[-1]), device=x.device)


def rmsnorm_gated(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float = 1e-5,
                  group_size: Optional[int] = None) -> Tensor:
    """Mamba2's gated RMSNorm (gate before the norm): RMSNorm_groups(x * silu(z)) * weight."""
    _check_x(x)
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    if group_size < 1 or dim % group_size:
        raise ValueError(f"group_size {group_size} must divide the last dimension {dim}")
    if z is not None:
        _check_last_dim("z", z, x)
    check_tensor("weight", weight, (dim,), device=x.device)
    return _rmsnorm_gated(x, z, weight, float(eps), int(group_size))


def _check_residual_add(x: Tensor, residual: Optional[Tensor], weight: Tensor, x_gate: Optional[Tensor],
                        x_mean_sq: Optional[Tensor]) -> None:
    _check_x(x)
    if residual is not None:
        _check_last_dim("residual", residual, x)
    if x_gate is not None:
        _check_cond("x_gate", x_gate, x)
    if x_mean_sq is not None:
        check_tensor("x_mean_sq", x_mean_sq, (*x.shape[:-1], None), device=x.device,
                     dtypes=(torch.float32, torch.float64))
    check_tensor("weight", weight, (x.shape[-1],), device=x.device)


def add_rmsnorm(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float = 1e-5,
                x_gate: Optional[Tensor] = None, x_mean_sq: Optional[Tensor] = None,
                x_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Returns (RMSNorm(r) * weight in x's dtype, r in float32 or wider) for r = x_gate * x + residual.

    x_gate (batch, dim), broadcast over x's middle dimensions, is the previous block's adaLN gate.
    x_mean_sq (..., parts), float32: x's deferred normalisation (module docstring): x is first scaled by
    rsqrt(x_mean_sq.sum(-1) + x_eps) per row.
    """
    _check_residual_add(x, residual, weight, x_gate, x_mean_sq)
    return _add_rmsnorm_modulate(x, residual, weight, None, None, float(eps), x_gate, x_mean_sq, float(x_eps))


def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift, with shift/scale (batch, dim) broadcast over x's middle dimensions."""
    _check_x(x)
    _check_cond("shift", shift, x)
    _check_cond("scale", scale, x)
    return _adaln_modulate(x, shift, scale)


def add_rmsnorm_modulate(x: Tensor, residual: Optional[Tensor], weight: Tensor, shift: Tensor, scale: Tensor,
                         eps: float = 1e-5, x_gate: Optional[Tensor] = None, x_mean_sq: Optional[Tensor] = None,
                         x_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Fused block prologue: returns (adaln_modulate(RMSNorm(r) * weight), r) for r = x_gate * x + residual
    (x_mean_sq, x_eps: as `add_rmsnorm`)."""
    _check_residual_add(x, residual, weight, x_gate, x_mean_sq)
    _check_cond("shift", shift, x)
    _check_cond("scale", scale, x)
    return _add_rmsnorm_modulate(x, residual, weight, shift, scale, float(eps), x_gate, x_mean_sq, float(x_eps))


# ---- Triton backend: the fused block prologue (forward) ----------------------------------------

MAX_TRITON_DIM = 8192

if _triton.triton is not None:
    tl = _triton.tl

    @_triton.triton.jit
    def _add_rmsnorm_modulate_kernel(X, R, W, SHIFT, SCALE, GATE, MS, OUT, ROUT, dim, rows_per_batch, eps, ms_parts,
                                     x_eps, stride_x, stride_r, stride_shift, stride_scale, stride_gate, stride_ms,
                                     HAS_RESIDUAL: tl.constexpr, HAS_MOD: tl.constexpr, HAS_GATE: tl.constexpr,
                                     HAS_MS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_MS: tl.constexpr,
                                     PDL: tl.constexpr):
        row = tl.program_id(0)
        b = row // rows_per_batch
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        _triton.pdl_wait(PDL)
        r = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_MS:  # x's deferred normalisation
            j = tl.arange(0, BLOCK_MS)
            ms = tl.load(MS + row * stride_ms + j, mask=j < ms_parts, other=0.0)
            r *= 1.0 / tl.sqrt(tl.sum(ms, axis=0) + x_eps)
        if HAS_GATE:
            r *= tl.load(GATE + b * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOD:  # loaded before the reduction: a load after its barrier would be another round trip
            scale = tl.load(SCALE + b * stride_scale + cols, mask=mask, other=0.0).to(tl.float32)
            shift = tl.load(SHIFT + b * stride_shift + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(ROUT + row * dim + cols, r, mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=0) / dim + eps)
        y = r * rstd * w
        if HAS_MOD:
            y = y * (1.0 + scale) + shift
        tl.store(OUT + row * dim + cols, y.to(OUT.dtype.element_ty), mask=mask)


def add_rmsnorm_modulate_not_supported_reasons(x: Tensor, residual: Optional[Tensor], weight: Tensor,
                                               shift: Optional[Tensor], scale: Optional[Tensor], eps: float,
                                               x_gate: Optional[Tensor], x_mean_sq: Optional[Tensor] = None,
                                               x_eps: float = 0.0) -> list[str]:
    """Why the Triton kernel cannot run these inputs; empty list: it can."""
    tensors = dict(x=x, residual=residual, weight=weight, shift=shift, scale=scale, x_gate=x_gate,
                   x_mean_sq=x_mean_sq)
    reasons = _triton.reasons(x.device) + _triton.dtype_reasons(**tensors)
    if x.shape[-1] > MAX_TRITON_DIM:
        reasons.append(f"dim {x.shape[-1]} > {MAX_TRITON_DIM}")
    for name, t in tensors.items():
        if t is not None and t.stride(-1) != 1:
            reasons.append(f"{name}'s last dimension is not contiguous")
    return reasons


def add_rmsnorm_modulate_triton(x: Tensor, residual: Optional[Tensor], weight: Tensor, shift: Optional[Tensor],
                                scale: Optional[Tensor], eps: float, x_gate: Optional[Tensor] = None,
                                x_mean_sq: Optional[Tensor] = None, x_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """One program per row: gated residual add, RMSNorm, modulation; writes out (x dtype) and the float32 residual."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    r2 = residual.reshape(-1, dim) if residual is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    has_mod = shift is not None
    rows = x2.shape[0]
    block = _triton.triton.next_power_of_2(dim)
    cond = shift if has_mod else x_gate  # any (batch, dim) input fixes the rows per batch entry
    ms2 = x_mean_sq.reshape(rows, -1) if x_mean_sq is not None else None
    _add_rmsnorm_modulate_kernel[(rows,)](
        x2, r2, weight, shift if has_mod else x2, scale if has_mod else x2, x_gate if x_gate is not None else x2,
        ms2 if ms2 is not None else residual_out, out, residual_out, dim,
        rows // cond.shape[0] if cond is not None else 1, eps, ms2.shape[1] if ms2 is not None else 0, x_eps,
        x2.stride(0), r2.stride(0), shift.stride(0) if has_mod else 0, scale.stride(0) if has_mod else 0,
        x_gate.stride(0) if x_gate is not None else 0, ms2.stride(0) if ms2 is not None else 0,
        HAS_RESIDUAL=residual is not None, HAS_MOD=has_mod, HAS_GATE=x_gate is not None, HAS_MS=ms2 is not None,
        BLOCK=block, BLOCK_MS=_triton.triton.next_power_of_2(ms2.shape[1]) if ms2 is not None else 1,
        num_warps=min(8, max(1, block // 256)), **_triton.launch_options(x.device))
    return out, residual_out


_ext.register_backend(_add_rmsnorm_modulate, "triton", device_type="cuda", impl=add_rmsnorm_modulate_triton,
                      not_supported_reasons=add_rmsnorm_modulate_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)


# ---- Triton backend: the mixer's gated RMSNorm (forward) ----------------------------------------

if _triton.triton is not None:

    @_triton.triton.jit
    def _rmsnorm_gated_kernel(X, Z, W, OUT, group_size, groups, eps, stride_x, stride_z,
                              HAS_Z: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row, group = tl.program_id(0), tl.program_id(1)
        cols = group * group_size + tl.arange(0, BLOCK)
        mask = tl.arange(0, BLOCK) < group_size
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        _triton.pdl_wait(PDL)
        v = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(Z + row * stride_z + cols, mask=mask, other=0.0).to(tl.float32)
            v = v * z * tl.sigmoid(z)
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / group_size + eps)
        out = v * rstd * w
        tl.store(OUT + row * group_size * groups + cols, out.to(OUT.dtype.element_ty), mask=mask)


def rmsnorm_gated_not_supported_reasons(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float,
                                        group_size: int) -> list[str]:
    """Why the Triton kernel cannot run these inputs; empty list: it can."""
    reasons = _triton.reasons(x.device) + _triton.dtype_reasons(x=x, z=z, weight=weight)
    if group_size > MAX_TRITON_DIM:
        reasons.append(f"group size {group_size} > {MAX_TRITON_DIM}")
    for name, t in (("x", x), ("z", z), ("weight", weight)):
        if t is not None and t.stride(-1) != 1:
            reasons.append(f"{name}'s last dimension is not contiguous")
    return reasons


def rmsnorm_gated_triton(x: Tensor, z: Optional[Tensor], weight: Tensor, eps: float, group_size: int) -> Tensor:
    """One program per (row, group): v = x * silu(z), RMS over the group, times weight."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    z2 = z.reshape(-1, dim) if z is not None else x2
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block = _triton.triton.next_power_of_2(group_size)
    _rmsnorm_gated_kernel[(x2.shape[0], dim // group_size)](
        x2, z2, weight, out, group_size, dim // group_size, eps, x2.stride(0), z2.stride(0),
        HAS_Z=z is not None, BLOCK=block, num_warps=min(8, max(1, block // 256)),
        **_triton.launch_options(x.device))
    return out


_ext.register_backend(_rmsnorm_gated, "triton", device_type="cuda", impl=rmsnorm_gated_triton,
                      not_supported_reasons=rmsnorm_gated_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)
