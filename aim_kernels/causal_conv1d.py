"""Depthwise causal conv1d (+ optional SiLU), full sequence and one decode step.

Layouts follow causal-conv1d: x is (batch, dim, seqlen), any strides (the model passes a
channel-last view, stride(1) == 1); weight is (dim, width); the decode-step conv state is
(batch, dim, state_len) with state_len >= width - 1, holding the most recent inputs, oldest first.

`*_ref` are the pure-PyTorch references; the `aim_kernels::` ops default to them on every device,
and compiled kernels register for the CUDA dispatch key of the same ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext
from ._util import check_tensor, compute_dtype, reference_vjp

MAX_WIDTH = 4


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    cd = compute_dtype(x, weight)
    width = weight.shape[1]
    out = F.conv1d(F.pad(x.to(cd), (width - 1, 0)), weight.to(cd).unsqueeze(1),
                   None if bias is None else bias.to(cd), groups=x.shape[1])
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


def causal_conv1d_update_ref(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                             silu: bool) -> Tensor:
    cd = compute_dtype(x, weight)
    width, state_len = weight.shape[1], conv_state.shape[2]
    window = torch.cat([conv_state[:, :, state_len - (width - 1):].to(cd), x.to(cd).unsqueeze(-1)], -1)
    out = (window * weight.to(cd)).sum(-1)
    if bias is not None:
        out = out + bias.to(cd)
    if silu:
        out = F.silu(out)
    conv_state.copy_(torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], -1))
    return out.to(x.dtype)


# ---- torch.library ops -------------------------------------------------------------------------

@torch.library.custom_op("aim_kernels::causal_conv1d", mutates_args=())
def _causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    out = torch.empty_like(x)  # keep x's layout: fast kernels and the fake op agree on strides
    out.copy_(causal_conv1d_ref(x, weight, bias, silu))
    return out


@_causal_conv1d.register_fake
def _(x, weight, bias, silu):
    return torch.empty_like(x)


@torch.library.custom_op("aim_kernels::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], dout: Tensor,
                       silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = reference_vjp(lambda x_, w_, b_: (causal_conv1d_ref(x_, w_, b_, silu),),
                               (x, weight, bias), (dout,))
    out = torch.empty_like(x)
    out.copy_(dx)
    if bias is None:  # match the fake: an empty dbias of x's dtype (reference_vjp gives the default dtype)
        db = torch.empty(0, device=x.device, dtype=x.dtype)
    return out, dw, db


@_causal_conv1d_bwd.register_fake
def _(x, weight, bias, dout, silu):
    db = torch.empty(0, device=x.device, dtype=x.dtype) if bias is None else torch.empty_like(bias)
    return torch.empty_like(x), torch.empty_like(weight), db


def _setup(ctx, inputs, output):
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu
    ctx.has_bias = bias is not None


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _causal_conv1d_bwd(x, weight, bias, dout, ctx.silu)
    return dx, dw, (db if ctx.has_bias else None), None


_causal_conv1d.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("aim_kernels::causal_conv1d_update", mutates_args=("conv_state",))
def _causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                          silu: bool) -> Tensor:
    return causal_conv1d_update_ref(x, conv_state, weight, bias, silu)


@_causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, silu):
    return torch.empty_like(x)


# ---- CUDA backend (aim_kernels._C, csrc/causal_conv1d/) ------------------------------------------
# Registered for the CUDA dispatch key of the three ops above through aim_kernels._ext (one mechanism
# for every compiled or Triton backend); inputs it does not support fall back to the reference.

_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def not_supported_reasons(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                          conv_state: Optional[Tensor] = None, dout: Optional[Tensor] = None) -> list[str]:
    """Why the CUDA kernels cannot run these inputs (empty list: they can).

    x is (batch, dim, seqlen) for the full-sequence ops and (batch, dim) for the update step, which
    also passes conv_state; the backward passes dout. The kernels read weight and bias of x's dtype or
    float32 as they are; any other mix of the three dtypes is converted first (`_kernel_params`).
    """
    reasons = _ext.cuda_unavailable_reasons(x.device, "cuda")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _CUDA_DTYPES:
            reasons.append(f"{name} is {t.dtype}; the CUDA kernel takes float32, bfloat16 or float16")
    if weight.dim() != 2 or not 2 <= weight.shape[-1] <= MAX_WIDTH:
        reasons.append(f"weight must be (dim, width) with width 2..{MAX_WIDTH}, got {tuple(weight.shape)}")
    for name, t in (("conv_state", conv_state), ("dout", dout)):
        if t is not None and t.dtype != x.dtype:
            reasons.append(f"{name} is {t.dtype} but x is {x.dtype}; the CUDA kernel needs them equal")
    return reasons


def _kernel_params(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """weight and bias as the kernels read them: both of x's dtype or both float32, contiguous, 16-byte
    aligned. Parameters of x's dtype, or float32 ones with bf16/fp16 activations, pass through untouched
    (no conversion kernel per call); any other mix (rare) is converted to float32 here."""
    same = bias is None or bias.dtype == weight.dtype
    dtype = weight.dtype if same and weight.dtype in (x.dtype, torch.float32) else torch.float32

    def prepare(t: Tensor) -> Tensor:
        t = t.to(dtype).contiguous()
        return t if t.data_ptr() % 16 == 0 else t.clone()  # e.g. a view at an odd offset

    return prepare(weight), None if bias is None else prepare(bias)


def _causal_conv1d_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool) -> Tensor:
    out = torch.empty_like(x)
    torch.ops.aim_kernels_cuda.causal_conv1d_fwd(x, *_kernel_params(x, weight, bias), out, silu)
    return out


def _causal_conv1d_bwd_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], dout: Tensor,
                            silu: bool) -> tuple[Tensor, Tensor, Tensor]:
    dim, width = weight.shape
    dx = torch.empty_like(x)
    dwb = torch.zeros(dim, width + 1, device=x.device, dtype=torch.float32)  # [dweight | dbias], float32 sums
    torch.ops.aim_kernels_cuda.causal_conv1d_bwd(x, *_kernel_params(x, weight, bias), dout, dx, dwb, silu)
    dw = dwb[:, :width].to(weight.dtype, memory_format=torch.contiguous_format, copy=True)
    if bias is None:
        db = torch.empty(0, device=x.device, dtype=x.dtype)
    else:
        db = dwb[:, width].to(bias.dtype, memory_format=torch.contiguous_format, copy=True)
    return dx, dw, db


def _causal_conv1d_update_cuda(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                               silu: bool) -> Tensor:
    out = torch.empty_like(x)
    torch.ops.aim_kernels_cuda.causal_conv1d_update(x, conv_state, *_kernel_params(x, weight, bias), out, silu)
    return out


_ext.register_backend(_causal_conv1d, "cuda", device_type="cuda", impl=_causal_conv1d_cuda,
                      not_supported_reasons=lambda x, w, b, silu: not_supported_reasons(x, w, b))
_ext.register_backend(_causal_conv1d_bwd, "cuda", device_type="cuda", impl=_causal_conv1d_bwd_cuda,
                      not_supported_reasons=lambda x, w, b, dout, silu: not_supported_reasons(x, w, b, dout=dout))
_ext.register_backend(_causal_conv1d_update, "cuda", device_type="cuda", impl=_causal_conv1d_update_cuda,
                      not_supported_reasons=lambda x, s, w, b, silu: not_supported_reasons(x, w, b, conv_state=s))


# ---- public API --------------------------------------------------------------------------------

def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
           x_shape: str) -> None:
    check_tensor("weight", weight, (None, None), device=weight.device)
    dim, width = weight.shape
    if not 2 <= width <= MAX_WIDTH:
        raise ValueError(f"causal_conv1d supports widths 2..{MAX_WIDTH}, got {width}")
    ndim = 3 if x_shape == "(batch, dim, seqlen)" else 2
    if not isinstance(x, Tensor) or x.dim() != ndim:
        raise ValueError(f"x must be {x_shape}, got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    check_tensor("x", x, (None, dim) + (None,) * (ndim - 2), device=weight.device)
    if bias is not None:
        check_tensor("bias", bias, (dim,), device=weight.device)
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                  activation: Optional[str] = None) -> Tensor:
    """Depthwise causal conv over the sequence: out[b, d, t] = act(bias[d] + sum_k w[d, k] x[b, d, t - W + 1 + k]).

    x: (batch, dim, seqlen), any strides; weight: (dim, width), width 2..4; bias: (dim,) or None.
    Returns a tensor with x's shape, dtype and memory layout.
    """
    _check(x, weight, bias, activation, "(batch, dim, seqlen)")
    return _causal_conv1d(x, weight, bias, activation == "silu")


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None) -> Tensor:
    """One decode step: returns the conv output for x (batch, dim) and shifts x into conv_state in place.

    conv_state: (batch, dim, state_len), state_len >= width - 1, most recent input last.
    """
    check_update_args(x, conv_state, weight, bias, activation)
    return _causal_conv1d_update(x, conv_state, weight, bias, activation == "silu")


def check_update_args(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor],
                      activation: Optional[str]) -> None:
    """The checks of `causal_conv1d_update` (also run by ops that do the update inside their kernels)."""
    _check(x, weight, bias, activation, "(batch, dim)")
    dim, width = weight.shape
    check_tensor("conv_state", conv_state, (x.shape[0], dim, None), device=x.device)
    if conv_state.shape[2] < width - 1:
        raise ValueError(f"conv_state holds {conv_state.shape[2]} steps, the width-{width} conv needs "
                         f"at least {width - 1}")


__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_ref", "causal_conv1d_update_ref",
           "not_supported_reasons"]
