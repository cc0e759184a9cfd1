"""Selective state-space ops: the Mamba2 chunked scan (SSD), the Mamba1 selective scan, and the
one-step state update used by decoding (both shapes).

Shapes (b batch, l seqlen, h heads, p headdim, g groups, n d_state, d channels):
- ssd_chunk_scan: x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), D (h,), dt_bias (h,),
  initial_state (b, h, p, n) -> y (b, l, h, p), final_state (b, h, p, n).
- selective_scan: u/delta/z (b, d, l), A (d, n), B/C (b, n, l), D/delta_bias (d,)
  -> out (b, d, l), last_state (b, d, n).
- selective_state_update: state (b, h, p, n) updated in place, x/dt/z (b, h, p), A (h, p, n),
  B/C (b, g, n), D/dt_bias (h, p) -> out (b, h, p). Mamba2 passes A/dt/D/dt_bias broadcast over p
  (stride 0); Mamba1 is h = 1, p = d_inner.
States are kept in float32 (float64 for float64 inputs); outputs take x's dtype.

The scans are reference-only (training runs them in PyTorch). selective_state_update has a Triton
backend (Mamba1 decoding; Mamba2 decodes through decode.py's fused step): one program per (b, h,
BLOCK_P rows of p) with its state tile in registers, read once and written once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor, compute_dtype, placeholder_grads, reference_vjp
from ._triton import tl, triton


def _segsum(a: Tensor) -> Tensor:
    """out[..., i, j] = sum(a[..., j+1 : i+1]) for j <= i, -inf above the diagonal (stable form)."""
    q = a.shape[-1]
    a = a[..., None].expand(*a.shape, q)
    a = a.masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device), -1), 0)
    s = torch.cumsum(a, dim=-2)
    return s.masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool, device=a.device)), -torch.inf)


def ssd_chunk_scan_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                       D: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
                       initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Mamba2 scan in the chunked (SSD) form: quadratic inside chunks, recurrent across them."""
    cd = compute_dtype(x, dt, A, B, C)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    xc, dtc, Ac = x.to(cd), dt.to(cd), A.to(cd)
    if dt_bias is not None:
        dtc = dtc + dt_bias.to(cd)
    if dt_softplus:
        dtc = F.softplus(dtc)
    Bh = B.to(cd).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(cd).repeat_interleave(h // g, dim=2)
    pad = (-l) % chunk_size  # padded steps have dt = 0: no decay, no input
    if pad:
        xc, dtc, Bh, Ch = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xc, dtc, Bh, Ch))
    c = (l + pad) // chunk_size

    def chunks(t: Tensor) -> Tensor:
        return t.reshape(b, c, chunk_size, *t.shape[2:])

    X = chunks(xc * dtc[..., None])                        # (b, c, q, h, p)
    Bq, Cq = chunks(Bh), chunks(Ch)                        # (b, c, q, h, n)
    a = chunks(dtc * Ac).permute(0, 3, 1, 2)               # (b, h, c, q)
    a_cum = torch.cumsum(a, dim=-1)
    # 1. within chunks
    Lmat = torch.exp(_segsum(a))                           # (b, h, c, q, q)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cq, Bq, Lmat, X)
    # 2. state contributed by each chunk, at its end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)      # (b, h, c, q)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bq, decay_to_end, X)
    # 3. states at chunk starts, carried across chunks
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=cd, device=x.device)
    states = torch.cat([initial_state.to(cd)[:, None], states], dim=1)
    decay_chunk = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]
    # 4. the carried state's contribution inside each chunk
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cq, states, torch.exp(a_cum))
    y = y.reshape(b, c * chunk_size, h, p)[:, :l]
    if D is not None:
        y = y + xc[:, :l] * D.to(cd)[:, None]
    return y.to(x.dtype), final_state


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor],
                       delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """Mamba1 scan, step by step: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t; y_t = C_t h_t + D u_t."""
    cd = compute_dtype(u, delta, A, B, C)
    uc, dc, Ac, Bc, Cc = u.to(cd), delta.to(cd), A.to(cd), B.to(cd), C.to(cd)
    if delta_bias is not None:
        dc = dc + delta_bias.to(cd)[:, None]
    if delta_softplus:
        dc = F.softplus(dc)
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=cd, device=u.device)
    ys = []
    for t in range(u.shape[2]):
        dt = dc[:, :, t, None]
        state = torch.exp(dt * Ac) * state + dt * Bc[:, None, :, t] * uc[:, :, t, None]
        ys.append(torch.einsum("bdn,bn->bd", state, Cc[:, :, t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + uc * D.to(cd)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype), state


def selective_state_update_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                               D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                               dt_softplus: bool) -> Tensor:
    """One step in place. dt/A/D/dt_bias may have size-1 dimensions where they do not vary (Mamba2's
    per-head scalars), which keeps the decay multiply from materialising a state-sized tensor."""
    cd = compute_dtype(x, dt, A, B, C)
    b, h, p, n = state.shape
    g = B.shape[1]
    xc, dtc = x.to(cd), dt.to(cd)
    if dt_bias is not None:
        dtc = dtc + dt_bias.to(cd)
    if dt_softplus:
        dtc = F.softplus(dtc)
    Bh = B.to(cd).repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.to(cd).repeat_interleave(h // g, dim=1)
    work = state if state.dtype == cd and state.is_contiguous() else state.to(cd).contiguous()
    work.mul_(torch.exp(dtc[..., None] * A.to(cd)))
    work.view(b * h, p, n).baddbmm_((dtc * xc).reshape(b * h, p, 1), Bh.reshape(b * h, 1, n))
    if work is not state:
        state.copy_(work)
    out = torch.bmm(work.view(b * h, p, n), Ch.reshape(b * h, n, 1)).view(b, h, p)
    if D is not None:
        out = out + xc * D.to(cd)
    if z is not None:
        out = out * F.silu(z.to(cd))
    return out.to(x.dtype)


# ---- torch.library ops -------------------------------------------------------------------------

@torch.library.custom_op("aim_kernels::ssd_chunk_scan", mutates_args=())
def _ssd_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                    D: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
                    initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    y, final_state = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)
    return y.contiguous(), final_state.contiguous()


@_ssd_chunk_scan.register_fake
def _(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state):
    b, l, h, p = x.shape
    return x.new_empty(x.shape), x.new_empty(b, h, p, B.shape[-1], dtype=compute_dtype(x, dt, A, B, C))


@torch.library.custom_op("aim_kernels::ssd_chunk_scan_bwd", mutates_args=())
def _ssd_chunk_scan_bwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                        D: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool,
                        initial_state: Optional[Tensor], dy: Tensor,
                        dfinal_state: Optional[Tensor]) -> list[Tensor]:
    def fn(x_, dt_, A_, B_, C_, D_, dtb_, init_):
        return ssd_chunk_scan_ref(x_, dt_, A_, B_, C_, chunk_size, D_, dtb_, dt_softplus, init_)
    return reference_vjp(fn, (x, dt, A, B, C, D, dt_bias, initial_state), (dy, dfinal_state))


