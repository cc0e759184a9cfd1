"""Mamba2 decoding in the SSD (attention-like) form: replay this sequence's per-token inputs instead of
carrying the (R, H, P, N) state.

Per row and head h (B/C group h // (H / G)), at step t:
    dt_s = softplus(dt_raw_s + dt_bias),  cum_t = sum_{s <= t} dt_s A            (A < 0: cum decreases)
    y_t[h, p] = sum_{s <= t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s[h, p] + D x_t[h, p]
which is exactly the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t
started from a zero state. `ssd_replay_step` appends x_t, B_t (in the histories' dtype, the model
dtype), dt_t and cum_t at index `step` of the histories (R, T, ...) and returns y_t. The step is a
0-dim int64 tensor on the device (the decode loop's counter), so nothing syncs with the host and the
loop can be captured in a CUDA graph. Entries beyond `step` (a previous generation's) are never
used: the kernel does not load them, the reference masks them out before exp() and the products.

Bytes per step, AiM-XL (48 layers, H = 48, P = 64, N = 128, G = 1, T = 256) at batch 64 with CFG
(R = 128), bf16 model, averaged over the 256 steps (mean number of history entries 128.5):
- recurrent (selective_state_update / mamba2_decode_step, fp32 state): the state read and written,
  2 x 128 x 48 x 64 x 128 x 4 B = 403 MB per layer, 19.3 GB per step over 48 layers.
- replay: per history entry and row H*P*2 (x) + G*N*2 (B) + H*4 (dt) + H*4 (cum) = 6784 B, read
  128 x 128.5 x 6784 B = 112 MB per layer, plus ~1.5 MB for the step's own inputs, appends and y,
  plus the Triton path's float32 weight scratch (written and read: 2 x H*4 = 384 B per entry, 6 MB):
  ~120 MB per layer, 5.7 GB per step over 48 layers, 30% of the recurrent bytes (the last step,
  t = 255, moves ~235 MB per layer: 58%). fp32 model (x, B histories in fp32): 128 x 128.5 x 13184 B
  = 217 MB per layer (54%, 55% with the scratch).
The replay form moves fewer bytes per step while (t + 1) ((H*P + G*N) e + 16 H) < 2 H*P*N*4
(e: model dtype bytes; 16 H: dt, cum and the weight scratch): every step while t < 438 (bf16)
or t < 231 (fp32: AiM's last 25 steps move more than the state form), on average over a
sequence while T <~ 880 (bf16) or ~460 (fp32). AiM's T = 256 is below both averages. The
histories take R x T x 6784 B = 222 MB per layer at R = 128 (bf16), about the fp32 state's 201 MB.
Measured (H200, triton 3.6, all 256 steps in one CUDA graph, mean per step and layer, R = 128, H = 48):
41 us bf16 / 65 us fp32 (2.7 / 3.4 TB/s on the bytes above without the scratch), against 100 us
for a plain copy of the fp32 state (403 MB at 4.04 TB/s, the recurrent form's floor) and the
official selective_state_update's 127 us (AIM_SPEC section 8).

`mamba2_replay_step` is the same step from the conv input: the causal conv update (+ SiLU) of
[x | B | C] runs inside the two kernels below (the weights kernel convolves B and C, the weighted-sum
kernel its head block's x channels and shifts the windows), one launch per layer fewer than a separate
causal_conv1d_update. `mamba2_replay_step_gated` also applies the mixer's gate in the weighted-sum
kernel and defers its RMSNorm (one norm group): it returns u = y * silu(z) * norm_weight and the heads'
parts of the row's mean square, and the next block's prologue scales out_proj(u) by 1/rms
(aim_kernels.norm, `x_mean_sq`): the separate gated-norm launch per layer disappears.

Triton backend (CUDA; CPU tensors under TRITON_INTERPRET=1 through `ssd_replay_step_triton`), two
launches (three with SPLITS > 1), each with programmatic dependent launch (`_triton.pdl_wait`):
1. `_weights_kernel`, grid (R, T / 32, G): dt_t = softplus(dt + dt_bias) and cum_t = cum_{t-1} +
   dt_t A for the group's heads; for its 32 entries s <= t: scores = B_s . C_t (B read once per row
   and group), w[r, s, h] = scores exp(cum_t - cum_s) dt_s into a float32 scratch (R, T, H)
   (programs whose 32 entries all lie beyond t only wait: at early steps, most of the grid). The
   s = t entry comes from the inputs (B_t rounded to the histories' dtype), so no program reads an
   entry written in this launch; the program whose block holds t appends x_t, B_t, dt_t, cum_t.
2. `_weighted_sum_kernel`, grid (R, H / HEADS, SPLITS): y[h, :] = sum_{s <= t} w[s, h] x_s[h, :]
   + D x_t[h, :], the x history read as (BLOCK_S * HEADS, P) tiles (HEADS * P contiguous elements
   per entry), products accumulated elementwise in float32 and reduced once after the loop (no
   per-iteration cross-thread reduction). `launch_config` picks the widest head block that still
   gives >= 2 programs per SM (R = 128, H = 48: 16 heads x 8 entries) and splits the history when R
   is small; split partials are summed by `_triton.sum_splits_kernel`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor, compute_dtype
from .causal_conv1d import MAX_WIDTH, causal_conv1d_update_ref, check_update_args
from .decode import _conv_silu, _shift_conv_state
from .ssm import _check_groups

from ._triton import tl, triton

HIST_STAT_DTYPES = (torch.float32, torch.float64)


def allocate_replay_history(rows: int, max_len: int, nheads: int, headdim: int, ngroups: int, d_state: int,
                            device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(hist_x (R, T, H, P), hist_B (R, T, G, N)) in `dtype`, (hist_dt, hist_cum) (R, T, H) in float32
    (float64 for a float64 model). Nothing needs zeroing between generations: entries beyond the
    current step are never used."""
    stat = torch.promote_types(dtype, torch.float32)
    return (torch.empty(rows, max_len, nheads, headdim, device=device, dtype=dtype),
            torch.empty(rows, max_len, ngroups, d_state, device=device, dtype=dtype),
            torch.empty(rows, max_len, nheads, device=device, dtype=stat),
            torch.empty(rows, max_len, nheads, device=device, dtype=stat))


