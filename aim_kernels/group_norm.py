"""GroupNorm with an optional SiLU after it, as the VQ tokenizer's Normalize (+ SiLU) uses it.

x is (N, C, *) with C divisible by num_groups; statistics per (sample, group) over C / num_groups
channels and every spatial position; out = GroupNorm(x) * weight + bias, then SiLU when asked, in x's
dtype and x's memory format (channels_last in, channels_last out). The reference computes in float32
(float64 for float64 inputs). `input_bias` (C,) is added to x first: GroupNorm(x + input_bias), so a
convolution before the norm can run without its bias (PyTorch adds a convolution's bias in a separate,
non-vectorised pass over a channels_last output).

Triton backend (4-D channels_last, or any contiguous (N, C, *)). The activations are large (64 x 128 x
256 x 256 bf16 = 1 GiB) and a group (4 x 65536 values) is far larger than a program's registers, so it
is bandwidth-bound and reads x twice, in three launches:
  1. statistics: each program takes a chunk of rows of one "batch" (NHWC: a sample, rows = positions,
     columns = channels; NCHW: one (sample, group), a contiguous run of Cg * HW values in one column) and
     keeps a running mean and M2 per register lane (Welford), combined over lanes by Chan's formula at the
     end: one (mean, M2) partial per (batch, chunk, column). No E[x^2] - E[x]^2: that cancels when
     |mean| >> std.
  2. finalize: one program per (sample, group) combines its partials (Chan again, about a refined mean)
     into per-channel mean, rstd * weight and bias.
  3. apply: reads x once more and writes (x - mean) * (rstd * weight) + bias, with SiLU, once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor, compute_dtype, is_channels_last, placeholder_grads, reference_vjp


def group_norm_ref(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                   silu: bool = False, input_bias: Optional[Tensor] = None) -> Tensor:
    """F.group_norm of x + input_bias (then SiLU) in float32, or float64 for float64 inputs; the result in x's dtype."""
    cd = compute_dtype(x, weight, bias, input_bias)
    x_c = x.to(cd)
    if input_bias is not None:
        x_c = x_c + input_bias.to(cd).reshape((-1,) + (1,) * (x.dim() - 2))
    y = F.group_norm(x_c, num_groups, None if weight is None else weight.to(cd),
                     None if bias is None else bias.to(cd), eps)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


# ---- torch.library op (forward; reference backward by recomputation) ------------------------------

@torch.library.custom_op("aim_kernels::group_norm", mutates_args=())
def _group_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                silu: bool, input_bias: Optional[Tensor]) -> Tensor:
    return torch.empty_like(x).copy_(group_norm_ref(x, weight, bias, num_groups, eps, silu, input_bias))


@_group_norm.register_fake
def _(x, weight, bias, num_groups, eps, silu, input_bias):
    return torch.empty_like(x)


@torch.library.custom_op("aim_kernels::group_norm_bwd", mutates_args=())
def _group_norm_bwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                    silu: bool, input_bias: Optional[Tensor], dout: Tensor) -> list[Tensor]:
    inputs = (x, weight, bias, input_bias)
    grads = reference_vjp(lambda x_, w_, b_, ib_: (group_norm_ref(x_, w_, b_, num_groups, eps, silu, ib_),),
                          inputs, (dout,))
    return [g if t is None else torch.empty_like(t).copy_(g) for g, t in zip(grads, inputs)]


@_group_norm_bwd.register_fake
def _(x, weight, bias, num_groups, eps, silu, input_bias, dout):
    return placeholder_grads(x, weight, bias, input_bias)


def _gn_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, silu, input_bias = inputs
    ctx.save_for_backward(x, weight, bias, input_bias)
    ctx.args = (num_groups, eps, silu)


def _gn_backward(ctx, dout):
    x, weight, bias, input_bias = ctx.saved_tensors
    dx, dw, db, dib = _group_norm_bwd(x, weight, bias, *ctx.args, input_bias, dout)
    present = [t is not None for t in (weight, bias, input_bias)]
    dw, db, dib = (g if p else None for g, p in zip((dw, db, dib), present))
    return dx, dw, db, None, None, None, dib


_group_norm.register_autograd(_gn_backward, setup_context=_gn_setup)


# ---- public API ------------------------------------------------------------------------------------

