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

`mamba2_block_step` is a whole decode block in state form: `add_rmsnorm_modulate_linear` (the block's
residual add + RMSNorm + adaLN modulate, and in_proj) then this op with out_proj. At few rows its Triton
backend splits in_proj by consumer, since the SSM update needs x, B, C and dt but not z (first read by the
gated norm):
0. the prologue fused into the GEMV of in_proj's x/B/C/dt rows; program 0 also writes the prologue's
   output h (`gemv.launch_prologue_gemv`);
1. one launch whose first programs are a GEMV of in_proj's z rows over h (weights loaded before the PDL
   wait) and the rest kernel 1 above, writing y ungated: z's weights stream while the SSM update, a
   latency-bound grid of a few hundred programs, runs;
2. kernel 2 above, applying the gate y * silu(z) before the norm.
Where the prologue cannot be fused (AiM-XL: `gemv.MAX_RECOMPUTE_RATIO`) the two ops run instead. H100, end
to end at batch 1 (scripts/ab_generate.py): AiM-B bf16 1.04x, AiM-L bf16 1.02x, AiM-B fp32 1.21x, AiM-L fp32
1.23x; AiM-B bf16 batch 2 1.07x.

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


def _state_reasons(conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                   A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor, ngroups: int,
                   out_weight: Optional[Tensor]) -> list[str]:
    """Why the Triton kernels cannot take the caches and the mixer's parameters; empty list: they can."""
    reasons = _triton.dtype_reasons(conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias, A_log=A_log,
                                    D=D, dt_bias=dt_bias, norm_weight=norm_weight, out_weight=out_weight)
    if ssm_state.dtype not in _STATE_DTYPES:
        reasons.append(f"ssm_state is {ssm_state.dtype}; the Triton kernel keeps it in float32 or bfloat16")
    if conv_weight.shape[1] > MAX_WIDTH:
        reasons.append(f"conv width {conv_weight.shape[1]} > {MAX_WIDTH}")
    if norm_weight.shape[0] // ngroups > MAX_GROUP_SIZE:
        reasons.append(f"norm group size {norm_weight.shape[0] // ngroups} > {MAX_GROUP_SIZE} (one tile per group)")
    reasons += _triton.pow2_reasons(headdim=ssm_state.shape[2], d_state=ssm_state.shape[3])
    if ssm_state.stride(3) != 1:
        reasons.append("ssm_state's d_state dimension is not contiguous (stride(3) != 1)")
    return reasons


def not_supported_reasons(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                          conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor,
                          eps: float, headdim: int, ngroups: int, out_weight: Optional[Tensor] = None) -> list[str]:
    """Why the Triton kernel cannot run these (already validated) inputs; empty list: it can."""
    reasons = _triton.reasons(zxbcdt.device) + _triton.dtype_reasons(zxbcdt=zxbcdt)
    reasons += _state_reasons(conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, norm_weight, ngroups,
                              out_weight)
    if zxbcdt.dim() == 2 and zxbcdt.stride(1) != 1:
        reasons.append("zxbcdt's channels are not contiguous (stride(1) != 1)")
    return reasons


