"""Mamba2 decoding in the SSD (attention-like) form: replay this sequence's per-token inputs instead of
carrying the (R, H, P, N) state.

Per row and head h (B/C group h // (H / G)), at step t:
    dt_s = softplus(dt_raw_s + dt_bias),  cum_t = sum_{s <= t} dt_s A            (A < 0: cum decreases)
    y_t[h, p] = sum_{s <= t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s[h, p] + D x_t[h, p]
which is exactly the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t
started from a zero state. The histories (R, T, ...) hold x_s, B_s (the model dtype) and dt_s, cum_s
(float32); step t appends at index `step`, a 0-dim int64 tensor on the device (the decode loop's
counter), so nothing syncs with the host and the loop can be captured in a CUDA graph. Entries beyond
`step` (a previous generation's) are never used: the kernels do not load them, the reference masks
them out before exp() and the products.

- `ssd_replay_step` (reference only): one SSM step from the conv output, the building block and the
  definition the tests check against the recurrence and the chunked scan.
- `mamba2_replay_step`: the model's decode step, `decode.mamba2_decode_step` with the state replaced
  by the histories, from the in_proj output to the out_proj input (or output). Triton backend, two
  launches: kernel 1 (below), then `decode.norm_out` (group RMSNorm, out_proj at few rows, B/C
  conv-state shift), shared with the state form.

Bytes per step, AiM-XL (48 layers, H = 48, P = 64, N = 128, G = 1, T = 256) at batch 64 with CFG
(R = 128), bf16 model, averaged over the 256 steps (mean number of history entries 128.5):
- recurrent (mamba2_decode_step, fp32 state): the state read and written,
  2 x 128 x 48 x 64 x 128 x 4 B = 403 MB per layer, 19.3 GB per step over 48 layers.
- replay: per history entry and row H*P*2 (x) + G*N*2 (B) + H*4 (dt) + H*4 (cum) = 6784 B, read
  128 x 128.5 x 6784 B = 112 MB per layer, plus ~1.5 MB for the step's own inputs, appends and y,
  plus kernel 1's float32 weight scratch (written and read: 2 x H*4 = 384 B per entry, 6 MB):
  ~120 MB per layer, 30% of the recurrent bytes (the last step, t = 255, moves ~235 MB per layer:
  58%). fp32 model (x, B histories in fp32): 128 x 128.5 x 13184 B = 217 MB per layer (55% with the
  scratch).
The replay form moves fewer bytes per step while (t + 1) ((H*P + G*N) e + 16 H) < 2 H*P*N*4
(e: model dtype bytes; 16 H: dt, cum and the scratch): every step while t < 438 (bf16) or t < 231
(fp32: AiM's last 25 steps move more than the state form), on average over a sequence while
T <~ 880 (bf16) or ~460 (fp32). AiM's T = 256
is below both averages. The histories take R x T x 6784 B = 222 MB per layer at R = 128 (bf16),
about the fp32 state's 201 MB. Measured per layer at R = 128, t = 128 (benchmarks/bench_decode_step.py,
BENCHMARKS.md).

Kernel 1, grid (R, H / HEADS), one program per row and block of HEADS heads of one group: the conv
(+ SiLU) of its group's B/C channels (every program of the group recomputes them, from L2) and, last,
of its x channels; pass 1 writes w[s, h] = (C_t . B_s) exp(cum_t - cum_s) dt_s for s < t into a
float32 scratch (R, T, H); pass 2 sums w[s, h] x_s[h, :] over (BLOCK_S * HEADS, P) tiles of the x
history (HEADS * P contiguous elements per entry), accumulating elementwise in float32 and reducing
once after the loop; adds (C_t . B_t) dt_t x_t + D x_t, gates with silu(z) and leaves v and its v^2
partial for kernel 2. It appends x_t, dt_t, cum_t (the group's first program also B_t) at t, which no
program of the launch reads, and shifts its x channels' conv windows (no other program reads them).
Computing the weights in a first pass keeps the hot loop free of cross-thread reductions: with the
scores computed inside it the kernel was 1.2-1.5x slower (scripts/explore_replay_step.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _triton, decode, gemv
from ._util import check_tensor, compute_dtype
from .causal_conv1d import MAX_WIDTH, causal_conv1d_update_ref
from .norm import rmsnorm_gated_ref
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


# ---- torch.library op --------------------------------------------------------------------------

@torch.library.custom_op("aim_kernels::ssd_replay_step", mutates_args=("hist_x", "hist_B", "hist_dt", "hist_cum"))
def _ssd_replay_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                     hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> Tensor:
    return ssd_replay_step_ref(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step).contiguous()


@_ssd_replay_step.register_fake
def _(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- public API --------------------------------------------------------------------------------

def ssd_replay_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, dt_bias: Tensor,
                    hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor, hist_cum: Tensor, step: Tensor) -> Tensor:
    """One Mamba2 decode step in the SSD form (see the module docstring); appends to the histories.

    x (R, H, P); dt (R, H) raw (before dt_bias and softplus); A, D, dt_bias (H,); B, C (R, G, N);
    hist_x (R, T, H, P), hist_B (R, T, G, N) (the model dtype), hist_dt, hist_cum (R, T, H) (float32
    or float64) from `allocate_replay_history`; step: 0-dim int64 tensor on the inputs' device, in
    [0, T), the same for every row. Returns y_t (R, H, P) in x's dtype, without the z gate.
    """
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
    return _ssd_replay_step(x, dt, A, B, C, D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)


# ==== the fused decode step in replay form =========================================================

def mamba2_replay_step_ref(zxbcdt: Tensor, conv_state: Tensor, hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor,
                           hist_cum: Tensor, step: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                           A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor, eps: float, headdim: int,
                           ngroups: int, out_weight: Optional[Tensor] = None) -> Tensor:
    d_inner, conv_dim = norm_weight.shape[0], conv_weight.shape[0]
    h, n = A_log.shape[0], (conv_dim - d_inner) // (2 * ngroups)
    z, xBC, dt = zxbcdt.split([d_inner, conv_dim, h], dim=-1)
    xBC = causal_conv1d_update_ref(xBC, conv_state, conv_weight, conv_bias, True)
    x, B, C = xBC.split([d_inner, ngroups * n, ngroups * n], dim=-1)
    A = -torch.exp(A_log.float())  # float32 whatever the model dtype, as the official Mamba2 does
    y = ssd_replay_step_ref(x.unflatten(-1, (h, headdim)), dt, A, B.unflatten(-1, (ngroups, n)),
                            C.unflatten(-1, (ngroups, n)), D, dt_bias, hist_x, hist_B, hist_dt, hist_cum, step)
    y = rmsnorm_gated_ref(y.flatten(-2), z, norm_weight, eps, d_inner // ngroups)
    return y if out_weight is None else gemv.linear_ref(y, out_weight)


@torch.library.custom_op("aim_kernels::mamba2_replay_step",
                         mutates_args=("conv_state", "hist_x", "hist_B", "hist_dt", "hist_cum"))
def _mamba2_replay_step(zxbcdt: Tensor, conv_state: Tensor, hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor,
                        hist_cum: Tensor, step: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                        A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor, eps: float, headdim: int,
                        ngroups: int, out_weight: Optional[Tensor] = None) -> Tensor:
    return mamba2_replay_step_ref(zxbcdt, conv_state, hist_x, hist_B, hist_dt, hist_cum, step, conv_weight,
                                  conv_bias, A_log, D, dt_bias, norm_weight, eps, headdim, ngroups,
                                  out_weight).contiguous()


@_mamba2_replay_step.register_fake
def _(zxbcdt, conv_state, hist_x, hist_B, hist_dt, hist_cum, step, conv_weight, conv_bias, A_log, D, dt_bias,
      norm_weight, eps, headdim, ngroups, out_weight=None):
    return zxbcdt.new_empty(zxbcdt.shape[0], (norm_weight if out_weight is None else out_weight).shape[0])


def not_supported_reasons(zxbcdt: Tensor, conv_state: Tensor, hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor,
                               hist_cum: Tensor, step: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                               A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor, eps: float,
                               headdim: int, ngroups: int, out_weight: Optional[Tensor] = None) -> list[str]:
    """Why the Triton kernels cannot run these (already validated) inputs; empty list: they can."""
    reasons = _triton.reasons(zxbcdt.device)
    reasons += _triton.dtype_reasons(zxbcdt=zxbcdt, conv_state=conv_state, conv_weight=conv_weight,
                                     conv_bias=conv_bias, A_log=A_log, D=D, dt_bias=dt_bias, norm_weight=norm_weight,
                                     hist_x=hist_x, hist_B=hist_B, out_weight=out_weight)
    for name, t in (("hist_dt", hist_dt), ("hist_cum", hist_cum)):
        if t.dtype != torch.float32:
            reasons.append(f"{name} is {t.dtype}; the Triton kernel keeps it in float32")
    for name, t in (("hist_x", hist_x), ("hist_B", hist_B), ("hist_dt", hist_dt), ("hist_cum", hist_cum)):
        if not t.is_contiguous():
            reasons.append(f"{name} is not contiguous")
    if conv_weight.shape[1] > MAX_WIDTH:
        reasons.append(f"conv width {conv_weight.shape[1]} > {MAX_WIDTH}")
    if zxbcdt.stride(1) != 1:
        reasons.append("zxbcdt's channels are not contiguous (stride(1) != 1)")
    return reasons + _triton.pow2_reasons(headdim=headdim, d_state=hist_B.shape[3])


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def launch_config(rows: int, nheads: int, ngroups: int, headdim: int, dtype: torch.dtype,
                       device: torch.device) -> tuple[int, int, int]:
    """(HEADS, BLOCK_S, WARPS) of kernel 1: heads per program (a power of two dividing the heads of a
    group), history entries per iteration of the weighted sum, warps: the widest head block that
    keeps >= 2 programs per SM, (BLOCK_S * HEADS, P) tiles of 16 KB, 4 warps."""
    per_group = nheads // ngroups
    divisors = [b for b in (16, 8, 4, 2, 1) if per_group % b == 0]
    heads = next((b for b in divisors if rows * (nheads // b) >= 2 * _num_sms(device)), divisors[-1])
    return heads, max(1, 16384 // (heads * headdim * dtype.itemsize)), 4


if triton is not None:
    @triton.jit
    def _replay_kernel(zxbcdt_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, A_log_ptr, D_ptr, dt_bias_ptr,
                       hx_ptr, hB_ptr, hdt_ptr, hcum_ptr, step_ptr, w_ptr, v_ptr, sumsq_ptr,
                       stride_zr, stride_cr, stride_cc, stride_cs, stride_wc, stride_wk, S, T, H, GN,
                       HEADS_PER_GROUP, P: tl.constexpr, N: tl.constexpr, W: tl.constexpr, HEADS: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_SS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       PDL: tl.constexpr):
        """Program (r, heads h0..h0+HEADS): conv of its x channels and of its group's B/C, then
        y[h] = sum_{s < t} (C_t . B_s) exp(cum_t - cum_s) dt_s x_s[h] + (C_t . B_t) dt_t x_t[h] + D x_t[h],
        v = y * silu(z) and its v^2 partial for kernel 2; appends x_t, dt_t, cum_t (and B_t: the
        group's first program) at t, which no program of this launch reads; shifts its x conv windows."""
        r = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        h = hb * HEADS + tl.arange(0, HEADS)
        g = (hb * HEADS) // HEADS_PER_GROUP
        p = tl.arange(0, P)
        n = tl.arange(0, N)
        d_inner = H * P
        neg_A = tl.exp(tl.load(A_log_ptr + h).to(tl.float32))  # A = -exp(A_log)
        skip = tl.load(D_ptr + h).to(tl.float32)
        dt_bias = tl.load(dt_bias_ptr + h).to(tl.float64)
        _triton.pdl_wait(PDL)
        t = tl.load(step_ptr)
        z_row = zxbcdt_ptr + r * stride_zr
        xbc_row = z_row + d_inner
        cs_row = conv_state_ptr + r * stride_cr
        hx_dtype = hx_ptr.dtype.element_ty

        # this step's inputs, rounded to the histories' dtype as later steps will read them
        B_t = decode._conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, d_inner + g * N + n, S, stride_cc,
                                stride_cs, stride_wc, stride_wk, W, HAS_BIAS).to(hx_dtype)
        C_t = decode._conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, d_inner + GN + g * N + n, S, stride_cc,
                                stride_cs, stride_wc, stride_wk, W, HAS_BIAS)
        score_t = tl.sum(B_t.to(tl.float32) * C_t, axis=0)
        # softplus in float64: log(1 + exp(dt)) loses ~1e-4 relative in float32 when dt is small
        dt = tl.load(z_row + 2 * d_inner + 2 * GN + h).to(tl.float64) + dt_bias
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt))).to(tl.float32)
        row_ht = r * T * H                                                            # (R, T, H) arrays
        cum_t = tl.load(hcum_ptr + row_ht + (t - 1) * H + h, mask=(t > 0) & (h < H), other=0.0) - dt * neg_A

        hB_row = hB_ptr + r * T * GN + g * N
        # pass 1: w[s, h] = (C_t . B_s) exp(cum_t - cum_s) dt_s for s < t into this program's rows of
        # the float32 scratch, so that pass 2's loop is a plain weighted sum (no cross-thread work)
        s_in = tl.arange(0, BLOCK_W)
        for s0 in range(0, t, BLOCK_W):
            s = s0 + s_in
            past = s < t
            B_s = tl.load(hB_row + s[:, None] * GN + n[None, :], mask=past[:, None], other=0.0)
            scores = tl.sum(B_s.to(tl.float32) * C_t[None, :], axis=1)
            sh = row_ht + s[:, None] * H + h[None, :]
            cum_s = tl.load(hcum_ptr + sh, mask=past[:, None], other=0.0)
            dt_s = tl.load(hdt_ptr + sh, mask=past[:, None], other=0.0)
            w = scores[:, None] * tl.exp(tl.where(past[:, None], cum_t[None, :] - cum_s, float("-inf"))) * dt_s
            tl.store(w_ptr + sh, w, mask=past[:, None])
        tl.debug_barrier()  # pass 2 reads weights other threads of this program wrote
        # pass 2: (BLOCK_S * HEADS, P) tiles of the x history (HEADS * P contiguous elements per entry),
        # float32 products accumulated elementwise, reduced once after the loop
        K: tl.constexpr = BLOCK_S * HEADS
        e = tl.arange(0, K)
        he = hb * HEADS + e % HEADS
        acc = tl.zeros((K, P), dtype=tl.float32)
        for s0 in range(0, t, BLOCK_S):
            se = s0 + e // HEADS
            past = se < t
            sh = row_ht + se * H + he
            w = tl.load(w_ptr + sh, mask=past, other=0.0)
            x_s = tl.load(hx_ptr + sh[:, None] * P + p[None, :], mask=past[:, None], other=0.0)
            acc += w[:, None] * x_s.to(tl.float32)
        # the x channels' conv only now: fewer live registers in the loops
        ch = h[:, None] * P + p[None, :]                                              # (HEADS, P) x channels
        x_t = decode._conv_silu(xbc_row, cs_row, conv_w_ptr, conv_b_ptr, ch, S, stride_cc, stride_cs, stride_wc,
                                stride_wk, W, HAS_BIAS).to(hx_dtype)
        y = tl.sum(tl.reshape(acc, (BLOCK_S, HEADS, P)), axis=0) + (score_t * dt + skip)[:, None] * x_t.to(tl.float32)
        zg = tl.load(z_row + ch).to(tl.float32)
        v = y * zg * tl.sigmoid(zg)
        tl.store(v_ptr + r * d_inner + ch, v)
        tl.store(sumsq_ptr + r * tl.num_programs(1) + hb, tl.sum(tl.sum(v * v, axis=1), axis=0))

        if t < T:
            tl.store(hx_ptr + (row_ht + t * H + h[:, None]) * P + p[None, :], x_t)
            tl.store(hdt_ptr + row_ht + t * H + h, dt)
            tl.store(hcum_ptr + row_ht + t * H + h, cum_t)
            if (hb * HEADS) % HEADS_PER_GROUP == 0:
                tl.store(hB_row + t * GN + n, B_t)
        decode._shift_conv_state(xbc_row, cs_row, hb * HEADS * P + tl.arange(0, HEADS * P), S, stride_cc,
                                 stride_cs, BLOCK_SS)