def group_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
               eps: float = 1e-5, silu: bool = False, input_bias: Optional[Tensor] = None) -> Tensor:
    """F.group_norm(x + input_bias, num_groups, weight, bias, eps), followed by SiLU when `silu`, in one op.

    x (N, C, *); weight, bias and input_bias (C,) or None (input_bias per channel, as a convolution's
    bias). The output has x's dtype and memory format.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape (N, C, *)")
    check_tensor("x", x, tuple(x.shape), device=x.device)
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the {c} channels, got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias), ("input_bias", input_bias)):
        if t is not None:
            check_tensor(name, t, (c,), device=x.device)
    return _group_norm(x, weight, bias, num_groups, float(eps), bool(silu), input_bias)


# ---- Triton backend (forward) ----------------------------------------------------------------------

MAX_TRITON_CHANNELS = 8192   # channels_last: a tile row holds every channel of one position
STATS_ELEMS = 4096           # statistics tile (two float32 accumulators per element in registers)
STATS_WARPS = 8
APPLY_ELEMS = 4096           # normalize tile
MIN_CHUNK_ROWS = 64          # rows per statistics chunk at least: partials stay a few % of x's bytes
PROGRAMS_PER_SM = 8          # statistics programs per SM to aim for (~64 registers a thread: 4 resident)

if _triton.triton is not None:
    tl = _triton.tl

    @_triton.triton.jit
    def _gn_stats_kernel(X, IB, PMEAN, PM2, rows, cols, chunk_rows, chunks, groups, cpg, hw,
                         HAS_IB: tl.constexpr, NHWC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        """x viewed as (batches, rows, cols) contiguous; one program per (batch, chunk of rows): per-column
        (mean, M2) of x + IB[channel] over the chunk's rows -> PMEAN/PM2[(batch * chunks + chunk) * cols + col].
        The channel of an element: its column in NHWC, else (NCHW: a batch is a (sample, group), cols = 1)
        (batch % groups) * cpg + row // hw."""
        pid = tl.program_id(0)
        b = pid // chunks
        k = pid % chunks
        r0 = k * chunk_rows
        n_rows = tl.minimum(chunk_rows, rows - r0)
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < cols
        base = X + b.to(tl.int64) * rows * cols
        mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        if HAS_IB:
            if NHWC:  # a column's channel is fixed: its input bias is loaded once
                ib_c = tl.load(IB + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        # Welford per lane: in step i every valid lane holds its (i + 1)-th value; only the last tile of a
        # chunk is partial, and there invalid lanes see x = mean, i.e. no update.
        for i in range(0, tl.cdiv(n_rows, BLOCK_S)):
            rr = r0 + i * BLOCK_S + offs_s
            mask = (rr < r0 + n_rows)[:, None] & cmask[None, :]
            x = tl.load(base + rr[:, None] * cols + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_IB:
                if NHWC:
                    x += ib_c
                else:
                    x += tl.load(IB + (b % groups) * cpg + rr // hw, mask=rr < rows, other=0.0).to(tl.float32)[:, None]
            x = tl.where(mask, x, mean)
            delta = x - mean
            mean += delta * (1.0 / (i + 1))
            m2 += delta * (x - mean)
        # Chan's formula over the lanes of a column, about a refined mean (no large-offset cancellation)
        cnt = ((n_rows // BLOCK_S) + (offs_s < n_rows % BLOCK_S).to(tl.int32)).to(tl.float32)[:, None]
        total = n_rows.to(tl.float32)
        mean_c = tl.sum(cnt * mean, axis=0) / total
        d = mean - mean_c[None, :]
        corr = tl.sum(cnt * d, axis=0) / total
        m2_c = tl.sum(m2 + cnt * d * d, axis=0) - total * corr * corr
        out = (b * chunks + k) * cols + offs_c
        tl.store(PMEAN + out, mean_c + corr, mask=cmask)
        tl.store(PM2 + out, m2_c, mask=cmask)

    @_triton.triton.jit
    def _gn_finalize_kernel(PMEAN, PM2, W, B, IB, MEAN, SCALE, SHIFT, groups, chunks, rows, chunk_rows, units,
                            channels, eps, stride_n, stride_g, stride_k, stride_j,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_J: tl.constexpr, BLOCK_CG: tl.constexpr):
        """One program per (sample, group): combine the group's partials (chunks x units, unit j of chunk k
        at n * stride_n + g * stride_g + k * stride_k + j * stride_j, holding min(chunk_rows, rows - k *
        chunk_rows) values) into per-channel MEAN, SCALE = rstd * weight and SHIFT = bias ((N, C) float32).
        The partials are of x + IB; MEAN has IB taken off, so the apply reads x alone."""
        pid = tl.program_id(0)
        n = pid // groups
        g = pid % groups
        base = n * stride_n + g * stride_g
        offs_j = tl.arange(0, BLOCK_J)
        total = rows * units * 1.0
        acc = tl.zeros([BLOCK_K, BLOCK_J], dtype=tl.float32)
        for k0 in range(0, chunks, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask = (kk < chunks)[:, None] & (offs_j < units)[None, :]
            cnt = tl.minimum(chunk_rows, rows - kk * chunk_rows).to(tl.float32)[:, None]
            m = tl.load(PMEAN + base + kk[:, None] * stride_k + offs_j[None, :] * stride_j, mask=mask, other=0.0)
            acc += tl.where(mask, cnt * m, 0.0)
        mean = tl.sum(tl.sum(acc, axis=1), axis=0) / total
        acc_d = tl.zeros([BLOCK_K, BLOCK_J], dtype=tl.float32)
        acc_m2 = tl.zeros([BLOCK_K, BLOCK_J], dtype=tl.float32)
        for k0 in range(0, chunks, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            mask = (kk < chunks)[:, None] & (offs_j < units)[None, :]
            cnt = tl.minimum(chunk_rows, rows - kk * chunk_rows).to(tl.float32)[:, None]
            ptr = base + kk[:, None] * stride_k + offs_j[None, :] * stride_j
            d = tl.load(PMEAN + ptr, mask=mask, other=0.0) - mean
            acc_d += tl.where(mask, cnt * d, 0.0)
            acc_m2 += tl.where(mask, tl.load(PM2 + ptr, mask=mask, other=0.0) + cnt * d * d, 0.0)
        corr = tl.sum(tl.sum(acc_d, axis=1), axis=0) / total
        var = tl.maximum(tl.sum(tl.sum(acc_m2, axis=1), axis=0) / total - corr * corr, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        cpg = channels // groups
        offs_c = tl.arange(0, BLOCK_CG)
        cmask = offs_c < cpg
        c = g * cpg + offs_c
        scale = tl.zeros([BLOCK_CG], dtype=tl.float32) + rstd
        if HAS_W:
            scale *= tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        shift = tl.zeros([BLOCK_CG], dtype=tl.float32)
        if HAS_B:
            shift += tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        out = n * channels + c
        center = tl.zeros([BLOCK_CG], dtype=tl.float32) + (mean + corr)
        if HAS_IB:
            center -= tl.load(IB + c, mask=cmask, other=0.0).to(tl.float32)
        tl.store(MEAN + out, center, mask=cmask)
        tl.store(SCALE + out, scale, mask=cmask)
        tl.store(SHIFT + out, shift, mask=cmask)

    @_triton.triton.jit
    def _gn_apply_kernel(X, Y, MEAN, SCALE, SHIFT, rows, cols, row_blocks,
                         SILU: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        """x viewed as (batches, rows, cols) contiguous, parameters per (batch, col) at batch * cols + col:
        y = (x - mean) * scale + shift, then SiLU; one program per (batch, block of rows)."""
        pid = tl.program_id(0)
        b = pid // row_blocks
        rr = (pid % row_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < cols
        p = b * cols + offs_c
        mean = tl.load(MEAN + p, mask=cmask, other=0.0)[None, :]
        scale = tl.load(SCALE + p, mask=cmask, other=0.0)[None, :]
        shift = tl.load(SHIFT + p, mask=cmask, other=0.0)[None, :]
        mask = (rr < rows)[:, None] & cmask[None, :]
        offs = b.to(tl.int64) * rows * cols + rr[:, None] * cols + offs_c[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * scale + shift
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def group_norm_not_supported_reasons(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                                     eps: float, silu: bool, input_bias: Optional[Tensor] = None) -> list[str]:
    """Why the Triton kernels cannot run these inputs; empty list: they can."""
    reasons = _triton.reasons(x.device) + _triton.dtype_reasons(x=x, weight=weight, bias=bias, input_bias=input_bias)
    if x.numel() == 0:
        reasons.append("x is empty")
    if is_channels_last(x):
        if x.shape[1] > MAX_TRITON_CHANNELS:
            reasons.append(f"channels_last with {x.shape[1]} > {MAX_TRITON_CHANNELS} channels")
    elif not x.is_contiguous():
        reasons.append(f"x is neither contiguous nor 4-D channels_last (strides {x.stride()})")
    for name, t in (("weight", weight), ("bias", bias), ("input_bias", input_bias)):
        if t is not None and not t.is_contiguous():
            reasons.append(f"{name} is not contiguous")
    return reasons


def _target_programs(device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: a few programs are enough to exercise the combine
        return 8
    return PROGRAMS_PER_SM * _triton.num_sms(device)


def _alloc_outputs(x: Tensor, n_partials: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The output (x's strides: the kernels index x and out alike), the float32 partial means and M2s,
    and the per-(sample, channel) mean, scale and shift."""
    f32 = dict(dtype=torch.float32, device=x.device)
    return (torch.empty_like(x), torch.empty(n_partials, **f32), torch.empty(n_partials, **f32),
            torch.empty(3, x.shape[0] * x.shape[1], **f32))


def group_norm_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                      silu: bool, input_bias: Optional[Tensor] = None, *, stats_elems: int = STATS_ELEMS,
                      apply_elems: int = APPLY_ELEMS, chunk_rows: Optional[int] = None) -> Tensor:
    """The three launches (see the module docstring). The keywords only change the tiling (tile elements:
    powers of two; chunk_rows: rows per statistics program, by default enough chunks for the GPU)."""
    triton = _triton.triton
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    cpg = c // num_groups
    nhwc = is_channels_last(x)
    if nhwc:                   # NHWC: batches = samples, rows = positions, columns = channels
        s_batches, s_rows, s_cols = n, hw, c
        a_batches, a_rows, a_cols = n, hw, c
        units = cpg            # the partials of a group: its cpg channels of each chunk
    else:                      # NCHW: a (sample, group) is one contiguous column; a (sample, channel) too
        s_batches, s_rows, s_cols = n * num_groups, cpg * hw, 1
        a_batches, a_rows, a_cols = n * c, hw, 1
        units = 1
    block_c = triton.next_power_of_2(s_cols)
    block_s = max(1, stats_elems // block_c)
    if chunk_rows is None:
        per_batch = max(1, _target_programs(x.device) // s_batches)
        chunk_rows = max(triton.cdiv(s_rows, per_batch), MIN_CHUNK_ROWS)
        chunk_rows = triton.cdiv(chunk_rows, block_s) * block_s
    chunks = triton.cdiv(s_rows, chunk_rows)
    out, pmean, pm2, params = _alloc_outputs(x, s_batches * chunks * s_cols)
    _gn_stats_kernel[(s_batches * chunks,)](x, input_bias, pmean, pm2, s_rows, s_cols, chunk_rows, chunks,
                                            num_groups, cpg, hw, HAS_IB=input_bias is not None, NHWC=nhwc,
                                            BLOCK_S=block_s, BLOCK_C=block_c, num_warps=STATS_WARPS)

    if units > 1:   # partials (n, chunks, c): channel g * cpg + j of chunk k
        strides = (chunks * c, cpg, c, 1)
    else:           # partials (n, groups, chunks)
        strides = (num_groups * chunks, chunks, 1, 0)
    block_j = triton.next_power_of_2(units)
    block_k = min(triton.next_power_of_2(chunks), max(1, 2048 // block_j))
    _gn_finalize_kernel[(n * num_groups,)](
        pmean, pm2, weight, bias, input_bias, params[0], params[1], params[2], num_groups, chunks, s_rows,
        chunk_rows, units, c, eps, *strides, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_IB=input_bias is not None, BLOCK_K=block_k,
        BLOCK_J=block_j, BLOCK_CG=triton.next_power_of_2(cpg), num_warps=4)

    block_c = triton.next_power_of_2(a_cols)
    block_s = min(max(1, apply_elems // block_c), triton.next_power_of_2(a_rows))
    row_blocks = triton.cdiv(a_rows, block_s)
    _gn_apply_kernel[(a_batches * row_blocks,)](x, out, params[0], params[1], params[2], a_rows, a_cols, row_blocks,
                                                SILU=silu, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=4)
    return out


_ext.register_backend(_group_norm, "triton", device_type="cuda", impl=group_norm_triton,
                      not_supported_reasons=group_norm_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)
