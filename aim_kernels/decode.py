"""The fused Mamba2 decode step: causal conv update + SSM state update + gated RMSNorm in one op.

One token per row. zxbcdt (R, 2*d_inner + 2*G*N + H) is the in_proj output, laid out
[z (d_inner) | x (d_inner) | B (G*N) | C (G*N) | dt (H)]; conv_state (R, conv_dim, S) with
conv_dim = d_inner + 2*G*N and S >= W-1 (newest input last) and ssm_state (R, H, P, N) are updated
in place; the result is y (R, d_inner) = RMSNorm_group(ssm_out * silu(z)) * norm_weight, ready for
out_proj. `mamba2_decode_step_ref` is exactly the un-fused composition the model used before
(causal_conv1d_update_ref, selective_state_update_ref, rmsnorm_gated_ref).

The Triton backend (CUDA, or CPU tensors under TRITON_INTERPRET=1 through
`mamba2_decode_step_triton`) keeps every intermediate in float32 registers and makes two launches:

1. grid (R, H, P / P_PER_PROGRAM). A program owns P_PER_PROGRAM x-channels of one head (the whole
   head at large R; fewer at small R so the grid still fills the GPU): their conv, the state rows
   in (BLOCK_P, N) tiles (read, update, write: the bytes that matter), v = (state.C + D x) * silu(z)
   into a float32 scratch with the partial sum of v^2, and, last, its x-channels' conv_state shift
   (no other program reads them). It also recomputes the conv of its group's B and C channels
   (2N channels, L2-resident), which every program of the group reads -- so kernel 1 must not shift
   the B/C conv_state (a program could read a window another program already shifted).
2. grid (R, G). A program sums its group's v^2 partials, writes out = v * rstd * norm_weight in the
   output dtype, and shifts the group's B/C conv_state: kernel 1 has finished, so no reader is left.
   With `out_weight` (the out_proj weight) and few rows (batch-1 decoding), kernel 2 is instead the
   out_proj GEMV with the norm applied to its input on the fly (`gemv.py`: each program holds a weight
   tile, prefetched before the wait), and its first programs shift the B/C windows: one launch and
   one round trip of y fewer.

Per step this moves the state once in and once out (the official selective_state_update does the
same), plus O(R * (d_inner + G*N)) bytes for the rest; the unfused path adds the xBC, y and z
round trips and three more launches.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor
from . import gemv
from .causal_conv1d import MAX_WIDTH, causal_conv1d_update_ref
from .norm import rmsnorm_gated_ref
from .ssm import selective_state_update_ref

from ._triton import tl, triton


def _sizes(zxbcdt: Tensor, conv_weight: Tensor, norm_weight: Tensor, A_log: Tensor, headdim: int,
           ngroups: int) -> tuple[int, int, int, int, int, int]:
    """(R, d_inner, conv_dim, H, P, N) from the argument shapes."""
    d_inner, conv_dim, nheads = norm_weight.shape[0], conv_weight.shape[0], A_log.shape[0]
    return zxbcdt.shape[0], d_inner, conv_dim, nheads, headdim, (conv_dim - d_inner) // (2 * ngroups)


def mamba2_decode_step_ref(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                           conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor,
                           norm_weight: Tensor, eps: float, headdim: int, ngroups: int,
                           out_weight: Optional[Tensor] = None) -> Tensor:
    _, d_inner, conv_dim, h, p, n = _sizes(zxbcdt, conv_weight, norm_weight, A_log, headdim, ngroups)
    z, xBC, dt = zxbcdt.split([d_inner, conv_dim, h], dim=-1)
    xBC = causal_conv1d_update_ref(xBC, conv_state, conv_weight, conv_bias, True)
    x, B, C = xBC.split([d_inner, ngroups * n, ngroups * n], dim=-1)
    A = -torch.exp(A_log.float())  # in float32 whatever the model dtype, as the official Mamba2 does
    y = selective_state_update_ref(  # per-head scalars as size-1 dimensions: no state-sized temporaries
        ssm_state, x.unflatten(-1, (h, p)), dt[..., None], A[:, None, None], B.unflatten(-1, (ngroups, n)),
        C.unflatten(-1, (ngroups, n)), D[:, None], None, dt_bias[:, None], True)
    y = rmsnorm_gated_ref(y.flatten(-2), z, norm_weight, eps, d_inner // ngroups)
    return y if out_weight is None else gemv.linear_ref(y, out_weight)


# ---- torch.library op --------------------------------------------------------------------------

@torch.library.custom_op("aim_kernels::mamba2_decode_step", mutates_args=("conv_state", "ssm_state"))
def _mamba2_decode_step(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                        conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor,
                        eps: float, headdim: int, ngroups: int, out_weight: Optional[Tensor] = None) -> Tensor:
    return mamba2_decode_step_ref(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                  norm_weight, eps, headdim, ngroups, out_weight).contiguous()


@_mamba2_decode_step.register_fake
def _(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight, eps, headdim, ngroups,
      out_weight=None):
    return zxbcdt.new_empty(zxbcdt.shape[0], (norm_weight if out_weight is None else out_weight).shape[0])


# ---- Triton backend ----------------------------------------------------------------------------

_STATE_DTYPES = (torch.float32, torch.bfloat16)
TILE_ELEMENTS = 2048  # state elements per loop iteration of a program (16 per thread at 4 warps)
NUM_WARPS = 4
MAX_GROUP_SIZE = 8192  # the gated RMSNorm's group in one tile (32 float32 per thread per operand at 8 warps)


def not_supported_reasons(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                          conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor,
                          eps: float, headdim: int, ngroups: int, out_weight: Optional[Tensor] = None) -> list[str]:
    """Why the Triton kernel cannot run these (already validated) inputs; empty list: it can."""
    reasons = _triton.reasons(zxbcdt.device)
    reasons += _triton.dtype_reasons(zxbcdt=zxbcdt, conv_state=conv_state, conv_weight=conv_weight,
                                     conv_bias=conv_bias, A_log=A_log, D=D, dt_bias=dt_bias, norm_weight=norm_weight,
                                     out_weight=out_weight)
    if ssm_state.dtype not in _STATE_DTYPES:
        reasons.append(f"ssm_state is {ssm_state.dtype}; the Triton kernel keeps it in float32 or bfloat16")
    if conv_weight.shape[1] > MAX_WIDTH:
        reasons.append(f"conv width {conv_weight.shape[1]} > {MAX_WIDTH}")
    if norm_weight.shape[0] // ngroups > MAX_GROUP_SIZE:
        reasons.append(f"norm group size {norm_weight.shape[0] // ngroups} > {MAX_GROUP_SIZE} (one tile per group)")
    reasons += _triton.pow2_reasons(headdim=ssm_state.shape[2], d_state=ssm_state.shape[3])
    if zxbcdt.dim() == 2 and zxbcdt.stride(1) != 1:
        reasons.append("zxbcdt's channels are not contiguous (stride(1) != 1)")
    if ssm_state.stride(3) != 1:
        reasons.append("ssm_state's d_state dimension is not contiguous (stride(3) != 1)")
    return reasons


def _p_per_program(rows: int, nheads: int, headdim: int) -> int:
    """Split heads into P-ranges until the grid has ~2048 programs (batch 1 has only R = 2 rows).

    Tuned on an H200 (AiM-XL, H = 48): R = 128 whole heads, R = 32 halves, R = 2 quarters.
    """
    block = headdim
    while block > 16 and rows * nheads * (headdim // block) < 2048:
        block //= 2
    return block


def _alloc_outputs(rows: int, d_inner: int, d_out: int, n_partials: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """out (R, d_out) in the model dtype; float32 scratch: v (R, d_inner) and v^2 partials."""
    return (torch.empty(rows, d_out, dtype=dtype, device=device),
            torch.empty(rows, d_inner, dtype=torch.float32, device=device),
            torch.empty(rows, n_partials, dtype=torch.float32, device=device))


if triton is not None:
    @triton.jit
    def _conv_silu(xbc_ptr, state_ptr, w_ptr, b_ptr, c, S, stride_cc, stride_cs, stride_wc, stride_wk,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr):
        """silu(bias + sum_k w[c, k] * window[c, k]) for conv channels c, window = [state taps, new input]."""
        acc = tl.load(xbc_ptr + c).to(tl.float32) * tl.load(w_ptr + c * stride_wc + (W - 1) * stride_wk).to(tl.float32)
        for k in tl.static_range(W - 1):
            tap = tl.load(state_ptr + c * stride_cc + (S - (W - 1) + k) * stride_cs).to(tl.float32)
            acc += tap * tl.load(w_ptr + c * stride_wc + k * stride_wk).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + c).to(tl.float32)
        return acc * tl.sigmoid(acc)

    @triton.jit
    def _shift_conv_state(xbc_ptr, state_ptr, c, S, stride_cc, stride_cs, BLOCK_S: tl.constexpr):
        """state[c, :] = [state[c, 1:], new input] for conv channels c."""
        s = tl.arange(0, BLOCK_S)[None, :]
        ptrs = state_ptr + c[:, None] * stride_cc + s * stride_cs
        newer = tl.load(ptrs + stride_cs, mask=s + 1 < S, other=0.0)
        x_new = tl.load(xbc_ptr + c).to(newer.dtype)
        new = tl.where(s == S - 1, x_new[:, None], newer)
        # The block's threads read and write overlapping addresses: every read lands before any write.
        tl.debug_barrier()
        tl.store(ptrs, new, mask=s < S)

    @triton.jit
    def _ssm_step_kernel(zxbcdt_ptr, conv_state_ptr, ssm_state_ptr, conv_w_ptr, conv_b_ptr, A_log_ptr, D_ptr,
                         dt_bias_ptr, v_ptr, sumsq_ptr,
                         stride_zr, stride_cr, stride_cc, stride_cs, stride_sr, stride_sh, stride_sp,
                         stride_wc, stride_wk, S, H, GN, HEADS_PER_GROUP,
                         P: tl.constexpr, N: tl.constexpr, W: tl.constexpr, P_PER_PROGRAM: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        pb = tl.program_id(2)
        g = h // HEADS_PER_GROUP
        d_inner = H * P
        n = tl.arange(0, N)
        z_row = zxbcdt_ptr + r * stride_zr
        xbc_row = z_row + d_inner
        cs_row = conv_state_ptr + r * stride_cr
        p0 = h * P + pb * P_PER_PROGRAM  # this program's x channels: no other program reads their conv_state
        s_head = ssm_state_ptr + r * stride_sr + h * stride_sh + (pb * P_PER_PROGRAM) * stride_sp
        neg_A = tl.exp(tl.load(A_log_ptr + h).to(tl.float32))  # A = -exp(A_log)
        skip = tl.load(D_ptr + h).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + h).to(tl.float64)
        _triton.pdl_wait(PDL)
        state_first = tl.load(s_head + tl.arange(0, BLOCK_P)[:, None] * stride_sp + n[None, :])  # in flight early

        # B and C of the group: recomputed by each program, amortised over its P_PER_PROGRAM rows
        B = _conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, d_inner + g * N + n, S, stride_cc, stride_cs,
                       stride_wc, stride_wk, W, HAS_BIAS)
        C = _conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, d_inner + GN + g * N + n, S, stride_cc, stride_cs,
                       stride_wc, stride_wk, W, HAS_BIAS)
        # softplus in float64: log(1 + exp(dt)) loses ~1e-4 relative in float32 when dt is small
        dt = tl.load(z_row + 2 * d_inner + 2 * GN + h).to(tl.float64) + dt_bias
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt))).to(tl.float32)
        dA = tl.exp(-dt * neg_A)

        sumsq = 0.0
        for i in tl.static_range(P_PER_PROGRAM // BLOCK_P):
            p = i * BLOCK_P + tl.arange(0, BLOCK_P)
            s_ptrs = s_head + p[:, None] * stride_sp + n[None, :]
            if i == 0:
                state = state_first
            else:
                state = tl.load(s_ptrs)
            x = _conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, p0 + p, S, stride_cc, stride_cs, stride_wc,
                           stride_wk, W, HAS_BIAS)
            z = tl.load(z_row + p0 + p).to(tl.float32)
            if i == P_PER_PROGRAM // BLOCK_P - 1:
                # every tap of this program's x channels is read: shift their windows now, so the shift's
                # loads go out with the others instead of after the reductions' barriers
                _shift_conv_state(xbc_row, cs_row, p0 + tl.arange(0, P_PER_PROGRAM), S, stride_cc, stride_cs,
                                  BLOCK_S)
            state = state.to(tl.float32) * dA + (dt * x)[:, None] * B[None, :]
            tl.store(s_ptrs, state.to(ssm_state_ptr.dtype.element_ty))
            y = tl.sum(state * C[None, :], axis=1) + skip * x
            v = y * z * tl.sigmoid(z)
            tl.store(v_ptr + r * d_inner + p0 + p, v)
            sumsq += tl.sum(v * v, axis=0)
        tl.store(sumsq_ptr + (r * H + h) * tl.num_programs(2) + pb, sumsq)

    @triton.jit
    def _norm_shift_kernel(zxbcdt_ptr, conv_state_ptr, v_ptr, sumsq_ptr, norm_w_ptr, out_ptr,
                           stride_zr, stride_cr, stride_cc, stride_cs, S, eps, D_INNER, GN, GROUP_SIZE,
                           PARTIALS_PER_GROUP, N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_PARTS: tl.constexpr,
                           BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        """One program per (row, group), the whole group in one tile: every load goes out at once, before
        the block-wide reduction (a load after its barrier would be another round trip)."""
        _triton.pdl_wait(PDL)
        r = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        G = tl.num_programs(1)
        i = tl.arange(0, BLOCK_PARTS)
        parts = tl.load(sumsq_ptr + (r * G + g) * PARTIALS_PER_GROUP + i, mask=i < PARTIALS_PER_GROUP, other=0.0)
        d = tl.arange(0, BLOCK_D)
        mask = d < GROUP_SIZE
        d += g * GROUP_SIZE
        v = tl.load(v_ptr + r * D_INNER + d, mask=mask, other=0.0)
        w = tl.load(norm_w_ptr + d, mask=mask, other=0.0).to(tl.float32)
        # kernel 1 (every reader of this group's B/C conv windows) is done: shift them now
        j = tl.arange(0, 2 * N)
        c = D_INNER + tl.where(j < N, g * N + j, GN + g * N + (j - N))
        _shift_conv_state(zxbcdt_ptr + r * stride_zr + D_INNER, conv_state_ptr + r * stride_cr, c, S,
                          stride_cc, stride_cs, BLOCK_S)
        rstd = 1.0 / tl.sqrt(tl.sum(parts, axis=0) / GROUP_SIZE + eps)
        tl.store(out_ptr + r * D_INNER + d, (v * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


if triton is not None:
    @triton.jit
    def _norm_shift_out_kernel(zxbcdt_ptr, conv_state_ptr, v_ptr, sumsq_ptr, norm_w_ptr, out_w_ptr, out_ptr,
                               stride_zr, stride_cr, stride_cc, stride_cs, S, eps, N_OUT, D_INNER, N_PARTS,
                               ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr,
                               BLOCK_PARTS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        """Kernel 2 with out_proj (one group): out[r, n] = sum_k W[n, k] * v[r, k] * rstd[r] * norm_w[k]."""
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        w = tl.load(out_w_ptr + n[:, None].to(tl.int64) * D_INNER + k[None, :],
                    mask=(n[:, None] < N_OUT) & (k[None, :] < D_INNER), other=0.0)
        norm_w = tl.load(norm_w_ptr + k, mask=k < D_INNER, other=0.0).to(tl.float32)
        _triton.pdl_wait(PDL)
        # every row's partials and v at once, before any block-wide reduction (see _triton.select_row)
        i = tl.arange(0, ROWS_PAD)
        j = tl.arange(0, BLOCK_PARTS)
        parts = tl.load(sumsq_ptr + i[:, None] * N_PARTS + j[None, :],
                        mask=(i[:, None] < ROWS) & (j[None, :] < N_PARTS), other=0.0)
        v = tl.load(v_ptr + i[:, None] * D_INNER + k[None, :], mask=(i[:, None] < ROWS) & (k[None, :] < D_INNER),
                    other=0.0)
        # kernel 1 (every reader of the B/C conv windows) is done: shift them, one program per row (here,
        # so their loads go out with the others)
        for r in range(pid, ROWS, tl.num_programs(0)):
            _shift_conv_state(zxbcdt_ptr + r * stride_zr + D_INNER, conv_state_ptr + r * stride_cr,
                              D_INNER + tl.arange(0, 2 * N), S, stride_cc, stride_cs, BLOCK_S)
        rstd = 1.0 / tl.sqrt(tl.sum(parts, axis=1) / D_INNER + eps)
        x = (v * rstd[:, None] * norm_w[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)  # as unfused rounds y
        for r in tl.static_range(ROWS):
            x_r = _triton.select_row(x, i, r)
            y = tl.sum(w.to(tl.float32) * x_r[None, :], axis=1)
            tl.store(out_ptr + r * N_OUT + n, y.to(out_ptr.dtype.element_ty), mask=n < N_OUT)


def fused_out_reasons(rows: int, d_inner: int, ngroups: int, out_weight: Tensor, dtype: torch.dtype,
                      norm_weight_size: int) -> list[str]:
    """Why kernel 2 cannot include out_proj (then kernel 2 and a separate GEMV run); empty: it can."""
    reasons = []
    if rows > gemv.MAX_ROWS:
        reasons.append(f"{rows} rows > {gemv.MAX_ROWS}")
    if ngroups != 1:
        reasons.append(f"ngroups {ngroups} != 1")
    if d_inner > gemv.TILE_ELEMENTS:
        reasons.append(f"d_inner {d_inner} > {gemv.TILE_ELEMENTS}")
    if out_weight.dtype != dtype or not out_weight.is_contiguous():
        reasons.append("out_weight is not a contiguous tensor of zxbcdt's dtype")
    # the input rebuilt per program: v (float32) and norm_weight, read from L2
    return reasons + gemv.recompute_reasons(d_inner, rows * 4 + norm_weight_size, out_weight.element_size())


def mamba2_decode_step_triton(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                              conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor,
                              norm_weight: Tensor, eps: float, headdim: int, ngroups: int,
                              out_weight: Optional[Tensor] = None) -> Tensor:
    """The Triton path of the op, callable on CPU tensors under TRITON_INTERPRET=1 (for tests)."""
    reasons = not_supported_reasons(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                    norm_weight, eps, headdim, ngroups, out_weight)
    if reasons:
        raise ValueError("the Triton mamba2_decode_step cannot run these inputs: " + "; ".join(reasons))
    rows, d_inner, conv_dim, h, p, n = _sizes(zxbcdt, conv_weight, norm_weight, A_log, headdim, ngroups)
    width, state_len = conv_weight.shape[1], conv_state.shape[2]
    p_per_program = _p_per_program(rows, h, p)
    block_p = min(p_per_program, max(1, TILE_ELEMENTS // n))
    p_blocks = p // p_per_program
    fused_out = out_weight is not None and not fused_out_reasons(rows, d_inner, ngroups, out_weight, zxbcdt.dtype,
                                                                 norm_weight.element_size())
    out, v, sumsq = _alloc_outputs(rows, d_inner, out_weight.shape[0] if fused_out else d_inner, h * p_blocks,
                                   zxbcdt.dtype, zxbcdt.device)
    if rows == 0:
        return out if out_weight is None or fused_out else zxbcdt.new_empty(0, out_weight.shape[0])
    conv_weight, A_log, D, dt_bias, norm_weight = (t.contiguous() for t in (conv_weight, A_log, D, dt_bias, norm_weight))
    conv_bias = conv_bias.contiguous() if conv_bias is not None else None
    block_s = triton.next_power_of_2(state_len)
    launch = _triton.launch_options(zxbcdt.device)
    _ssm_step_kernel[(rows, h, p_blocks)](
        zxbcdt, conv_state, ssm_state, conv_weight, conv_bias if conv_bias is not None else conv_weight,
        A_log, D, dt_bias, v, sumsq,
        zxbcdt.stride(0), *conv_state.stride(), *ssm_state.stride()[:3], *conv_weight.stride(),
        state_len, h, ngroups * n, h // ngroups,
        P=p, N=n, W=width, P_PER_PROGRAM=p_per_program, BLOCK_P=block_p, BLOCK_S=block_s,
        HAS_BIAS=conv_bias is not None, num_warps=NUM_WARPS, **launch)
    if fused_out:
        n_out = out_weight.shape[0]
        block_n, block_k = gemv.tile_shape(d_inner)
        _norm_shift_out_kernel[(triton.cdiv(n_out, block_n),)](
            zxbcdt, conv_state, v, sumsq, norm_weight, out_weight, out,
            zxbcdt.stride(0), *conv_state.stride(), state_len, eps, n_out, d_inner, h * p_blocks,
            ROWS=rows, ROWS_PAD=triton.next_power_of_2(rows), N=n, BLOCK_N=block_n, BLOCK_K=block_k,
            BLOCK_PARTS=triton.next_power_of_2(h * p_blocks),
            BLOCK_S=block_s, num_warps=gemv.NUM_WARPS, **launch)
        return out
    group_size = d_inner // ngroups
    block_d = triton.next_power_of_2(group_size)
    parts_per_group = h * p_blocks // ngroups
    _norm_shift_kernel[(rows, ngroups)](
        zxbcdt, conv_state, v, sumsq, norm_weight, out,
        zxbcdt.stride(0), *conv_state.stride(), state_len, eps, d_inner, ngroups * n, group_size, parts_per_group,
        N=n, BLOCK_D=block_d, BLOCK_PARTS=triton.next_power_of_2(parts_per_group), BLOCK_S=block_s,
        num_warps=4 if block_d <= 2048 else 8, **launch)
    return out if out_weight is None else gemv.linear(out, out_weight)


_ext.register_backend(_mamba2_decode_step, "triton", device_type="cuda", impl=mamba2_decode_step_triton,
                      not_supported_reasons=not_supported_reasons, unavailable_reasons=_triton.unavailable_reasons)


# ---- public API --------------------------------------------------------------------------------

def mamba2_decode_step(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                       conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor,
                       eps: float, headdim: int, ngroups: int, out_weight: Optional[Tensor] = None) -> Tensor:
    """One Mamba2 decode step from the in_proj output to the out_proj input, or with `out_weight` (the
    out_proj weight, (d_out, d_inner)) to the mixer output (see the module docstring).

    zxbcdt (R, 2*d_inner + 2*G*N + H); conv_state (R, conv_dim, S) and ssm_state (R, H, P, N) are
    updated in place; conv_weight (conv_dim, W), W in 2..4; conv_bias (conv_dim,) or None;
    A_log, D, dt_bias (H,) with A = -exp(A_log); norm_weight (d_inner,). Returns y (R, d_inner), or
    y @ out_weight.T (R, d_out), in zxbcdt's dtype.
    """
    if not isinstance(zxbcdt, Tensor) or zxbcdt.dim() != 2:
        raise ValueError(f"zxbcdt must be (rows, 2*d_inner + 2*ngroups*d_state + nheads), got "
                         f"{tuple(zxbcdt.shape) if isinstance(zxbcdt, Tensor) else type(zxbcdt).__name__}")
    dev = zxbcdt.device
    check_tensor("zxbcdt", zxbcdt, (None, None), device=dev)
    check_tensor("norm_weight", norm_weight, (None,), device=dev)
    d_inner = norm_weight.shape[0]
    if not isinstance(headdim, int) or headdim < 1 or d_inner % headdim:
        raise ValueError(f"headdim {headdim!r} must be a positive int dividing d_inner {d_inner}")
    nheads = d_inner // headdim
    if not isinstance(ngroups, int) or ngroups < 1 or nheads % ngroups:
        raise ValueError(f"ngroups {ngroups!r} must be a positive int dividing the number of heads {nheads}")
    for name, t in (("A_log", A_log), ("D", D), ("dt_bias", dt_bias)):
        check_tensor(name, t, (nheads,), device=dev)
    check_tensor("conv_weight", conv_weight, (None, None), device=dev)
    conv_dim, width = conv_weight.shape
    if not 2 <= width <= MAX_WIDTH:
        raise ValueError(f"conv width must be 2..{MAX_WIDTH}, got {width}")
    if conv_dim <= d_inner or (conv_dim - d_inner) % (2 * ngroups):
        raise ValueError(f"conv_weight has {conv_dim} channels; expected d_inner ({d_inner}) + 2*ngroups*d_state")
    d_state = (conv_dim - d_inner) // (2 * ngroups)
    rows = zxbcdt.shape[0]
    check_tensor("zxbcdt", zxbcdt, (rows, d_inner + conv_dim + nheads), device=dev)
    if conv_bias is not None:
        check_tensor("conv_bias", conv_bias, (conv_dim,), device=dev)
    check_tensor("conv_state", conv_state, (rows, conv_dim, None), device=dev)
    if conv_state.shape[2] < width - 1:
        raise ValueError(f"conv_state holds {conv_state.shape[2]} steps, the width-{width} conv needs "
                         f"at least {width - 1}")
    check_tensor("ssm_state", ssm_state, (rows, nheads, headdim, d_state), device=dev)
    if out_weight is not None:
        check_tensor("out_weight", out_weight, (None, d_inner), device=dev, dtypes=(zxbcdt.dtype,))
    return _mamba2_decode_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                               norm_weight, float(eps), headdim, ngroups, out_weight)


__all__ = ["mamba2_decode_step", "mamba2_decode_step_ref", "mamba2_decode_step_triton", "not_supported_reasons"]