@_ssd_chunk_scan_bwd.register_fake
def _(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state, dy, dfinal_state):
    return placeholder_grads(x, dt, A, B, C, D, dt_bias, initial_state)


def _ssd_setup(ctx, inputs, output):
    x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, dt_bias, initial_state)
    ctx.chunk_size, ctx.dt_softplus = chunk_size, dt_softplus
    ctx.present = [t is not None for t in (D, dt_bias, initial_state)]


def _ssd_backward(ctx, dy, dfinal_state):
    x, dt, A, B, C, D, dt_bias, initial_state = ctx.saved_tensors
    grads = _ssd_chunk_scan_bwd(x, dt, A, B, C, ctx.chunk_size, D, dt_bias, ctx.dt_softplus,
                                initial_state, dy, dfinal_state)
    dD, ddt_bias, dinit = (g if present else None for g, present in zip(grads[5:], ctx.present))
    return (*grads[:5], None, dD, ddt_bias, None, dinit)


_ssd_chunk_scan.register_autograd(_ssd_backward, setup_context=_ssd_setup)


@torch.library.custom_op("aim_kernels::selective_scan", mutates_args=())
def _selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    z: Optional[Tensor], delta_bias: Optional[Tensor],
                    delta_softplus: bool) -> tuple[Tensor, Tensor]:
    out, last_state = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return out.contiguous(), last_state.contiguous()


@_selective_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return u.new_empty(u.shape), u.new_empty(u.shape[0], u.shape[1], A.shape[1],
                                            dtype=compute_dtype(u, delta, A, B, C))


@torch.library.custom_op("aim_kernels::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], delta_bias: Optional[Tensor], delta_softplus: bool,
                        dout: Tensor, dlast_state: Optional[Tensor]) -> list[Tensor]:
    def fn(u_, delta_, A_, B_, C_, D_, z_, db_):
        return selective_scan_ref(u_, delta_, A_, B_, C_, D_, z_, db_, delta_softplus)
    return reference_vjp(fn, (u, delta, A, B, C, D, z, delta_bias), (dout, dlast_state))


