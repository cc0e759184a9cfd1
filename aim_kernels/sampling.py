"""Next-token sampling: classifier-free-guidance combine, temperature, top-k then top-p, and a draw.

The draw is inverse-CDF sampling from uniforms passed in as a tensor, which is the same distribution
as torch.multinomial but keeps the op free of host synchronisation and lets CUDA graphs replay it:
the uniforms come from `torch.rand` with the caller's generator, on the logits' device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor


def _widen(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def guided_logits(logits: Tensor, cfg_scale: Optional[float]) -> Tensor:
    """Classifier-free guidance, in float32 or wider.

    With a cfg_scale, rows [cond; uncond] (2B, V) -> uncond + (cond - uncond) * cfg_scale (B, V);
    without, the rows themselves.
    """
    if cfg_scale is None:
        return _widen(logits)
    cond, uncond = _widen(logits).chunk(2)
    return uncond + (cond - uncond) * cfg_scale


def filter_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Temperature, then top-k (ties with the k-th value kept, as the official code), then top-p.

    top-p sorts ascending and drops the tokens whose cumulative probability is <= 1 - top_p, always
    keeping the last one, a most likely token (the official rule). The sort is stable: tokens of equal
    logit (common with bfloat16 logits) go in vocabulary order, which the official unstable sort leaves
    open. Dropped tokens get -inf.
    """
    logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, stable=True)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return logits


