"""The decode loop's per-step bookkeeping as two ops, one kernel each on the GPU.

- `embed_step`: the step's input rows: the conditioning at step 0, else the previous token's embedding
  plus its position embedding (what eager PyTorch does in ~7 small kernels: select, repeat, two
  embedding gathers, an add, a compare and a where).
- `record_token`: tokens[:, step] = token, then step += 1 (an index_copy_ and an add_).

Inside a CUDA graph each small kernel costs ~2 us of a batch-1 step, about as much as one of the
model's fused kernels. The Triton kernels launch with programmatic dependent launch, so the first
layer's GEMV loads its weights while `embed_step` runs. The step is a 0-dim int64 tensor on the device
(the loop's counter): nothing syncs with the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor

# ---- references ------------------------------------------------------------------------------------


def embed_step_ref(cond: Tensor, word_weight: Tensor, pos_weight: Tensor, tokens: Tensor, step: Tensor,
                   position_offset: int) -> Tensor:
    rows, batch = cond.shape[0], tokens.shape[0]
    prev = tokens.index_select(1, (step - 1).clamp_min(0).view(1))[:, 0].repeat(rows // batch)
    # clamped as the kernel clamps (no out-of-bounds read from a bad token or step): at step 0 the
    # token column is unwritten (and unused)
    prev = prev.clamp(0, word_weight.shape[0] - 1)
    position = (step - position_offset).clamp(0, pos_weight.shape[0] - 1).expand(rows)
    return torch.where(step == 0, cond, F.embedding(prev, word_weight) + F.embedding(position, pos_weight))


def record_token_ref(token: Tensor, tokens: Tensor, step: Tensor) -> None:
    tokens.index_copy_(1, step.view(1), token[:, None])
    step.add_(1)


# ---- torch.library ops ------------------------------------------------------------------------------

@torch.library.custom_op("aim_kernels::embed_step", mutates_args=())
def _embed_step(cond: Tensor, word_weight: Tensor, pos_weight: Tensor, tokens: Tensor, step: Tensor,
                position_offset: int) -> Tensor:
    return embed_step_ref(cond, word_weight, pos_weight, tokens, step, position_offset).contiguous()


@_embed_step.register_fake
def _(cond, word_weight, pos_weight, tokens, step, position_offset):
    return torch.empty_like(cond, memory_format=torch.contiguous_format)


@torch.library.custom_op("aim_kernels::record_token", mutates_args=("tokens", "step"))
def _record_token(token: Tensor, tokens: Tensor, step: Tensor) -> None:
    record_token_ref(token, tokens, step)


@_record_token.register_fake
def _(token, tokens, step):
    return None


# ---- public API ------------------------------------------------------------------------------------

def _check_step(step: Tensor, device: torch.device) -> None:
    check_tensor("step", step, (), device=device, dtypes=(torch.int64,))


def embed_step(cond: Tensor, word_weight: Tensor, pos_weight: Tensor, tokens: Tensor, step: Tensor,
               position_offset: int = 0) -> Tensor:
    """The decode input of step k = `step`: cond (R, d) at k = 0; else, for row r, word_weight[tokens[r %
    B, k - 1]] + pos_weight[k - position_offset] (R a multiple of the batch B: [cond rows; uncond rows]).

    word_weight (V, d) and pos_weight (P, d) have cond's dtype; tokens (B, T) int64 holds the tokens
    sampled so far; position_offset is 0 (the official decoding convention: the token fed at step k has
    position id k) or 1. The sum is rounded once to cond's dtype, as PyTorch's add. Token ids and
    positions are clamped into word_weight's and pos_weight's rows. Inference only.
    """
    if not isinstance(cond, Tensor) or cond.dim() != 2:
        raise ValueError(f"cond must be (rows, d), got {getattr(cond, 'shape', type(cond).__name__)}")
    rows, d = cond.shape
    dev = cond.device
    check_tensor("cond", cond, (rows, d), device=dev)
    for name, w in (("word_weight", word_weight), ("pos_weight", pos_weight)):
        check_tensor(name, w, (None, d), device=dev, dtypes=(cond.dtype,))
    check_tensor("tokens", tokens, (None, None), device=dev, dtypes=(torch.int64,))
    if tokens.shape[0] == 0 or rows % tokens.shape[0]:
        raise ValueError(f"cond's {rows} rows must be a multiple of the batch, tokens.shape[0] = {tokens.shape[0]}")
    _check_step(step, dev)
    if position_offset not in (0, 1):
        raise ValueError(f"position_offset must be 0 or 1, got {position_offset!r}")
    return _embed_step(cond, word_weight, pos_weight, tokens, step, position_offset)


def record_token(token: Tensor, tokens: Tensor, step: Tensor) -> None:
    """tokens[:, step] = token (B,), then step += 1 (in place; step is a 0-dim int64 tensor in [0, T): the
    reference raises for a step outside it, the GPU kernel writes no token)."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, T), got {getattr(tokens, 'shape', type(tokens).__name__)}")
    check_tensor("tokens", tokens, tuple(tokens.shape), device=tokens.device, dtypes=(torch.int64,))
    check_tensor("token", token, (tokens.shape[0],), device=tokens.device, dtypes=(torch.int64,))
    _check_step(step, tokens.device)
    _record_token(token, tokens, step)