def ssd_replay_step_ref(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                        hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> Tensor:
    cd = compute_dtype(x, dt, A, B, C, hist_cum)
    rows, T, h = hist_dt.shape
    g = B.shape[1]
    at = step.reshape(1)
    dtc = F.softplus(dt.to(cd) + dt_bias.to(cd))                                        # (R, H)
    prev = hist_cum.index_select(1, (at - 1).clamp_min(0))[:, 0].to(cd)
    cum_t = torch.where(step > 0, prev, torch.zeros_like(prev)) + dtc * A.to(cd)
    hist_x.index_copy_(1, at, x[:, None].to(hist_x.dtype))
    hist_B.index_copy_(1, at, B[:, None].to(hist_B.dtype))
    hist_dt.index_copy_(1, at, dtc[:, None].to(hist_dt.dtype))
    hist_cum.index_copy_(1, at, cum_t[:, None].to(hist_cum.dtype))
    cum_t = cum_t.to(hist_cum.dtype).to(cd)  # as stored: the s = t term gets exp(0) exactly
    valid = (torch.arange(T, device=x.device) <= step)[None, :, None]                   # (1, T, 1)
    # Entries beyond `step` may hold anything (inf, NaN): mask before exp() and before every product.
    decay = torch.exp(torch.where(valid, cum_t[:, None] - hist_cum.to(cd), -torch.inf))  # (R, T, H)
    scores = torch.einsum("rtgn,rgn->rtg", hist_B.to(cd), C.to(cd)).repeat_interleave(h // g, dim=2)
    w = torch.where(valid, scores * decay * hist_dt.to(cd), 0)
    xs = torch.where(valid[..., None], hist_x.to(cd), 0)
    y = torch.einsum("rth,rthp->rhp", w, xs) + D.to(cd)[:, None] * x.to(cd)
    return y.to(x.dtype)


def _split_xBC(xBC: Tensor, hist_x: Tensor, hist_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Views x (R, H, P), B, C (R, G, N) of a conv input or output xBC (R, H*P + 2*G*N)."""
    h, p = hist_x.shape[2:]
    g, n = hist_B.shape[2:]
    x, B, C = xBC.split([h * p, g * n, g * n], dim=-1)
    return x.unflatten(-1, (h, p)), B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n))


def mamba2_replay_step_ref(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                           conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                           hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> Tensor:
    """The causal conv update (+ SiLU) of xBC = [x | B | C], then `ssd_replay_step_ref` on its output."""
    x, B, C = _split_xBC(causal_conv1d_update_ref(xBC, conv_state, conv_weight, conv_bias, True), hist_x, hist_B)
    return ssd_replay_step_ref(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)


def gate_for_deferred_norm_ref(y: Tensor, z: Tensor, norm_weight: Tensor) -> tuple[Tensor, Tensor]:
    """(u, mean_sq) for y (R, H, P), z (R, H*P), norm_weight (H*P,): u = v * norm_weight in y's dtype with
    v = y * silu(z), and mean_sq[r, h] = sum_p v[r, h, p]^2 / (H*P) (float32+), so that with one norm
    group rmsnorm_gated(y, z, norm_weight, eps) = u * rsqrt(mean_sq.sum(-1) + eps) (up to u's rounding)."""
    cd = compute_dtype(y, z, norm_weight)
    rows, h, p = y.shape
    v = y.to(cd) * F.silu(z.to(cd).reshape(rows, h, p))
    u = (v * norm_weight.to(cd).reshape(h, p)).to(y.dtype)
    return u.reshape(rows, h * p), v.square().sum(-1) / (h * p)


def mamba2_replay_step_gated_ref(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                                 conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                                 hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor, z: Tensor,
                                 norm_weight: Tensor) -> tuple[Tensor, Tensor]:
    """`mamba2_replay_step_ref`, then `gate_for_deferred_norm_ref` on its output."""
    y = mamba2_replay_step_ref(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B, hist_dt,
                               hist_cum, step)
    return gate_for_deferred_norm_ref(y, z, norm_weight)


# ---- torch.library op --------------------------------------------------------------------------

@torch.library.custom_op("aim_kernels::ssd_replay_step", mutates_args=("hist_x", "hist_B", "hist_dt", "hist_cum"))
def _ssd_replay_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                     hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> Tensor:
    return ssd_replay_step_ref(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step).contiguous()


@_ssd_replay_step.register_fake
def _(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("aim_kernels::mamba2_replay_step",
                         mutates_args=("conv_state", "hist_x", "hist_B", "hist_dt", "hist_cum"))
def _mamba2_replay_step(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                        conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                        hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> Tensor:
    return mamba2_replay_step_ref(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B,
                                  hist_dt, hist_cum, step).contiguous()


@_mamba2_replay_step.register_fake
def _(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step):
    return xBC.new_empty(xBC.shape[0], *hist_x.shape[2:])


@torch.library.custom_op("aim_kernels::mamba2_replay_step_gated",
                         mutates_args=("conv_state", "hist_x", "hist_B", "hist_dt", "hist_cum"))
def _mamba2_replay_step_gated(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                              conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                              hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor, z: Tensor,
                              norm_weight: Tensor) -> tuple[Tensor, Tensor]:
    u, mean_sq = mamba2_replay_step_gated_ref(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x,
                                              hist_B, hist_dt, hist_cum, step, z, norm_weight)
    return u.contiguous(), mean_sq.contiguous()


@_mamba2_replay_step_gated.register_fake
def _(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step, z,
      norm_weight):
    rows, _, h, p = hist_x.shape
    return xBC.new_empty(rows, h * p), xBC.new_empty(rows, h, dtype=torch.promote_types(xBC.dtype, torch.float32))


# ---- Triton backend ----------------------------------------------------------------------------



def not_supported_reasons(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                          hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor,
                          step: Tensor) -> list[str]:
    """Why the Triton kernel cannot run these (already validated) inputs; empty list: it can."""
    reasons = _triton.reasons(x.device)
    reasons += _triton.dtype_reasons(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, hist_x=hist_x, hist_B=hist_B)
    for name, t in (("hist_dt", hist_dt), ("hist_cum", hist_cum)):
        if t.dtype != torch.float32:
            reasons.append(f"{name} is {t.dtype}; the Triton kernel keeps it in float32")
    for name, t in (("hist_x", hist_x), ("hist_B", hist_B), ("hist_dt", hist_dt), ("hist_cum", hist_cum)):
        if not t.is_contiguous():
            reasons.append(f"{name} is not contiguous")
    for name, t in (("x", x), ("B", B), ("C", C)):
        if t.stride(-1) != 1:
            reasons.append(f"{name}'s last dimension is not contiguous (stride(-1) != 1)")
    reasons += _triton.pow2_reasons(headdim=x.shape[2], d_state=B.shape[2])
    return reasons


def fused_not_supported_reasons(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                                conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                                hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> list[str]:
    """Why the Triton kernels cannot run mamba2_replay_step on these (validated) inputs; empty: they can."""
    x, B, C = _split_xBC(xBC, hist_x, hist_B)
    reasons = not_supported_reasons(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)
    reasons += _triton.dtype_reasons(conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias)
    if conv_weight.shape[1] > MAX_WIDTH:
        reasons.append(f"conv width {conv_weight.shape[1]} > {MAX_WIDTH}")
    return reasons


def _alloc_outputs(rows: int, nheads: int, headdim: int, max_len: int, splits: int, dtype: torch.dtype,
                   device: torch.device, gated: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y (R, H, P) in x's dtype; float32 scratch: weights (R, T, H), partials (SPLITS, R, H, P) (empty
    when SPLITS == 1); float32 mean_sq (R, H) of the gated op (empty otherwise)."""
    return (torch.empty(rows, nheads, headdim, dtype=dtype, device=device),
            torch.empty(rows, max_len, nheads, dtype=torch.float32, device=device),
            torch.empty(splits if splits > 1 else 0, rows, nheads, headdim, dtype=torch.float32, device=device),
            torch.empty(rows if gated else 0, nheads, dtype=torch.float32, device=device))


def launch_config(rows: int, nheads: int, headdim: int, max_len: int,
                  device: torch.device) -> tuple[int, int, int, int]:
    """(HEADS, BLOCK_S, SPLITS, WARPS) of the weighted-sum kernel: heads per program, history entries
    per iteration, splits of the history, warps per program."""
    # the widest head block (long contiguous rows of x) that still gives >= 2 programs per SM
    sms = _triton.num_sms(device)
    divisors = [b for b in (16, 8, 4, 2, 1) if nheads % b == 0]
    heads = next((b for b in divisors if rows * (nheads // b) >= 2 * sms), next(b for b in divisors if b <= 4))
    block_s = max(1, 8192 // (heads * headdim))  # an (entries x heads, P) tile of 8192 elements
    programs = rows * (nheads // heads)
    splits = 1  # split the history while the grid is small and every split keeps >= 2 tiles
    while programs * splits < 2 * sms and max_len >= 4 * splits * block_s:
        splits *= 2
    return heads, block_s, splits, 4


if triton is not None:
    @triton.jit
    def _weights_kernel(x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, dt_bias_ptr, hx_ptr, hB_ptr, hdt_ptr, hcum_ptr,
                        step_ptr, w_ptr, cs_ptr, cw_ptr, cb_ptr,
                        stride_xr, stride_xh, stride_dtr, stride_dth, stride_br, stride_bg, stride_cr, stride_cg,
                        stride_csr, stride_csc, stride_css, stride_cwc, stride_cwk, S, T, H, G, HEADS_PER_GROUP,
                        P: tl.constexpr, N: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                        CONV: tl.constexpr, W: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, PDL: tl.constexpr):
        """w[r, s, h] = (C_t . B_s) exp(cum_t - cum_s) dt_s for s <= t in this program's block, heads
        of group g; the program whose block holds t appends B_t, dt_t, cum_t (and x_t without CONV).

        CONV: x_ptr is the row's conv input [x | B | C] (stride_xr per row) and cs/cw/cb the conv state,
        weights and bias; B_t and C_t are the conv + SiLU outputs (every program recomputes them, from
        L2). `_weighted_sum_kernel` convolves x and shifts every window, after all reads here."""
        r = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        g = tl.program_id(2)
        _triton.pdl_wait(PDL)
        t = tl.load(step_ptr)
        # entries beyond t are not used yet: their programs only wait (the grid is fixed for the whole
        # generation, so early steps launch mostly such programs)
        if tl.program_id(1) * BLOCK_S <= t:
            i = tl.arange(0, GROUP_PAD)
            hmask = i < HEADS_PER_GROUP
            h = g * HEADS_PER_GROUP + i
            n = tl.arange(0, N)
            row_ht = r * T * H                                                    # (R, T, H) arrays

            if CONV:
                xbc_row = x_ptr + r * stride_xr
                cs_row = cs_ptr + r * stride_csr
                # rounded to the input dtype, as a separate conv's output is
                C = _conv_silu(xbc_row, cs_row, cw_ptr, cb_ptr, H * P + G * N + g * N + n, S, stride_csc, stride_css,
                               stride_cwc, stride_cwk, W, HAS_CONV_BIAS).to(x_ptr.dtype.element_ty).to(tl.float32)
                B_t = _conv_silu(xbc_row, cs_row, cw_ptr, cb_ptr, H * P + g * N + n, S, stride_csc, stride_css,
                                 stride_cwc, stride_cwk, W, HAS_CONV_BIAS).to(x_ptr.dtype.element_ty)
                B_t = B_t.to(hB_ptr.dtype.element_ty)
            else:
                C = tl.load(C_ptr + r * stride_cr + g * stride_cg + n).to(tl.float32)
                B_t = tl.load(B_ptr + r * stride_br + g * stride_bg + n).to(hB_ptr.dtype.element_ty)

            # softplus in float64: log(1 + exp(dt)) loses ~1e-4 relative in float32 when dt is small
            dt = (tl.load(dt_ptr + r * stride_dtr + h * stride_dth, mask=hmask, other=0.0).to(tl.float64)
                  + tl.load(dt_bias_ptr + h, mask=hmask, other=0.0).to(tl.float64))
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt))).to(tl.float32)
            prev = tl.load(hcum_ptr + row_ht + (t - 1) * H + h, mask=hmask & (t > 0) & (t <= T), other=0.0)
            cum_t = prev + dt * tl.load(A_ptr + h, mask=hmask, other=0.0).to(tl.float32)

            # s < t from the histories; s = t from the inputs (no entry written in this launch is read)
            past = (s < t) & (s < T)
            hB_row = hB_ptr + r * T * G * N + g * N
            sh = row_ht + s[:, None] * H + h[None, :]
            pmask = past[:, None] & hmask[None, :]
            # every history load before the first barrier (B_t's broadcast below, the scores' reduction):
            # a load after one is another round trip
            Bs = tl.load(hB_row + s[:, None] * (G * N) + n[None, :], mask=past[:, None], other=0.0)
            cum_s = tl.load(hcum_ptr + sh, mask=pmask, other=0.0)
            dt_s = tl.load(hdt_ptr + sh, mask=pmask, other=0.0)
            now = (s == t)[:, None]
            Bs = tl.where(now, B_t[None, :], Bs).to(tl.float32)
            cum_s = tl.where(now, cum_t[None, :], cum_s)
            dt_s = tl.where(now, dt[None, :], dt_s)
            scores = tl.sum(Bs * C[None, :], axis=1)                              # (BLOCK_S,)
            used = (past[:, None] | now) & hmask[None, :]
            w = scores[:, None] * tl.exp(tl.where(used, cum_t[None, :] - cum_s, float("-inf"))) * dt_s
            tl.store(w_ptr + sh, w, mask=used & (s < T)[:, None])

            if (t < tl.program_id(1) * BLOCK_S + BLOCK_S) & (t < T):  # this block holds t
                if not CONV:
                    p = tl.arange(0, P)
                    x_t = tl.load(x_ptr + r * stride_xr + h[:, None] * stride_xh + p[None, :], mask=hmask[:, None],
                                  other=0.0)
                    tl.store(hx_ptr + (row_ht + t * H + h[:, None]) * P + p[None, :], x_t.to(hx_ptr.dtype.element_ty),
                             mask=hmask[:, None])
                tl.store(hB_row + t * (G * N) + n, B_t)
                tl.store(hdt_ptr + row_ht + t * H + h, dt, mask=hmask)
                tl.store(hcum_ptr + row_ht + t * H + h, cum_t, mask=hmask)

    @triton.jit
    def _weighted_sum_kernel(x_ptr, D_ptr, hx_ptr, w_ptr, step_ptr, y_ptr, part_ptr, cs_ptr, cw_ptr, cb_ptr,
                             z_ptr, nw_ptr, ms_ptr,
                             stride_xr, stride_xh, stride_csr, stride_csc, stride_css, stride_cwc, stride_cwk,
                             stride_zr, S, T, H, G, S_PER_SPLIT,
                             P: tl.constexpr, N: tl.constexpr, HEADS: tl.constexpr, BLOCK_S: tl.constexpr,
                             SPLIT: tl.constexpr, CONV: tl.constexpr, W: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
                             GATED: tl.constexpr, BLOCK_STATE: tl.constexpr, PDL: tl.constexpr):
        """y[r, h] = sum_{s <= t} w[r, s, h] x_s[h] (+ D x_t): (BLOCK_S x HEADS, P) tiles of the x
        history, float32 products accumulated elementwise, reduced once at the end.

        GATED (without SPLIT): y (rounded to its dtype) is gated for a deferred norm instead
        (`gate_for_deferred_norm_ref`): y_ptr gets u = y * silu(z) * norm_weight and ms_ptr the heads'
        mean-square parts.

        CONV (HEADS divides H): x_ptr is the row's conv input; x_t is this head block's conv + SiLU,
        computed before the loop (the loop then covers s < t), and split 0 appends it at t, shifts the
        block's conv windows (their only reader) and, in head block 0, the row's B/C windows (the
        weights kernel, their other reader, has finished)."""
        r = tl.program_id(0).to(tl.int64)
        h0 = tl.program_id(1) * HEADS
        k = tl.program_id(2)
        _triton.pdl_wait(PDL)
        t = tl.load(step_ptr)
        K: tl.constexpr = BLOCK_S * HEADS
        e = tl.arange(0, K)
        he = h0 + e % HEADS                                                   # tile row e: entry e // HEADS
        p = tl.arange(0, P)
        h = h0 + tl.arange(0, HEADS)
        hp = h[:, None] * P + p[None, :]
        hmask = (h < H)[:, None]
        if CONV:  # rounded to the input dtype, as a separate conv's output is, then as the history stores it
            x_t = _conv_silu(x_ptr + r * stride_xr, cs_ptr + r * stride_csr, cw_ptr, cb_ptr, hp, S, stride_csc,
                             stride_css, stride_cwc, stride_cwk, W, HAS_CONV_BIAS).to(x_ptr.dtype.element_ty)
            x_t = x_t.to(hx_ptr.dtype.element_ty)
            last = t     # entry t is not in the history yet
        else:
            x_t = tl.load(x_ptr + r * stride_xr + h[:, None] * stride_xh + p[None, :], mask=hmask, other=0.0)
            last = t + 1
        # everything that does not depend on the loop goes out before it (a load after the loop's final
        # reduction would be another round trip): the D skip, the s = t weight, split 0's append and shifts
        coef = tl.load(D_ptr + h, mask=h < H, other=0.0).to(tl.float32)
        if CONV:  # the s = t term
            coef += tl.load(w_ptr + (r * T + t) * H + h, mask=(h < H) & (t < T), other=0.0)
            if k == 0:  # this head block's taps are read: shift its windows (their only reader)
                tl.store(hx_ptr + (r * T + t) * (H * P) + hp, x_t, mask=t < T)
                _shift_conv_state(x_ptr + r * stride_xr, cs_ptr + r * stride_csr, tl.reshape(hp, (HEADS * P,)), S,
                                  stride_csc, stride_css, BLOCK_STATE)
        s_lo = k * S_PER_SPLIT
        s_end = tl.minimum(tl.minimum(s_lo + S_PER_SPLIT, last), T)
        acc = tl.zeros((K, P), dtype=tl.float32)
        for s0 in range(s_lo, s_end, BLOCK_S):
            s = s0 + e // HEADS
            mask = (s < s_end) & (he < H)
            sh = (r * T + s) * H + he
            w = tl.load(w_ptr + sh, mask=mask, other=0.0)
            xs = tl.load(hx_ptr + sh[:, None] * P + p[None, :], mask=mask[:, None], other=0.0)
            acc += w[:, None] * xs.to(tl.float32)
        if GATED:  # after the loop (loaded before it, they held the loop back behind a layout barrier) and
            # before its reduction, which hides their latency
            z = tl.load(z_ptr + r * stride_zr + hp, mask=hmask, other=0.0).to(tl.float32)
            norm_w = tl.load(nw_ptr + hp, mask=hmask, other=0.0).to(tl.float32)
        out = tl.sum(tl.reshape(acc, (BLOCK_S, HEADS, P)), axis=0)          # (HEADS, P)
        if k == 0:
            out += coef[:, None] * x_t.to(tl.float32)
        if SPLIT:
            tl.store(part_ptr + (k * tl.num_programs(0) + r) * (H * P) + hp, out, mask=hmask)
        elif GATED:
            v = out.to(y_ptr.dtype.element_ty).to(tl.float32)  # rounded as the ungated op's y
            v = v * z * tl.sigmoid(z)
            tl.store(y_ptr + r * (H * P) + hp, (v * norm_w).to(y_ptr.dtype.element_ty), mask=hmask)
            tl.store(ms_ptr + r * H + h, tl.sum(v * v, axis=1) / (H * P), mask=h < H)
        else:
            tl.store(y_ptr + r * (H * P) + hp, out.to(y_ptr.dtype.element_ty), mask=hmask)
        if CONV:
            if (k == 0) & (tl.program_id(1) == 0):  # the row's B/C windows (the weights kernel has finished)
                for c0 in range(H * P, H * P + 2 * G * N, N):
                    _shift_conv_state(x_ptr + r * stride_xr, cs_ptr + r * stride_csr, c0 + tl.arange(0, N), S,
                                      stride_csc, stride_css, BLOCK_STATE)


WEIGHTS_BLOCK_S = 32


def _launch(dt: Tensor, A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor,
            hist_cum: Tensor, step: Tensor, config: Optional[tuple[int, int, int, int]],
            x: Optional[Tensor] = None, B: Optional[Tensor] = None, C: Optional[Tensor] = None,
            xBC: Optional[Tensor] = None, conv_state: Optional[Tensor] = None, conv_weight: Optional[Tensor] = None,
            conv_bias: Optional[Tensor] = None, z: Optional[Tensor] = None,
            norm_weight: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """The two (three) launches, from x, B, C (ssd_replay_step) or from the conv input xBC (mamba2_replay_step);
    with z and norm_weight, (u, mean_sq) as `gate_for_deferred_norm_ref` (mamba2_replay_step_gated)."""
    rows, T, h, p = hist_x.shape
    g, n = hist_B.shape[2:]
    conv = xBC is not None
    heads, block_s, splits, warps = config or launch_config(rows, h, p, T, hist_x.device)
    if conv and h % heads:
        raise ValueError(f"mamba2_replay_step: the head block ({heads}) must divide the {h} heads")
    gated = z is not None
    y, w, partials, mean_sq = _alloc_outputs(rows, h, p, T, splits, (xBC if conv else x).dtype, hist_x.device, gated)
    if rows == 0:
        return (y.reshape(0, h * p), mean_sq) if gated else y
    A, D, dt_bias = (t.contiguous() for t in (A, D, dt_bias))
    per_group = h // g
    group_pad = triton.next_power_of_2(per_group)
    if conv:
        x_in, xs = xBC, (xBC.stride(0), 0)
        conv_args = (conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight)
        conv_strides = (*conv_state.stride(), *conv_weight.stride(), conv_state.shape[2])
        width, block_state = conv_weight.shape[1], triton.next_power_of_2(conv_state.shape[2])
    else:
        x_in, xs = x, (x.stride(0), x.stride(1))
        conv_args, conv_strides, width, block_state = (x, x, x), (0, 0, 0, 0, 0, 1), 2, 1
    B_in, C_in = (xBC, xBC) if conv else (B, C)
    launch = _triton.launch_options(hist_x.device)
    b_strides = (0, 0, 0, 0) if conv else (B.stride(0), B.stride(1), C.stride(0), C.stride(1))
    _weights_kernel[(rows, triton.cdiv(T, WEIGHTS_BLOCK_S), g)](
        x_in, dt, A, B_in, C_in, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step, w, *conv_args,
        *xs, dt.stride(0), dt.stride(1), *b_strides, *conv_strides, T, h, g, per_group,
        P=p, N=n, GROUP_PAD=group_pad, BLOCK_S=WEIGHTS_BLOCK_S, CONV=conv, W=width,
        HAS_CONV_BIAS=conv_bias is not None,
        # 8 warps serve the widest head groups without the conv; with it they made the kernel 2x slower (H100)
        num_warps=8 if group_pad * p >= 4096 and not conv else 4, **launch)
    s_per_split = triton.cdiv(triton.cdiv(T, splits), block_s) * block_s
    _weighted_sum_kernel[(rows, triton.cdiv(h, heads), splits)](
        x_in, D, hist_x, w, step, y, partials, *conv_args, z if gated else y, norm_weight if gated else D, mean_sq,
        *xs, *conv_strides[:-1], z.stride(0) if gated else 0, conv_strides[-1], T, h, g, s_per_split,
        P=p, N=n, HEADS=heads, BLOCK_S=block_s, SPLIT=splits > 1, CONV=conv, W=width,
        HAS_CONV_BIAS=conv_bias is not None, GATED=gated and splits == 1, BLOCK_STATE=block_state, num_warps=warps,
        **launch)
    if splits > 1:
        numel = y.numel()
        _triton.sum_splits_kernel[(triton.cdiv(numel, 1024),)](partials, y, numel, SPLITS=splits, BLOCK=1024,
                                                               num_warps=4, **launch)
        if gated:  # rare (few rows): the gate in PyTorch after the split sum
            return gate_for_deferred_norm_ref(y, z, norm_weight)
    return (y.reshape(rows, h * p), mean_sq) if gated else y


def ssd_replay_step_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                           hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor,
                           config: Optional[tuple[int, int, int, int]] = None) -> Tensor:
    """The Triton path of the op, callable on CPU tensors under TRITON_INTERPRET=1 (for tests).

    config: (HEADS, BLOCK_S, SPLITS, WARPS) instead of `launch_config`'s choice (tests, tuning).
    """
    reasons = not_supported_reasons(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)
    if reasons:
        raise ValueError("the Triton ssd_replay_step cannot run these inputs: " + "; ".join(reasons))
    return _launch(dt, A, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step, config, x=x, B=B, C=C)


def mamba2_replay_step_triton(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                              conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                              hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor,
                              config: Optional[tuple[int, int, int, int]] = None) -> Tensor:
    """The Triton path of mamba2_replay_step (CPU tensors under TRITON_INTERPRET=1 for tests)."""
    reasons = fused_not_supported_reasons(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x,
                                          hist_B, hist_dt, hist_cum, step)
    if reasons:
        raise ValueError("the Triton mamba2_replay_step cannot run these inputs: " + "; ".join(reasons))
    return _launch(dt, A, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step, config, xBC=xBC,
                   conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias)


def gated_not_supported_reasons(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                                conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                                hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor, z: Tensor,
                                norm_weight: Tensor) -> list[str]:
    """Why the Triton kernels cannot run mamba2_replay_step_gated on these (validated) inputs; empty: they can."""
    reasons = fused_not_supported_reasons(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B,
                                          hist_dt, hist_cum, step)
    reasons += _triton.dtype_reasons(z=z, norm_weight=norm_weight)
    if z.stride(-1) != 1 or not norm_weight.is_contiguous():
        reasons.append("z's last dimension or norm_weight is not contiguous")
    return reasons


def mamba2_replay_step_gated_triton(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                                    conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor,
                                    hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor,
                                    z: Tensor, norm_weight: Tensor,
                                    config: Optional[tuple[int, int, int, int]] = None) -> tuple[Tensor, Tensor]:
    """The Triton path of mamba2_replay_step_gated (CPU tensors under TRITON_INTERPRET=1 for tests)."""
    reasons = gated_not_supported_reasons(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B,
                                          hist_dt, hist_cum, step, z, norm_weight)
    if reasons:
        raise ValueError("the Triton mamba2_replay_step_gated cannot run these inputs: " + "; ".join(reasons))
    return _launch(dt, A, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step, config, xBC=xBC,
                   conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias, z=z, norm_weight=norm_weight)


_ext.register_backend(_ssd_replay_step, "triton", device_type="cuda", impl=ssd_replay_step_triton,
                      not_supported_reasons=not_supported_reasons, unavailable_reasons=_triton.unavailable_reasons)
_ext.register_backend(_mamba2_replay_step, "triton", device_type="cuda", impl=mamba2_replay_step_triton,
                      not_supported_reasons=fused_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)
_ext.register_backend(_mamba2_replay_step_gated, "triton", device_type="cuda", impl=mamba2_replay_step_gated_triton,
                      not_supported_reasons=gated_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)


# ---- public API --------------------------------------------------------------------------------

def ssd_replay_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                    hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> Tensor:
    """One Mamba2 decode step in the SSD form (see the module docstring); appends to the histories.

    x (R, H, P); dt (R, H) raw (before dt_bias and softplus); A, D, dt_bias (H,); B, C (R, G, N);
    hist_x (R, T, H, P), hist_B (R, T, G, N) (the model dtype), hist_dt, hist_cum (R, T, H) (float32
    or float64) from `allocate_replay_history`; step: 0-dim int64 tensor on the inputs' device, in
    [0, T), the same for every row. Returns y_t (R, H, P) in x's dtype, without the z gate.
    """
    _check_step_args(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)
    return _ssd_replay_step(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)


def _check_step_args(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                     hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be (rows, nheads, headdim), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    rows, h, p = x.shape
    dev = x.device
    check_tensor("x", x, (rows, h, p), device=dev)
    check_tensor("dt", dt, (rows, h), device=dev)
    for name, t in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        check_tensor(name, t, (h,), device=dev)
    check_tensor("B", B, (rows, None, None), device=dev)
    g, n = B.shape[1:]
    _check_groups(h, g)
    check_tensor("C", C, (rows, g, n), device=dev)
    check_tensor("hist_x", hist_x, (rows, None, h, p), device=dev)
    T = hist_x.shape[1]
    if T < 1:
        raise ValueError("the histories must hold at least one step (hist_x.shape[1] >= 1)")
    check_tensor("hist_B", hist_B, (rows, T, g, n), device=dev)
    check_tensor("hist_dt", hist_dt, (rows, T, h), device=dev, dtypes=HIST_STAT_DTYPES)
    check_tensor("hist_cum", hist_cum, (rows, T, h), device=dev, dtypes=HIST_STAT_DTYPES)
    check_tensor("step", step, (), device=dev, dtypes=(torch.int64,))


def _check_conv_step_args(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                          conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                          hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> None:
    if not isinstance(hist_x, Tensor) or hist_x.dim() != 4 or not isinstance(hist_B, Tensor) or hist_B.dim() != 4:
        raise ValueError("hist_x must be (rows, T, nheads, headdim) and hist_B (rows, T, ngroups, d_state)")
    rows, _, h, p = hist_x.shape
    g, n = hist_B.shape[2:]
    check_tensor("xBC", xBC, (rows, h * p + 2 * g * n), device=hist_x.device)
    check_update_args(xBC, conv_state, conv_weight, conv_bias, "silu")
    x, B, C = _split_xBC(xBC, hist_x, hist_B)
    _check_step_args(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)


def mamba2_replay_step(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                       conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                       hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> Tensor:
    """`causal_conv1d_update` (SiLU) of xBC, then `ssd_replay_step` on its output, in one op (two launches
    on the GPU: the conv runs inside the replay kernels).

    xBC (R, H*P + 2*G*N): the conv input [x | B | C] (in_proj's middle columns); conv_state (R, H*P +
    2*G*N, S >= width - 1), updated in place; conv_weight (H*P + 2*G*N, width); conv_bias or None; the
    rest as `ssd_replay_step` (H, P from hist_x; G, N from hist_B). Returns y_t (R, H, P).
    """
    _check_conv_step_args(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B, hist_dt,
                          hist_cum, step)
    return _mamba2_replay_step(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B, hist_dt,
                               hist_cum, step)


def mamba2_replay_step_gated(xBC: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                             conv_bias: Optional[Tensor], A: Tensor, D: Tensor, dt_bias: Tensor, hist_x: Tensor,
                             hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor, z: Tensor,
                             norm_weight: Tensor) -> tuple[Tensor, Tensor]:
    """`mamba2_replay_step` with the mixer's gate applied and its RMSNorm deferred (one norm group): returns
    (u, mean_sq) as `gate_for_deferred_norm_ref`, z (R, H*P) the gate (in_proj's first columns),
    norm_weight (H*P,). out_proj(u) scaled by rsqrt(mean_sq.sum(-1) + eps) per row is out_proj of the
    normalised output: the next block's prologue applies it (`x_mean_sq` of aim_kernels.norm), so
    decoding needs no separate norm kernel.
    """
    _check_conv_step_args(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B, hist_dt,
                          hist_cum, step)
    rows, _, h, p = hist_x.shape
    check_tensor("z", z, (rows, h * p), device=hist_x.device, dtypes=(xBC.dtype,))
    check_tensor("norm_weight", norm_weight, (h * p,), device=hist_x.device)
    return _mamba2_replay_step_gated(xBC, dt, conv_state, conv_weight, conv_bias, A, D, dt_bias, hist_x, hist_B,
                                     hist_dt, hist_cum, step, z, norm_weight)


__all__ = ["allocate_replay_history", "fused_not_supported_reasons", "gate_for_deferred_norm_ref",
           "gated_not_supported_reasons", "launch_config", "mamba2_replay_step", "mamba2_replay_step_gated",
           "mamba2_replay_step_gated_ref", "mamba2_replay_step_gated_triton", "mamba2_replay_step_ref",
           "mamba2_replay_step_triton", "not_supported_reasons", "ssd_replay_step", "ssd_replay_step_ref",
           "ssd_replay_step_triton"]