def _p_per_program(rows: int, nheads: int, headdim: int) -> int:
    """Split heads into P-ranges until the grid has ~2048 programs (batch 1 has only R = 2 rows).

    Tuned on an H200 (AiM-XL, H = 48): R = 128 whole heads, R = 32 halves, R = 2 quarters.
    """
    block = headdim
    while block > 16 and rows * nheads * (headdim // block) < 2048:
        block //= 2
    return block


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
    def _ssm_step_program(r, h, pb, PB, z_row, xbc_row, cs_row, ssm_state_ptr, conv_w_ptr, conv_b_ptr, A_log_ptr,
                          D_ptr, dt_bias_ptr, v_ptr, sumsq_ptr, stride_cc, stride_cs, stride_sr, stride_sh, stride_sp,
                          stride_wc, stride_wk, S, H, GN, HEADS_PER_GROUP, P: tl.constexpr, N: tl.constexpr,
                          W: tl.constexpr, P_PER_PROGRAM: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr):
        """Program (r, h, pb) of kernel 1: xbc_row is row r's [x | B | C | dt]. GATED: v = y * silu(z) (z_row is
        row r's z) and the partial sum of v^2; otherwise v = y, and the next kernel applies the gate."""
        g = h // HEADS_PER_GROUP
        d_inner = H * P
        n = tl.arange(0, N)
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
        dt = tl.load(xbc_row + d_inner + 2 * GN + h).to(tl.float64) + dt_bias
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
            if GATED:
                z = tl.load(z_row + p0 + p).to(tl.float32)
            if i == P_PER_PROGRAM // BLOCK_P - 1:
                # every tap of this program's x channels is read: shift their windows now, so the shift's
                # loads go out with the others instead of after the reductions' barriers
                _shift_conv_state(xbc_row, cs_row, p0 + tl.arange(0, P_PER_PROGRAM), S, stride_cc, stride_cs,
                                  BLOCK_S)
            state = state.to(tl.float32) * dA + (dt * x)[:, None] * B[None, :]
            tl.store(s_ptrs, state.to(ssm_state_ptr.dtype.element_ty))
            y = tl.sum(state * C[None, :], axis=1) + skip * x
            if GATED:
                y = y * z * tl.sigmoid(z)
                sumsq += tl.sum(y * y, axis=0)
            tl.store(v_ptr + r * d_inner + p0 + p, y)
        if GATED:
            tl.store(sumsq_ptr + (r * H + h) * PB + pb, sumsq)

    @triton.jit
    def _ssm_step_kernel(zxbcdt_ptr, conv_state_ptr, ssm_state_ptr, conv_w_ptr, conv_b_ptr, A_log_ptr, D_ptr,
                         dt_bias_ptr, v_ptr, sumsq_ptr,
                         stride_zr, stride_cr, stride_cc, stride_cs, stride_sr, stride_sh, stride_sp,
                         stride_wc, stride_wk, S, H, GN, HEADS_PER_GROUP,
                         P: tl.constexpr, N: tl.constexpr, W: tl.constexpr, P_PER_PROGRAM: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        z_row = zxbcdt_ptr + r * stride_zr
        _ssm_step_program(r, tl.program_id(1), tl.program_id(2), tl.num_programs(2), z_row, z_row + H * P,
                          conv_state_ptr + r * stride_cr, ssm_state_ptr, conv_w_ptr, conv_b_ptr, A_log_ptr, D_ptr,
                          dt_bias_ptr, v_ptr, sumsq_ptr, stride_cc, stride_cs, stride_sr, stride_sh, stride_sp,
                          stride_wc, stride_wk, S, H, GN, HEADS_PER_GROUP, P, N, W, P_PER_PROGRAM, BLOCK_P, BLOCK_S,
                          HAS_BIAS, True, PDL)

    @triton.jit
    def _ssm_step_z_kernel(xbcdt_ptr, h_ptr, z_weight_ptr, z_ptr, conv_state_ptr, ssm_state_ptr, conv_w_ptr,
                           conv_b_ptr, A_log_ptr, D_ptr, dt_bias_ptr, v_ptr, K, Z_PROGRAMS,
                           stride_xr, stride_hr, stride_zw, stride_cr, stride_cc, stride_cs, stride_sr, stride_sh,
                           stride_sp, stride_wc, stride_wk, S, H, GN, HEADS_PER_GROUP, PB,
                           ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           P: tl.constexpr, N: tl.constexpr, W: tl.constexpr, P_PER_PROGRAM: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr):
        """Kernel 1 of the block step: the first Z_PROGRAMS programs compute z = h @ z_weight.T (in_proj's z
        rows: the SSM update does not need them), the rest are `_ssm_step_program`s writing y ungated."""
        pid = tl.program_id(0)
        if pid < Z_PROGRAMS:
            gemv.gemv_program(pid, h_ptr, z_weight_ptr, z_ptr, H * P, K, stride_hr, stride_zw, ROWS, ROWS_PAD,
                              BLOCK_N, BLOCK_K, PDL)
        else:
            spid = pid - Z_PROGRAMS
            r = (spid // (H * PB)).to(tl.int64)
            xbc_row = xbcdt_ptr + r * stride_xr
            _ssm_step_program(r, (spid // PB) % H, spid % PB, PB, xbc_row, xbc_row, conv_state_ptr + r * stride_cr,
                              ssm_state_ptr, conv_w_ptr, conv_b_ptr, A_log_ptr, D_ptr, dt_bias_ptr, v_ptr, v_ptr,
                              stride_cc, stride_cs, stride_sr, stride_sh, stride_sp, stride_wc, stride_wk, S, H, GN,
                              HEADS_PER_GROUP, P, N, W, P_PER_PROGRAM, BLOCK_P, BLOCK_S, HAS_BIAS, False, PDL)

    @triton.jit
    def _gate_sumsq(v, z_or_parts, AXIS: tl.constexpr, Z_GATE: tl.constexpr):
        """Kernel 2's gate: Z_GATE, v * silu(z) and its sum of squares along AXIS; otherwise v is already gated
        and the sum is over its v^2 partials from kernel 1."""
        if Z_GATE:
            v = v * z_or_parts * tl.sigmoid(z_or_parts)
            ss = tl.sum(v * v, axis=AXIS)
        else:
            ss = tl.sum(z_or_parts, axis=AXIS)
        return v, ss

    @triton.jit
    def _norm_shift_kernel(xbc_ptr, z_ptr, conv_state_ptr, v_ptr, sumsq_ptr, norm_w_ptr, out_ptr,
                           stride_xr, stride_cr, stride_cc, stride_cs, S, eps, D_INNER, GN, GROUP_SIZE,
                           PARTIALS_PER_GROUP, N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_PARTS: tl.constexpr,
                           BLOCK_S: tl.constexpr, Z_GATE: tl.constexpr, PDL: tl.constexpr):
        """One program per (row, group), the whole group in one tile: every load goes out at once, before
        the block-wide reduction (a load after its barrier would be another round trip). Z_GATE: v is the
        ungated y, gated here by z (rows of D_INNER); otherwise v is gated and sumsq holds its v^2 partials."""
        _triton.pdl_wait(PDL)
        r = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        G = tl.num_programs(1)
        d = tl.arange(0, BLOCK_D)
        mask = d < GROUP_SIZE
        d += g * GROUP_SIZE
        v = tl.load(v_ptr + r * D_INNER + d, mask=mask, other=0.0)
        if Z_GATE:
            z_or_parts = tl.load(z_ptr + r * D_INNER + d, mask=mask, other=0.0).to(tl.float32)
        else:
            i = tl.arange(0, BLOCK_PARTS)
            z_or_parts = tl.load(sumsq_ptr + (r * G + g) * PARTIALS_PER_GROUP + i, mask=i < PARTIALS_PER_GROUP,
                                 other=0.0)
        w = tl.load(norm_w_ptr + d, mask=mask, other=0.0).to(tl.float32)
        # kernel 1 (every reader of this group's B/C conv windows) is done: shift them now
        j = tl.arange(0, 2 * N)
        c = D_INNER + tl.where(j < N, g * N + j, GN + g * N + (j - N))
        _shift_conv_state(xbc_ptr + r * stride_xr, conv_state_ptr + r * stride_cr, c, S, stride_cc, stride_cs,
                          BLOCK_S)
        v, ss = _gate_sumsq(v, z_or_parts, 0, Z_GATE)
        rstd = 1.0 / tl.sqrt(ss / GROUP_SIZE + eps)
        tl.store(out_ptr + r * D_INNER + d, (v * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


if triton is not None:
    @triton.jit
    def _norm_shift_out_kernel(xbc_ptr, z_ptr, conv_state_ptr, v_ptr, sumsq_ptr, norm_w_ptr, out_w_ptr, out_ptr,
                               stride_xr, stride_cr, stride_cc, stride_cs, S, eps, N_OUT, D_INNER, N_PARTS,
                               ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, BLOCK_PARTS: tl.constexpr, BLOCK_S: tl.constexpr,
                               Z_GATE: tl.constexpr, PDL: tl.constexpr):
        """Kernel 2 with out_proj (one group): out[r, n] = sum_k W[n, k] * v[r, k] * rstd[r] * norm_w[k]
        (Z_GATE: as in _norm_shift_kernel)."""
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        w = tl.load(out_w_ptr + n[:, None].to(tl.int64) * D_INNER + k[None, :],
                    mask=(n[:, None] < N_OUT) & (k[None, :] < D_INNER), other=0.0)
        norm_w = tl.load(norm_w_ptr + k, mask=k < D_INNER, other=0.0).to(tl.float32)
        _triton.pdl_wait(PDL)
        # every row's inputs at once, before any block-wide reduction (see _triton.select_row)
        i = tl.arange(0, ROWS_PAD)
        m = (i[:, None] < ROWS) & (k[None, :] < D_INNER)
        if Z_GATE:
            v = tl.load(v_ptr + i[:, None] * D_INNER + k[None, :], mask=m, other=0.0)
            z_or_parts = tl.load(z_ptr + i[:, None] * D_INNER + k[None, :], mask=m, other=0.0).to(tl.float32)
        else:  # (the partials first: loaded after v, Triton lays the tiles out with 60 more barriers, sm_90)
            j = tl.arange(0, BLOCK_PARTS)
            z_or_parts = tl.load(sumsq_ptr + i[:, None] * N_PARTS + j[None, :],
                                 mask=(i[:, None] < ROWS) & (j[None, :] < N_PARTS), other=0.0)
            v = tl.load(v_ptr + i[:, None] * D_INNER + k[None, :], mask=m, other=0.0)
        # kernel 1 (every reader of the B/C conv windows) is done: shift them, one program per row (here,
        # so their loads go out with the others)
        for r in range(pid, ROWS, tl.num_programs(0)):
            _shift_conv_state(xbc_ptr + r * stride_xr, conv_state_ptr + r * stride_cr,
                              D_INNER + tl.arange(0, 2 * N), S, stride_cc, stride_cs, BLOCK_S)
        v, ss = _gate_sumsq(v, z_or_parts, 1, Z_GATE)
        rstd = 1.0 / tl.sqrt(ss / D_INNER + eps)
        x = (v * rstd[:, None] * norm_w[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)  # as unfused rounds y
        for r in tl.static_range(ROWS):
            x_r = _triton.select_row(x, i, r)
            y = tl.sum(w.to(tl.float32) * x_r[None, :], axis=1)
            tl.store(out_ptr + r * N_OUT + n, y.to(out_ptr.dtype.element_ty), mask=n < N_OUT)


def fused_out_reasons(rows: int, d_inner: int, ngroups: int, out_weight: Tensor, dtype: torch.dtype,
                      norm_weight_size: int, z_size: int = 0) -> list[str]:
    """Why kernel 2 cannot include out_proj (then kernel 2 and a separate GEMV run); empty: it can.
    z_size: the element size of z when kernel 2 applies the gate (the block step), else 0."""
    reasons = []
    if rows > gemv.MAX_ROWS:
        reasons.append(f"{rows} rows > {gemv.MAX_ROWS}")
    if ngroups != 1:
        reasons.append(f"ngroups {ngroups} != 1")
    if d_inner > gemv.TILE_ELEMENTS:
        reasons.append(f"d_inner {d_inner} > {gemv.TILE_ELEMENTS}")
    if out_weight.dtype != dtype or not out_weight.is_contiguous():
        reasons.append("out_weight is not a contiguous tensor of zxbcdt's dtype")
    # the input rebuilt per program: v (float32), z and norm_weight, read from L2
    return reasons + gemv.recompute_reasons(d_inner, rows * (4 + z_size) + norm_weight_size,
                                            out_weight.element_size())


def _ssm_step_args(conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                   A_log: Tensor, D: Tensor, dt_bias: Tensor, rows: int, h: int, p: int, n: int,
                   ngroups: int) -> tuple[tuple, tuple, dict, int]:
    """Kernel 1's arguments that both ops pass alike: (parameter tensors, their strides and sizes, constexprs,
    P-blocks per head)."""
    p_per_program = _p_per_program(rows, h, p)
    conv_weight, A_log, D, dt_bias = (t.contiguous() for t in (conv_weight, A_log, D, dt_bias))
    tensors = (conv_state, ssm_state, conv_weight, conv_bias.contiguous() if conv_bias is not None else conv_weight,
               A_log, D, dt_bias)
    strides = (*conv_state.stride(), *ssm_state.stride()[:3], *conv_weight.stride(), conv_state.shape[2], h,
               ngroups * n, h // ngroups)
    consts = dict(P=p, N=n, W=conv_weight.shape[1], P_PER_PROGRAM=p_per_program,
                  BLOCK_P=min(p_per_program, max(1, TILE_ELEMENTS // n)),
                  BLOCK_S=triton.next_power_of_2(conv_state.shape[2]), HAS_BIAS=conv_bias is not None,
                  num_warps=NUM_WARPS)
    return tensors, strides, consts, p // p_per_program


def _launch_gated_norm(xbc: Tensor, z: Optional[Tensor], conv_state: Tensor, v: Tensor, sumsq: Optional[Tensor],
                       norm_weight: Tensor, eps: float, ngroups: int, d_state: int,
                       out_weight: Optional[Tensor]) -> Tensor:
    """Kernel 2: the gated RMSNorm, with out_proj fused when `fused_out_reasons` allow (else a GEMV after it),
    and the B/C windows' shift. xbc: the rows' [x | B | C | dt] (row stride xbc.stride(0)). z None: v is gated
    and sumsq holds its v^2 partials (rows, parts); z (rows, d_inner): v is y, gated here (sumsq None)."""
    rows, d_inner = v.shape
    dtype, device = xbc.dtype, xbc.device
    z_size = z.element_size() if z is not None else 0
    fused = out_weight is not None and not fused_out_reasons(rows, d_inner, ngroups, out_weight, dtype,
                                                             norm_weight.element_size(), z_size)
    out = gemv._alloc_output(rows, out_weight.shape[0] if fused else d_inner, dtype, device)
    norm_weight = norm_weight.contiguous()
    z_arg = z if z is not None else v
    n_parts = sumsq.shape[1] if sumsq is not None else 1
    sumsq = sumsq if sumsq is not None else v
    state_len = conv_state.shape[2]
    block_s = triton.next_power_of_2(state_len)
    launch = _triton.launch_options(device)
    if fused:
        n_out = out_weight.shape[0]
        block_n, block_k = gemv.tile_shape(d_inner)
        _norm_shift_out_kernel[(triton.cdiv(n_out, block_n),)](
            xbc, z_arg, conv_state, v, sumsq, norm_weight, out_weight, out,
            xbc.stride(0), *conv_state.stride(), state_len, eps, n_out, d_inner, n_parts,
            ROWS=rows, ROWS_PAD=triton.next_power_of_2(rows), N=d_state, BLOCK_N=block_n, BLOCK_K=block_k,
            BLOCK_PARTS=triton.next_power_of_2(n_parts), BLOCK_S=block_s, Z_GATE=z is not None,
            num_warps=gemv.NUM_WARPS, **launch)
        return out
    group_size = d_inner // ngroups
    block_d = triton.next_power_of_2(group_size)
    parts_per_group = n_parts // ngroups
    _norm_shift_kernel[(rows, ngroups)](
        xbc, z_arg, conv_state, v, sumsq, norm_weight, out,
        xbc.stride(0), *conv_state.stride(), state_len, eps, d_inner, ngroups * d_state, group_size,
        parts_per_group, N=d_state, BLOCK_D=block_d, BLOCK_PARTS=triton.next_power_of_2(parts_per_group),
        BLOCK_S=block_s, Z_GATE=z is not None, num_warps=4 if block_d <= 2048 else 8, **launch)
    return out if out_weight is None else gemv.linear(out, out_weight)


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
    if rows == 0:
        return zxbcdt.new_empty(0, (norm_weight if out_weight is None else out_weight).shape[0])
    tensors, strides, consts, p_blocks = _ssm_step_args(conv_state, ssm_state, conv_weight, conv_bias, A_log, D,
                                                        dt_bias, rows, h, p, n, ngroups)
    v = gemv._alloc_output(rows, d_inner, torch.float32, zxbcdt.device)
    sumsq = gemv._alloc_output(rows, h * p_blocks, torch.float32, zxbcdt.device)
    launch = _triton.launch_options(zxbcdt.device)
    _ssm_step_kernel[(rows, h, p_blocks)](zxbcdt, *tensors, v, sumsq, zxbcdt.stride(0), *strides, **consts,
                                          **launch)
    return _launch_gated_norm(zxbcdt[:, d_inner:], None, conv_state, v, sumsq, norm_weight, eps, ngroups, n,
                              out_weight)


_ext.register_backend(_mamba2_decode_step, "triton", device_type="cuda", impl=mamba2_decode_step_triton,
                      not_supported_reasons=not_supported_reasons, unavailable_reasons=_triton.unavailable_reasons)


# ---- the whole decode block: prologue + in_proj + decode step + out_proj -------------------------

def mamba2_block_step_ref(x: Tensor, residual: Optional[Tensor], x_gate: Optional[Tensor], norm_weight: Tensor,
                          shift: Tensor, scale: Tensor, in_weight: Tensor, conv_state: Tensor, ssm_state: Tensor,
                          conv_weight: Tensor, conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor,
                          mixer_norm_weight: Tensor, eps: float, headdim: int, ngroups: int,
                          out_weight: Tensor) -> tuple[Tensor, Tensor]:
    zxbcdt, residual_out = gemv.add_rmsnorm_modulate_linear_ref(x, residual, norm_weight, shift, scale, eps, x_gate,
                                                                in_weight)
    out = mamba2_decode_step_ref(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                 mixer_norm_weight, eps, headdim, ngroups, out_weight)
    return out, residual_out


@torch.library.custom_op("aim_kernels::mamba2_block_step", mutates_args=("conv_state", "ssm_state"))
def _mamba2_block_step(x: Tensor, residual: Optional[Tensor], x_gate: Optional[Tensor], norm_weight: Tensor,
                       shift: Tensor, scale: Tensor, in_weight: Tensor, conv_state: Tensor, ssm_state: Tensor,
                       conv_weight: Tensor, conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor,
                       mixer_norm_weight: Tensor, eps: float, headdim: int, ngroups: int,
                       out_weight: Tensor) -> tuple[Tensor, Tensor]:
    out, residual_out = mamba2_block_step_ref(x, residual, x_gate, norm_weight, shift, scale, in_weight, conv_state,
                                              ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                              mixer_norm_weight, eps, headdim, ngroups, out_weight)
    return out.contiguous(), residual_out.clone(memory_format=torch.contiguous_format)  # may alias x


@_mamba2_block_step.register_fake
def _(x, residual, x_gate, norm_weight, shift, scale, in_weight, conv_state, ssm_state, conv_weight, conv_bias, A_log,
      D, dt_bias, mixer_norm_weight, eps, headdim, ngroups, out_weight):
    return (x.new_empty(x.shape[0], out_weight.shape[0]),
            x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32)))


def block_step_not_supported_reasons(x: Tensor, residual: Optional[Tensor], x_gate: Optional[Tensor],
                                     norm_weight: Tensor, shift: Tensor, scale: Tensor, in_weight: Tensor,
                                     conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor,
                                     conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor,
                                     mixer_norm_weight: Tensor, eps: float, headdim: int, ngroups: int,
                                     out_weight: Tensor) -> list[str]:
    """Why the split kernels cannot run these (already validated) inputs; then add_rmsnorm_modulate_linear and
    mamba2_decode_step run, each on its own backend. The prologue must be fusable into the x/B/C/dt rows."""
    d_inner = mixer_norm_weight.shape[0]
    reasons = gemv.add_rmsnorm_modulate_linear_not_supported_reasons(x, residual, norm_weight, shift, scale, eps,
                                                                     x_gate, in_weight[d_inner:])
    return reasons + _state_reasons(conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                    mixer_norm_weight, ngroups, out_weight)


def _mamba2_block_step_unsplit(x: Tensor, residual: Optional[Tensor], x_gate: Optional[Tensor], norm_weight: Tensor,
                               shift: Tensor, scale: Tensor, in_weight: Tensor, conv_state: Tensor,
                               ssm_state: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], A_log: Tensor,
                               D: Tensor, dt_bias: Tensor, mixer_norm_weight: Tensor, eps: float, headdim: int,
                               ngroups: int, out_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The fallback on CUDA: the two ops, each on its own fastest backend."""
    zxbcdt, residual_out = gemv._add_rmsnorm_modulate_linear(x, residual, norm_weight, shift, scale, eps, x_gate,
                                                             in_weight)
    return _mamba2_decode_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                               mixer_norm_weight, eps, headdim, ngroups, out_weight), residual_out


def mamba2_block_step_triton(x: Tensor, residual: Optional[Tensor], x_gate: Optional[Tensor], norm_weight: Tensor,
                             shift: Tensor, scale: Tensor, in_weight: Tensor, conv_state: Tensor, ssm_state: Tensor,
                             conv_weight: Tensor, conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor,
                             dt_bias: Tensor, mixer_norm_weight: Tensor, eps: float, headdim: int, ngroups: int,
                             out_weight: Tensor) -> tuple[Tensor, Tensor]:
    """The split kernels (see the module docstring), callable on CPU tensors under TRITON_INTERPRET=1 (for tests)."""
    reasons = block_step_not_supported_reasons(x, residual, x_gate, norm_weight, shift, scale, in_weight, conv_state,
                                               ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                                               mixer_norm_weight, eps, headdim, ngroups, out_weight)
    if reasons:
        raise ValueError("the Triton mamba2_block_step cannot run these inputs: " + "; ".join(reasons))
    rows, d_model = x.shape
    d_inner, conv_dim, h = mixer_norm_weight.shape[0], conv_weight.shape[0], A_log.shape[0]
    n = (conv_dim - d_inner) // (2 * ngroups)
    dev, dtype = x.device, x.dtype
    residual_out = gemv._alloc_output(rows, d_model, torch.float32, dev)
    if rows == 0:
        return x.new_empty(0, out_weight.shape[0]), residual_out
    # kernel 0: the prologue and in_proj's x, B, C, dt rows, writing the prologue's output for z's GEMV
    xbcdt = gemv._alloc_output(rows, conv_dim + h, dtype, dev)
    h_rows = gemv._alloc_output(rows, d_model, dtype, dev)
    gemv.launch_prologue_gemv(x, residual, norm_weight, shift, scale, eps, x_gate, in_weight[d_inner:], xbcdt,
                              residual_out, h_rows)
    # kernel 1: z's GEMV beside the SSM update
    tensors, strides, consts, p_blocks = _ssm_step_args(conv_state, ssm_state, conv_weight, conv_bias, A_log, D,
                                                        dt_bias, rows, h, headdim, n, ngroups)
    z_weight = in_weight[:d_inner]
    z = gemv._alloc_output(rows, d_inner, dtype, dev)
    v = gemv._alloc_output(rows, d_inner, torch.float32, dev)
    block_n, block_k = gemv.tile_shape(d_model)
    z_programs = triton.cdiv(d_inner, block_n)
    _ssm_step_z_kernel[(z_programs + rows * h * p_blocks,)](
        xbcdt, h_rows, z_weight, z, *tensors, v, d_model, z_programs, xbcdt.stride(0), h_rows.stride(0),
        z_weight.stride(0), *strides, p_blocks, ROWS=rows, ROWS_PAD=triton.next_power_of_2(rows), BLOCK_N=block_n,
        BLOCK_K=block_k, **consts, **_triton.launch_options(dev))
    # kernel 2: the gate, the gated RMSNorm and out_proj
    return _launch_gated_norm(xbcdt, z, conv_state, v, None, mixer_norm_weight, eps, ngroups, n,
                              out_weight), residual_out


_ext.register_backend(_mamba2_block_step, "triton", device_type="cuda", impl=mamba2_block_step_triton,
                      not_supported_reasons=block_step_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons, fallback=_mamba2_block_step_unsplit)


# ---- public API --------------------------------------------------------------------------------

def _check_step_args(rows: int, dev: torch.device, dtype: torch.dtype, conv_state: Tensor, ssm_state: Tensor,
                     conv_weight: Tensor, conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor,
                     norm_weight: Tensor, headdim: int, ngroups: int, out_weight: Optional[Tensor]) -> int:
    """The checks both ops make of the caches and the mixer's parameters; returns in_proj's out_features."""
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
    if conv_bias is not None:
        check_tensor("conv_bias", conv_bias, (conv_dim,), device=dev)
    check_tensor("conv_state", conv_state, (rows, conv_dim, None), device=dev)
    if conv_state.shape[2] < width - 1:
        raise ValueError(f"conv_state holds {conv_state.shape[2]} steps, the width-{width} conv needs "
                         f"at least {width - 1}")
    check_tensor("ssm_state", ssm_state, (rows, nheads, headdim, d_state), device=dev)
    if out_weight is not None:
        check_tensor("out_weight", out_weight, (None, d_inner), device=dev, dtypes=(dtype,))
    return d_inner + conv_dim + nheads


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
    check_tensor("zxbcdt", zxbcdt, (None, None), device=zxbcdt.device)
    features = _check_step_args(zxbcdt.shape[0], zxbcdt.device, zxbcdt.dtype, conv_state, ssm_state, conv_weight,
                                conv_bias, A_log, D, dt_bias, norm_weight, headdim, ngroups, out_weight)
    check_tensor("zxbcdt", zxbcdt, (zxbcdt.shape[0], features), device=zxbcdt.device)
    return _mamba2_decode_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias,
                               norm_weight, float(eps), headdim, ngroups, out_weight)


def mamba2_block_step(x: Tensor, residual: Optional[Tensor], x_gate: Optional[Tensor], norm_weight: Tensor,
                      shift: Tensor, scale: Tensor, in_weight: Tensor, conv_state: Tensor, ssm_state: Tensor,
                      conv_weight: Tensor, conv_bias: Optional[Tensor], A_log: Tensor, D: Tensor, dt_bias: Tensor,
                      mixer_norm_weight: Tensor, eps: float, headdim: int, ngroups: int,
                      out_weight: Tensor) -> tuple[Tensor, Tensor]:
    """One decode step of an AiM block with a Mamba2 mixer in state form: `add_rmsnorm_modulate_linear` (the
    prologue and in_proj) then `mamba2_decode_step` with out_proj. Returns (mixer output (R, d_out), residual).

    x, residual, x_gate, shift, scale (R, d_model) as in add_rmsnorm_modulate_linear (norm_weight: the
    block's RMSNorm); in_weight (2*d_inner + 2*G*N + H, d_model); the rest as in mamba2_decode_step
    (mixer_norm_weight: its gated RMSNorm). eps serves both norms. On CUDA at few rows, z's rows of in_proj
    run beside the SSM update (the module docstring); elsewhere the two ops run. Decode-only: no autograd.
    """
    gemv.check_prologue_args(x, residual, norm_weight, shift, scale, x_gate, in_weight, "in_weight")
    features = _check_step_args(x.shape[0], x.device, x.dtype, conv_state, ssm_state, conv_weight, conv_bias, A_log,
                                D, dt_bias, mixer_norm_weight, headdim, ngroups, out_weight)
    if out_weight is None:
        raise ValueError("out_weight (the out_proj weight) is required")
    check_tensor("in_weight", in_weight, (features, x.shape[1]), device=x.device, dtypes=(x.dtype,))
    return _mamba2_block_step(x, residual, x_gate, norm_weight, shift, scale, in_weight, conv_state, ssm_state,
                              conv_weight, conv_bias, A_log, D, dt_bias, mixer_norm_weight, float(eps), headdim,
                              ngroups, out_weight)


__all__ = ["mamba2_block_step", "mamba2_block_step_ref", "mamba2_block_step_triton", "mamba2_decode_step",
           "mamba2_decode_step_ref", "mamba2_decode_step_triton", "not_supported_reasons"]