def sample_next_token_ref(logits: Tensor, cfg_scale: float, temperature: float, top_k: int, top_p: float,
                          uniform: Tensor) -> Tensor:
    rows = uniform.shape[0]
    guided = guided_logits(logits, cfg_scale if logits.shape[0] == 2 * rows else None)
    probs = filter_logits(guided, temperature, top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # Rounding can put the draw at the very end of the CDF: fall back to the last allowed token.
    last_allowed = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    return torch.minimum(token, last_allowed)


@torch.library.custom_op("aim_kernels::sample_next_token", mutates_args=())
def _sample_next_token(logits: Tensor, cfg_scale: float, temperature: float, top_k: int, top_p: float,
                       uniform: Tensor) -> Tensor:
    return sample_next_token_ref(logits, cfg_scale, temperature, top_k, top_p, uniform)


@_sample_next_token.register_fake
def _(logits, cfg_scale, temperature, top_k, top_p, uniform):
    return uniform.new_empty(uniform.shape, dtype=torch.int64)


def check_sampling_args(cfg_scale: Optional[float], temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError for settings outside their meaningful range."""
    if cfg_scale is not None and not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale)
                                      and cfg_scale >= 0):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")


def sample_next_token(logits: Tensor, cfg_scale: Optional[float] = None, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
                      uniform: Optional[Tensor] = None) -> Tensor:
    """Sample one token per row.

    logits: (B, V) when cfg_scale is None; otherwise (2B, V) holding the cond rows then the uncond
    rows, combined as uncond + (cond - uncond) * cfg_scale. The B uniforms in [0, 1) are drawn from
    `generator` unless given. Returns int64 tokens (B,).
    """
    check_sampling_args(cfg_scale, temperature, top_k, top_p)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError("logits must be (rows, vocab)")
    check_tensor("logits", logits, tuple(logits.shape), device=logits.device)
    if cfg_scale is not None and logits.shape[0] % 2:
        raise ValueError(f"guided sampling needs cond rows then uncond rows, got {logits.shape[0]} rows")
    rows = logits.shape[0] // 2 if cfg_scale is not None else logits.shape[0]
    if uniform is None:
        if generator is not None and generator.device.type != logits.device.type:
            raise ValueError(f"generator is on {generator.device}, logits on {logits.device}")
        uniform = torch.rand(rows, generator=generator, device=logits.device)
    check_tensor("uniform", uniform, (rows,), device=logits.device, dtypes=(torch.float32, torch.float64))
    return _sample_next_token(logits, float(cfg_scale or 0.0), float(temperature), int(top_k), float(top_p),
                              uniform)


# ---- Triton backend: guidance, temperature, top-k, top-p and the draw; one program per sample -------
#
# No sort: each filter is a threshold on the logits, found by building the threshold's float32 bits
# from the top, one bit per pass over the row held in registers (32 passes per filter).

MAX_TRITON_VOCAB = 32768

if _triton.triton is not None:
    tl = _triton.tl

    @_triton.triton.jit
    def _order_key(x):
        """float32 -> uint32 in the same order (-0 first made +0, so that it ties with +0 as in the reference)."""
        bits = tl.where(x == 0, 0.0, x).to(tl.uint32, bitcast=True)
        return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)

    @_triton.triton.jit
    def _largest_key_below(key, weight, limit):
        """The largest uint32 T with sum(weight where key < T) <= limit, for weights >= 0."""
        thresh = tl.full([], 0, tl.uint32)
        bit = tl.full([], 0x80000000, tl.uint32)
        for _ in range(32):
            candidate = thresh | bit
            below = tl.sum(tl.where(key < candidate, weight, 0.0), axis=0)
            thresh = tl.where(below <= limit, candidate, thresh)
            bit = bit >> 1
        return thresh

    @_triton.triton.jit
    def _filtered_weights(LOGITS, row, vocab, uncond_offset, stride_row, cfg_scale, inv_temperature, top_k,
                          drop_mass, GUIDED: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                          BLOCK: tl.constexpr):
        """(cols, exp(logit - max)) of one row, 0 where the filters drop the token or past the vocabulary."""
        cols = tl.arange(0, BLOCK)
        mask = cols < vocab
        logit = tl.load(LOGITS + row * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
        if GUIDED:
            uncond = tl.load(LOGITS + (row + uncond_offset) * stride_row + cols, mask=mask, other=0.0).to(tl.float32)
            logit = uncond + (logit - uncond) * cfg_scale
        logit = tl.where(mask, logit * inv_temperature, -float("inf"))
        top = tl.max(logit, axis=0)
        weight = tl.exp(logit - top)
        if TOP_K or TOP_P:
            key = _order_key(logit)
            if TOP_K:
                # the k-th largest logit is the largest T with at most vocab - k tokens below it; ties stay
                weight = tl.where(key >= _largest_key_below(key, mask.to(tl.float32), vocab - top_k), weight, 0.0)
            if TOP_P:
                # The reference drops a token when the mass up to it in ascending order is <= 1 - top_p.
                # Keys above the largest T whose mass below is <= that stay; tokens tied at T go in
                # vocabulary order (the stable sort's), each kept once the mass up to it passes.
                limit = drop_mass * tl.sum(weight, axis=0)
                thresh = _largest_key_below(key, weight, limit)
                below = tl.sum(tl.where(key < thresh, weight, 0.0), axis=0)
                tied = key == thresh
                keep = (key > thresh) | (tied & (below + tl.cumsum(tl.where(tied, weight, 0.0), axis=0) > limit))
                last_top = tl.max(tl.where(key == _order_key(top), cols, -1), axis=0)  # last when sorted: kept
                weight = tl.where(keep | (cols == last_top), weight, 0.0)
        return cols, weight

    @_triton.triton.jit
    def _sample_kernel(LOGITS, U, OUT, vocab, uncond_offset, stride_row, cfg_scale, inv_temperature, top_k,
                       drop_mass, GUIDED: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0)
        _triton.pdl_wait(PDL)
        cols, prob = _filtered_weights(LOGITS, row, vocab, uncond_offset, stride_row, cfg_scale, inv_temperature,
                                       top_k, drop_mass, GUIDED, TOP_K, TOP_P, BLOCK)
        cdf = tl.cumsum(prob, axis=0)
        target = tl.load(U + row).to(tl.float32) * tl.sum(prob, axis=0)
        # The first kept token whose cdf exceeds the draw, else (rounding at the top of the CDF) the last
        # kept one. A parallel scan's float32 partial sums need not be monotone, so counting the entries
        # at or below the draw could land on a dropped token next to the end of the kept mass.
        first = tl.min(tl.where((cdf > target) & (prob > 0), cols, BLOCK), axis=0)
        last_kept = tl.max(tl.where(prob > 0, cols, -1), axis=0)
        tl.store(OUT + row, tl.minimum(first, last_kept).to(tl.int64))


def sample_not_supported_reasons(logits: Tensor, cfg_scale: float, temperature: float, top_k: int, top_p: float,
                                 uniform: Tensor) -> list[str]:
    """Why the Triton sampler cannot run these inputs; empty list: it can."""
    reasons = _triton.reasons(logits.device) + _triton.dtype_reasons(logits=logits)
    if logits.shape[-1] > MAX_TRITON_VOCAB:
        reasons.append(f"vocabulary {logits.shape[-1]} > {MAX_TRITON_VOCAB}")
    if logits.stride(-1) != 1:
        reasons.append("logits' vocabulary dimension is not contiguous")
    return reasons


def sample_kernel_args(logits: Tensor, cfg_scale: float, temperature: float, top_k: int, top_p: float, rows: int):
    """The arguments of `_filtered_weights` after the logits and row (shared with the tests' kernels)."""
    vocab = logits.shape[-1]
    block = _triton.triton.next_power_of_2(vocab)
    return (vocab, rows, logits.stride(0), cfg_scale, 1.0 / temperature, top_k, 1.0 - top_p), dict(
        GUIDED=logits.shape[0] == 2 * rows, TOP_K=0 < top_k < vocab, TOP_P=top_p < 1.0, BLOCK=block,
        num_warps=16 if block >= 8192 else 4)


def sample_next_token_triton(logits: Tensor, cfg_scale: float, temperature: float, top_k: int, top_p: float,
                             uniform: Tensor) -> Tensor:
    rows = uniform.shape[0]
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    args, meta = sample_kernel_args(logits, cfg_scale, temperature, top_k, top_p, rows)
    _sample_kernel[(rows,)](logits, uniform, out, *args, **meta, **_triton.launch_options(logits.device))
    return out


_ext.register_backend(_sample_next_token, "triton", device_type="cuda", impl=sample_next_token_triton,
                      not_supported_reasons=sample_not_supported_reasons, unavailable_reasons=_triton.unavailable_reasons)