def mamba2_replay_step_triton(zxbcdt: Tensor, conv_state: Tensor, hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor,
                              hist_cum: Tensor, step: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                              A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor, eps: float,
                              headdim: int, ngroups: int, out_weight: Optional[Tensor] = None,
                              config: Optional[tuple[int, int, int]] = None) -> Tensor:
    """The Triton path of the op, callable on CPU tensors under TRITON_INTERPRET=1 (for tests).

    config: (HEADS, BLOCK_S, WARPS) instead of `launch_config`'s choice (tests, tuning).
    """
    args = (zxbcdt, conv_state, hist_x, hist_B, hist_dt, hist_cum, step, conv_weight, conv_bias, A_log, D, dt_bias,
            norm_weight, eps, headdim, ngroups, out_weight)
    reasons = not_supported_reasons(*args)
    if reasons:
        raise ValueError("the Triton mamba2_replay_step cannot run these inputs: " + "; ".join(reasons))
    rows, T, h, p = hist_x.shape
    n = hist_B.shape[3]
    d_inner = h * p
    heads, block_s, warps = config or launch_config(rows, h, ngroups, p, hist_x.dtype, zxbcdt.device)
    fused_out = out_weight is not None and not decode.fused_out_reasons(
        rows, d_inner, ngroups, out_weight, zxbcdt.dtype, norm_weight.element_size())
    out, v, sumsq = decode._alloc_outputs(rows, d_inner, out_weight.shape[0] if fused_out else d_inner, h // heads,
                                          zxbcdt.dtype, zxbcdt.device)
    if rows == 0:
        return out if out_weight is None or fused_out else zxbcdt.new_empty(0, out_weight.shape[0])
    conv_weight, A_log, D, dt_bias, norm_weight = (t.contiguous()
                                                   for t in (conv_weight, A_log, D, dt_bias, norm_weight))
    conv_bias = conv_bias.contiguous() if conv_bias is not None else None
    state_len = conv_state.shape[2]
    _replay_kernel[(rows, h // heads)](
        zxbcdt, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, A_log, D, dt_bias,
        hist_x, hist_B, hist_dt, hist_cum, step, torch.empty(rows, T, h, device=zxbcdt.device), v, sumsq,
        zxbcdt.stride(0), *conv_state.stride(), *conv_weight.stride(), state_len, T, h, ngroups * n, h // ngroups,
        P=p, N=n, W=conv_weight.shape[1], HEADS=heads, BLOCK_S=block_s, BLOCK_W=32,
        BLOCK_SS=triton.next_power_of_2(state_len), HAS_BIAS=conv_bias is not None, num_warps=warps,
        **_triton.launch_options(zxbcdt.device))
    return decode.norm_out(zxbcdt, conv_state, v, sumsq, norm_weight, eps, out_weight, out, fused_out, ngroups, n)


_ext.register_backend(_mamba2_replay_step, "triton", device_type="cuda", impl=mamba2_replay_step_triton,
                      not_supported_reasons=not_supported_reasons, unavailable_reasons=_triton.unavailable_reasons)


def mamba2_replay_step(zxbcdt: Tensor, conv_state: Tensor, hist_x: Tensor, hist_B: Tensor, hist_dt: Tensor,
                       hist_cum: Tensor, step: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                       A_log: Tensor, D: Tensor, dt_bias: Tensor, norm_weight: Tensor, eps: float, headdim: int,
                       ngroups: int, out_weight: Optional[Tensor] = None) -> Tensor:
    """One Mamba2 decode step in replay form, from the in_proj output to the out_proj input (or, with
    `out_weight`, the mixer output): `mamba2_decode_step` with the SSM state replaced by this
    sequence's histories (`allocate_replay_history`), appended at index `step` (0-dim int64 tensor on
    the device, in [0, T)). conv_state (R, conv_dim, S) is updated in place as in the state form.
    """
    rows, d_inner, nheads, d_state = decode.check_step_args(zxbcdt, conv_state, conv_weight, conv_bias, A_log, D,
                                                            dt_bias, norm_weight, headdim, ngroups, out_weight)
    dev = zxbcdt.device
    check_tensor("hist_x", hist_x, (rows, None, nheads, headdim), device=dev)
    T = hist_x.shape[1]
    if T < 1:
        raise ValueError("the histories must hold at least one step (hist_x.shape[1] >= 1)")
    check_tensor("hist_B", hist_B, (rows, T, ngroups, d_state), device=dev)
    check_tensor("hist_dt", hist_dt, (rows, T, nheads), device=dev, dtypes=HIST_STAT_DTYPES)
    check_tensor("hist_cum", hist_cum, (rows, T, nheads), device=dev, dtypes=HIST_STAT_DTYPES)
    check_tensor("step", step, (), device=dev, dtypes=(torch.int64,))
    return _mamba2_replay_step(zxbcdt, conv_state, hist_x, hist_B, hist_dt, hist_cum, step, conv_weight, conv_bias,
                               A_log, D, dt_bias, norm_weight, float(eps), headdim, ngroups, out_weight)


__all__ = ["allocate_replay_history", "launch_config", "mamba2_replay_step", "mamba2_replay_step_ref",
           "mamba2_replay_step_triton", "not_supported_reasons", "ssd_replay_step", "ssd_replay_step_ref"]
