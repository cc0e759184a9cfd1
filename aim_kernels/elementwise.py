"""The VQ decoder's memory-bound elementwise pass, vectorised for channels_last.

`add_bias(x, bias, residual)`: x + bias[channel] (+ residual) in one pass. The decoder runs its
convolutions without bias and adds the bias here, fused with the residual connection: PyTorch adds a
convolution's bias in a separate pass that does not vectorise over a channels_last output (59 such
passes took 16 of a 61 ms batch-64 decode), then adds the residual in another.

The reference computes in x's dtype promoted to float32 (float64 for float64) and returns x's dtype and
memory format. The Triton backend takes 4-D channels_last or contiguous (N, C, *); other layouts take the
reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor, compute_dtype, is_channels_last

# ---- references ------------------------------------------------------------------------------------


def add_bias_ref(x: Tensor, bias: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """x + bias (per channel, dim 1) + residual, computed in float32 (float64 for float64 inputs)."""
    cd = compute_dtype(x, bias, residual)
    y = x.to(cd) + bias.to(cd).reshape((-1,) + (1,) * (x.dim() - 2))
    if residual is not None:
        y = y + residual.to(cd)
    return y.to(x.dtype)


# ---- torch.library ops ------------------------------------------------------------------------------

@torch.library.custom_op("aim_kernels::add_bias", mutates_args=())
def _add_bias(x: Tensor, bias: Tensor, residual: Optional[Tensor]) -> Tensor:
    return torch.empty_like(x).copy_(add_bias_ref(x, bias, residual))


@_add_bias.register_fake
def _(x, bias, residual):
    return torch.empty_like(x)


def _add_bias_setup(ctx, inputs, output):
    x, bias, residual = inputs
    ctx.shapes = (x.dim(), bias.dtype, None if residual is None else residual.dtype)


def _add_bias_backward(ctx, dout):
    ndim, bias_dtype, residual_dtype = ctx.shapes
    dbias = dout.sum(dim=[0] + list(range(2, ndim)), dtype=torch.float32).to(bias_dtype)
    return dout, dbias, None if residual_dtype is None else dout.to(residual_dtype)


_add_bias.register_autograd(_add_bias_backward, setup_context=_add_bias_setup)


# ---- public API ------------------------------------------------------------------------------------

def add_bias(x: Tensor, bias: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """x + bias[channel] (+ residual) in one pass: x (N, C, *), bias (C,), residual x's shape.

    The sum is formed in float32 and rounded once to x's dtype; the output has x's memory format.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape (N, C, *)")
    check_tensor("x", x, tuple(x.shape), device=x.device)
    check_tensor("bias", bias, (x.shape[1],), device=x.device)
    if residual is not None:
        check_tensor("residual", residual, tuple(x.shape), device=x.device)
    return _add_bias(x, bias, residual)


# ---- Triton backends ---------------------------------------------------------------------------------

TILE_ELEMS = 4096  # elements per program: 8 KB of bf16 in, 8 KB out

if _triton.triton is not None:
    tl = _triton.tl

    @_triton.triton.jit
    def _add_bias_kernel(X, B, R, Y, rows, cols, channels, HAS_R: tl.constexpr, BIAS_ON_COLS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """x, residual and y viewed as (rows, cols) contiguous: NHWC rows = positions, cols = channels (the
        bias along cols); NCHW rows = (sample, channel), cols = positions (the bias of row % channels)."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (col < cols)[None, :]
        offs = r.to(tl.int64)[:, None] * cols + col[None, :]
        y = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if BIAS_ON_COLS:
            y += tl.load(B + col, mask=col < cols, other=0.0).to(tl.float32)[None, :]
        else:
            y += tl.load(B + r % channels, mask=r < rows, other=0.0).to(tl.float32)[:, None]
        if HAS_R:
            y += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _tile(cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) for a (rows, cols) pass: a whole row when it fits, TILE_ELEMS elements in all."""
    block_c = min(_triton.triton.next_power_of_2(cols), TILE_ELEMS)
    return TILE_ELEMS // block_c, block_c


def add_bias_not_supported_reasons(x: Tensor, bias: Tensor, residual: Optional[Tensor]) -> list[str]:
    reasons = _triton.reasons(x.device) + _triton.dtype_reasons(x=x, bias=bias, residual=residual)
    if not (is_channels_last(x) or x.is_contiguous()):
        reasons.append(f"x is neither contiguous nor 4-D channels_last (strides {x.stride()})")
    if residual is not None and residual.stride() != x.stride():
        reasons.append(f"residual's strides {residual.stride()} differ from x's {x.stride()}")
    if not bias.is_contiguous():
        reasons.append("bias is not contiguous")
    if x.numel() == 0:
        reasons.append("x is empty")
    return reasons


def _alloc_like(x: Tensor) -> Tensor:
    """The output buffer (tests poison it)."""
    return torch.empty_like(x)


def add_bias_triton(x: Tensor, bias: Tensor, residual: Optional[Tensor]) -> Tensor:
    n, c = x.shape[:2]
    nhwc = is_channels_last(x)
    if nhwc:
        rows, cols = x.numel() // c, c
    else:
        rows, cols = n * c, x.numel() // (n * c)
    out = _alloc_like(x)
    block_r, block_c = _tile(cols)
    grid = (_triton.triton.cdiv(rows, block_r), _triton.triton.cdiv(cols, block_c))
    _add_bias_kernel[grid](x, bias, residual, out, rows, cols, c, HAS_R=residual is not None,
                           BIAS_ON_COLS=nhwc, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


_ext.register_backend(_add_bias, "triton", device_type="cuda", impl=add_bias_triton,
                      not_supported_reasons=add_bias_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons)
