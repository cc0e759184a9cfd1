"""Decode GEMV: y = x @ weight.T for the few rows of small-batch decoding (batch 1 with CFG: 2 rows).

At 2 rows a projection is a pure weight stream, and cuBLAS reaches about 1 TB/s on AiM's 2-5 MB
matrices: each call is dominated by its launch and ramp, and the next layer cannot start until it
ends. The Triton backend loads its weight tile into registers *before* waiting for the previous kernel
(programmatic dependent launch, `_triton.pdl_wait`), so within a decode step's CUDA graph the weight
reads of one projection overlap the kernels before it. Measured on an H200 (24 layers of AiM-B-sized
in_proj -> out_proj in one graph): cuBLAS 10.8 us per layer, this kernel 5.4 us
(scripts/explore_gemv.py).

One program owns BLOCK_N output features: the whole (BLOCK_N, K) weight tile (64 elements per
thread), every row of x, float32 accumulation. More than MAX_ROWS rows go to cuBLAS (the reference),
which is the better kernel once the weights are reused across rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor
from ._triton import tl, triton

MAX_ROWS = 8
TILE_ELEMENTS = 8192  # weight elements per program: 64 per thread at 4 warps
NUM_WARPS = 4


def linear_ref(x: Tensor, weight: Tensor) -> Tensor:
    return F.linear(x, weight)


@torch.library.custom_op("aim_kernels::linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor) -> Tensor:
    return linear_ref(x, weight).contiguous()


@_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dout):
    x, weight = ctx.saved_tensors
    dx = dout @ weight if ctx.needs_input_grad[0] else None
    dw = dout.reshape(-1, dout.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    return dx, dw


_linear.register_autograd(_backward, setup_context=_setup)


# ---- Triton backend ----------------------------------------------------------------------------

def _k_tile(k: int) -> int:
    return triton.next_power_of_2(k)


def not_supported_reasons(x: Tensor, weight: Tensor) -> list[str]:
    """Why the Triton GEMV cannot run these inputs; empty list: it can."""
    reasons = _triton.reasons(x.device) + _triton.dtype_reasons(x=x, weight=weight)
    if x.dim() != 2:
        reasons.append(f"x is {x.dim()}-D; the GEMV takes (rows, in_features)")
    elif x.shape[0] > MAX_ROWS:
        reasons.append(f"{x.shape[0]} rows > {MAX_ROWS}: cuBLAS (the reference) is faster when rows reuse weights")
    if x.dtype != weight.dtype:
        reasons.append(f"x is {x.dtype} but weight is {weight.dtype}")
    if x.shape[-1] > TILE_ELEMENTS:
        reasons.append(f"in_features {x.shape[-1]} > {TILE_ELEMENTS} (one weight row per tile at most)")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        reasons.append("x's or weight's last dimension is not contiguous")
    return reasons


if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_xr, stride_wn, ROWS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                    mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        _triton.pdl_wait(PDL)  # the weights are in flight; x is the previous kernel's output
        for r in tl.static_range(ROWS):
            x = tl.load(x_ptr + r * stride_xr + k, mask=k < K, other=0.0).to(tl.float32)
            y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            tl.store(out_ptr + r * N + n, y.to(out_ptr.dtype.element_ty), mask=n < N)


def _alloc_output(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(rows, n, dtype=dtype, device=device)


def linear_triton(x: Tensor, weight: Tensor) -> Tensor:
    """The Triton path of the op, callable on CPU tensors under TRITON_INTERPRET=1 (for tests)."""
    reasons = not_supported_reasons(x, weight)
    if reasons:
        raise ValueError("the Triton linear cannot run these inputs: " + "; ".join(reasons))
    rows, k = x.shape
    n = weight.shape[0]
    out = _alloc_output(rows, n, x.dtype, x.device)
    if rows == 0 or n == 0:
        return out
    block_k = _k_tile(k)
    block_n = max(1, TILE_ELEMENTS // block_k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, out, n, k, x.stride(0), weight.stride(0), ROWS=rows,
                                            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
                                            **_triton.launch_options(x.device))
    return out


_ext.register_backend(_linear, "triton", device_type="cuda", impl=linear_triton,
                      not_supported_reasons=not_supported_reasons, unavailable_reasons=_triton.unavailable_reasons)


# ---- public API --------------------------------------------------------------------------------

def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in_features) @ weight (out_features, in_features).T, no bias; a GEMV for <= MAX_ROWS rows."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., in_features)")
    check_tensor("weight", weight, (None, x.shape[-1]), device=x.device)
    check_tensor("x", x, tuple(x.shape), device=x.device, dtypes=(weight.dtype,))
    return _linear(x, weight)


__all__ = ["linear", "linear_ref", "linear_triton", "not_supported_reasons"]