# ---- Triton backends ---------------------------------------------------------------------------------

EMBED_BLOCK = 1024  # features per program
RECORD_BLOCK = 256  # tokens per loop iteration of the single record program

if _triton.triton is not None:
    tl = _triton.tl

    @_triton.triton.jit
    def _embed_step_kernel(cond_ptr, word_ptr, pos_ptr, tokens_ptr, step_ptr, out_ptr, batch, d, vocab, positions,
                           stride_cond, stride_word, stride_pos, stride_tokens, position_offset, BLOCK: tl.constexpr,
                           PDL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < d
        _triton.pdl_wait(PDL)
        k = tl.load(step_ptr)
        first = k == 0
        token = tl.load(tokens_ptr + (r % batch) * stride_tokens + tl.maximum(k - 1, 0))
        token = tl.minimum(tl.maximum(token, 0), vocab - 1)
        position = tl.minimum(tl.maximum(k - position_offset, 0), positions - 1)
        cond = tl.load(cond_ptr + r * stride_cond + cols, mask=mask & first, other=0.0)
        word = tl.load(word_ptr + token * stride_word + cols, mask=mask & ~first, other=0.0)
        pos = tl.load(pos_ptr + position * stride_pos + cols, mask=mask & ~first, other=0.0)
        emb = (word.to(tl.float32) + pos.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r * d + cols, tl.where(first, cond, emb), mask=mask)

    @_triton.triton.jit
    def _record_token_kernel(token_ptr, tokens_ptr, step_ptr, batch, T, stride_tokens, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
        _triton.pdl_wait(PDL)
        k = tl.load(step_ptr)
        for b0 in range(0, batch, BLOCK):
            b = b0 + tl.arange(0, BLOCK)
            mask = (b < batch) & (k >= 0) & (k < T)
            tl.store(tokens_ptr + b * stride_tokens + k, tl.load(token_ptr + b, mask=mask), mask=mask)
        # every thread has read the step before any writes it
        tl.debug_barrier()
        tl.store(step_ptr, k + 1)


def embed_step_not_supported_reasons(cond: Tensor, word_weight: Tensor, pos_weight: Tensor, tokens: Tensor,
                                     step: Tensor, position_offset: int) -> list[str]:
    """Why the Triton kernel cannot run these inputs; empty list: it can."""
    reasons = _triton.reasons(cond.device) + _triton.dtype_reasons(cond=cond)
    for name, t in (("cond", cond), ("word_weight", word_weight), ("pos_weight", pos_weight)):
        if t.stride(-1) != 1:
            reasons.append(f"{name}'s feature dimension is not contiguous")
    return reasons


def _alloc_output(cond: Tensor) -> Tensor:
    return torch.empty(cond.shape, dtype=cond.dtype, device=cond.device)


def embed_step_triton(cond: Tensor, word_weight: Tensor, pos_weight: Tensor, tokens: Tensor, step: Tensor,
                      position_offset: int) -> Tensor:
    rows, d = cond.shape
    out = _alloc_output(cond)
    grid = (rows, _triton.triton.cdiv(d, EMBED_BLOCK))
    _embed_step_kernel[grid](cond, word_weight, pos_weight, tokens, step, out, tokens.shape[0], d,
                             word_weight.shape[0], pos_weight.shape[0], cond.stride(0),
                             word_weight.stride(0), pos_weight.stride(0), tokens.stride(0), position_offset,
                             BLOCK=EMBED_BLOCK, num_warps=4, **_triton.launch_options(cond.device))
    return out


def record_token_not_supported_reasons(token: Tensor, tokens: Tensor, step: Tensor) -> list[str]:
    """Why the Triton kernel cannot run these inputs; empty list: it can."""
    reasons = _triton.reasons(tokens.device)
    if tokens.stride(1) != 1:
        reasons.append("tokens' step dimension is not contiguous")
    return reasons


def record_token_triton(token: Tensor, tokens: Tensor, step: Tensor) -> None:
    _record_token_kernel[(1,)](token, tokens, step, tokens.shape[0], tokens.shape[1], tokens.stride(0),
                               BLOCK=RECORD_BLOCK, num_warps=4, **_triton.launch_options(tokens.device))


_ext.register_backend(_embed_step, "triton", device_type="cuda", impl=embed_step_triton,
                      not_supported_reasons=embed_step_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)
_ext.register_backend(_record_token, "triton", device_type="cuda", impl=record_token_triton,
                      not_supported_reasons=record_token_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)