@_selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dout, dlast_state):
    return placeholder_grads(u, delta, A, B, C, D, z, delta_bias)


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.delta_softplus = delta_softplus
    ctx.present = [t is not None for t in (D, z, delta_bias)]


def _scan_backward(ctx, dout, dlast_state):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    grads = _selective_scan_bwd(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, dout, dlast_state)
    optional = (g if present else None for g, present in zip(grads[5:], ctx.present))
    return (*grads[:5], *optional, None)


_selective_scan.register_autograd(_scan_backward, setup_context=_scan_setup)


@torch.library.custom_op("aim_kernels::selective_state_update", mutates_args=("state",))
def _selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                            dt_softplus: bool) -> Tensor:
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus).contiguous()


@_selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


for _op in (_ssd_chunk_scan, _selective_scan):  # reference only, for aim_kernels.info
    _ext.declare_op(_op)


# ---- Triton backend of selective_state_update (Mamba1 decoding; any head layout) -------------------

_STATE_DTYPES = (torch.float32, torch.bfloat16)
STATE_TILE = 2048  # state elements per program (16 per thread at 4 warps)


def state_update_not_supported_reasons(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                       D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                                       dt_softplus: bool) -> list[str]:
    """Why the Triton kernel cannot run these (already validated) inputs; empty list: it can."""
    reasons = _triton.reasons(x.device)
    reasons += _triton.dtype_reasons(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    if state.dtype not in _STATE_DTYPES:
        reasons.append(f"state is {state.dtype}; the Triton kernel keeps it in float32 or bfloat16")
    return reasons


def _state_update_blocks(b: int, h: int, p: int, n: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N): the whole d_state, and headdim rows up to STATE_TILE elements, halved
    (down to 16) while the grid has fewer than 2 programs per SM (batch 1: Mamba1's h = 1)."""
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), STATE_TILE // block_n))
    sms = _triton.num_sms(device)
    while block_p > 16 and b * h * triton.cdiv(p, block_p) < 2 * sms:
        block_p //= 2
    return block_p, block_n


def _alloc_state_update_out(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


if triton is not None:
    @triton.jit
    def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, out_ptr,
                             H, P, N, HEADS_PER_GROUP,
                             s_sb, s_sh, s_sp, s_sn, s_xb, s_xh, s_xp, s_db, s_dh, s_dp, s_ah, s_ap, s_an,
                             s_bb, s_bg, s_bn, s_cb, s_cg, s_cn, s_Dh, s_Dp, s_zb, s_zh, s_zp, s_th, s_tp,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                             SOFTPLUS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (b, h, BLOCK_P rows of p): state = state * exp(dt A) + dt x B^T, out = state C (+ D x)
        (* silu(z)), float32 in registers; strides may be 0 (Mamba2's per-head scalars)."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        g = h // HEADS_PER_GROUP
        pm = p < P
        nm = n < N
        tile = pm[:, None] & nm[None, :]
        s_ptrs = state_ptr + b * s_sb + h * s_sh + p[:, None] * s_sp + n[None, :] * s_sn
        state = tl.load(s_ptrs, mask=tile, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * s_xb + h * s_xh + p * s_xp, mask=pm, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * s_db + h * s_dh + p * s_dp, mask=pm, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += tl.load(dt_bias_ptr + h * s_th + p * s_tp, mask=pm, other=0.0).to(tl.float32)
        if SOFTPLUS:  # in float64: log(1 + exp(dt)) loses ~1e-4 relative in float32 when dt is small
            dt64 = dt.to(tl.float64)
            dt = tl.where(dt64 > 20.0, dt64, tl.log(1.0 + tl.exp(dt64))).to(tl.float32)
        A = tl.load(A_ptr + h * s_ah + p[:, None] * s_ap + n[None, :] * s_an, mask=tile, other=0.0).to(tl.float32)
        B = tl.load(B_ptr + b * s_bb + g * s_bg + n * s_bn, mask=nm, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + b * s_cb + g * s_cg + n * s_cn, mask=nm, other=0.0).to(tl.float32)
        state = state * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
        tl.store(s_ptrs, state.to(state_ptr.dtype.element_ty), mask=tile)
        out = tl.sum(state * C[None, :], axis=1)
        if HAS_D:
            out += tl.load(D_ptr + h * s_Dh + p * s_Dp, mask=pm, other=0.0).to(tl.float32) * x
        if HAS_Z:
            zz = tl.load(z_ptr + b * s_zb + h * s_zh + p * s_zp, mask=pm, other=0.0).to(tl.float32)
            out *= zz * tl.sigmoid(zz)
        tl.store(out_ptr + (b * H + h) * P + p, out.to(out_ptr.dtype.element_ty), mask=pm)


def selective_state_update_triton(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                  D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor],
                                  dt_softplus: bool) -> Tensor:
    """The Triton path of the op, callable on CPU tensors under TRITON_INTERPRET=1 (for tests)."""
    reasons = state_update_not_supported_reasons(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if reasons:
        raise ValueError("the Triton selective_state_update cannot run these inputs: " + "; ".join(reasons))
    b, h, p, n = state.shape
    out = _alloc_state_update_out(x)
    if out.numel() == 0:
        return out
    block_p, block_n = _state_update_blocks(b, h, p, n, x.device)
    _state_update_kernel[(b, h, triton.cdiv(p, block_p))](
        state, x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, out, h, p, n, h // B.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(D.stride() if D is not None else (0, 0)), *(z.stride() if z is not None else (0, 0, 0)),
        *(dt_bias.stride() if dt_bias is not None else (0, 0)),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    return out


_ext.register_backend(_selective_state_update, "triton", device_type="cuda", impl=selective_state_update_triton,
                      not_supported_reasons=state_update_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)


# ---- public API --------------------------------------------------------------------------------

def _check_groups(h: int, g: int) -> None:
    if g < 1 or h % g:
        raise ValueError(f"the number of heads ({h}) must be a multiple of the number of B/C groups ({g})")


def ssd_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int = 256,
                   D: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None, dt_softplus: bool = True,
                   initial_state: Optional[Tensor] = None,
                   return_final_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba2 selective scan with scalar A per head (see the module docstring for shapes).

    dt <- softplus(dt + dt_bias); h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = h_t C_t + D x_t.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, heads, headdim), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    b, l, h, p = x.shape
    dev = x.device
    check_tensor("x", x, (b, l, h, p), device=dev)
    check_tensor("dt", dt, (b, l, h), device=dev)
    check_tensor("A", A, (h,), device=dev)
    check_tensor("B", B, (b, l, None, None), device=dev)
    g, n = B.shape[2:]
    _check_groups(h, g)
    check_tensor("C", C, (b, l, g, n), device=dev)
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(name, t, (h,), device=dev)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, (b, h, p, n), device=dev)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    y, final_state = _ssd_chunk_scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, initial_state)
    return (y, final_state) if return_final_state else y


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                   delta_softplus: bool = True,
                   return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba1 selective scan with per-channel A (see the module docstring for shapes); out *= silu(z)."""
    if not isinstance(u, Tensor) or u.dim() != 3:
        raise ValueError("u must be (batch, dim, seqlen)")
    b, d, l = u.shape
    dev = u.device
    check_tensor("u", u, (b, d, l), device=dev)
    check_tensor("delta", delta, (b, d, l), device=dev)
    check_tensor("A", A, (d, None), device=dev)
    n = A.shape[1]
    check_tensor("B", B, (b, n, l), device=dev)
    check_tensor("C", C, (b, n, l), device=dev)
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(name, t, (d,), device=dev)
    if z is not None:
        check_tensor("z", z, (b, d, l), device=dev)
    out, last_state = _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None,
                           dt_bias: Optional[Tensor] = None, dt_softplus: bool = True) -> Tensor:
    """One recurrent step; updates `state` (batch, heads, headdim, d_state) in place, returns y (b, h, p)."""
    if not isinstance(state, Tensor) or state.dim() != 4:
        raise ValueError("state must be (batch, heads, headdim, d_state)")
    b, h, p, n = state.shape
    dev = state.device
    check_tensor("state", state, (b, h, p, n), device=dev)
    check_tensor("x", x, (b, h, p), device=dev)
    check_tensor("dt", dt, (b, h, p), device=dev)
    check_tensor("A", A, (h, p, n), device=dev)
    check_tensor("B", B, (b, None, n), device=dev)
    _check_groups(h, B.shape[1])
    check_tensor("C", C, (b, B.shape[1], n), device=dev)
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(name, t, (h, p), device=dev)
    if z is not None:
        check_tensor("z", z, (b, h, p), device=dev)
    return _selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
