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

`add_rmsnorm_modulate_linear` is a decode block's prologue and its in_proj in one launch: every
program recomputes the (cheap, L2-resident) gated residual add + RMSNorm + adaLN modulate of the few
rows it multiplies, so the normalised rows never go through memory and one kernel boundary per layer
disappears. Decode-only (no autograd).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ext, _triton
from ._util import check_tensor
from .norm import _add_rmsnorm_modulate, add_rmsnorm_modulate_ref
from ._triton import tl, triton

MAX_ROWS = 8
# float32 weights from MAX_ROWS + 1 rows up to here (batch 256 with CFG) go to a split-K Triton GEMM on
# 3xTF32 tensor-core products (float32-accurate): cuBLAS' float32 GEMM runs on the FMA units, 1.2-1.7x
# slower on AiM's projections at 32-512 rows (H200, scripts/explore_gemm.py). bf16 stays on cuBLAS.
MAX_GEMM_ROWS = 512
TILE_ELEMENTS = 8192  # weight elements per program: 64 per thread at 4 warps
NUM_WARPS = 4
# A fused kernel rebuilds its input rows in every program: that L2 traffic, relative to the weight
# bytes, is (input bytes per feature, all rows) / (BLOCK_N * weight element size). Measured on an H200
# (batch 1, 2 rows): AiM-B's prologue+in_proj (1.6) and norm+out_proj (1.25) are faster fused, AiM-XL's
# (3.25 and 2.5) slower (384 vs 293 ms per generation).
MAX_RECOMPUTE_RATIO = 2.0


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

def tile_shape(k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the GEMV kernels for in_features k: the whole row, TILE_ELEMENTS per program."""
    block_k = 1 << max(0, k - 1).bit_length()
    return max(1, TILE_ELEMENTS // block_k), block_k


def recompute_reasons(k: int, input_bytes_per_feature: int, weight_element_size: int) -> list[str]:
    """Why fusing the input's computation into the GEMV would be slower (see MAX_RECOMPUTE_RATIO)."""
    ratio = input_bytes_per_feature / (tile_shape(k)[0] * weight_element_size)
    if ratio > MAX_RECOMPUTE_RATIO:
        return [f"recomputing the input in every program costs {ratio:.2f}x the weight bytes "
                f"(> {MAX_RECOMPUTE_RATIO}): the unfused kernels are faster"]
    return []


def not_supported_reasons(x: Tensor, weight: Tensor) -> list[str]:
    """Why the Triton GEMV cannot run these inputs; empty list: it can."""
    reasons = _triton.reasons(x.device) + _triton.dtype_reasons(x=x, weight=weight)
    if x.dim() != 2:
        reasons.append(f"x is {x.dim()}-D; the GEMV takes (rows, in_features)")
    elif x.shape[0] > MAX_ROWS and (x.dtype != torch.float32 or x.shape[0] > MAX_GEMM_ROWS):
        reasons.append(f"{x.shape[0]} rows: the GEMV takes <= {MAX_ROWS} rows and the 3xTF32 GEMM float32 with "
                       f"<= {MAX_GEMM_ROWS}; cuBLAS (the reference) is faster here")
    if x.dtype != weight.dtype:
        reasons.append(f"x is {x.dtype} but weight is {weight.dtype}")
    if x.shape[-1] > TILE_ELEMENTS and x.shape[0] <= MAX_ROWS:
        reasons.append(f"in_features {x.shape[-1]} > {TILE_ELEMENTS} (one weight row per tile at most)")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        reasons.append("x's or weight's last dimension is not contiguous")
    return reasons


if triton is not None:
    @triton.jit
    def gemv_program(pid, x_ptr, w_ptr, out_ptr, N, K, stride_xr, stride_wn, ROWS: tl.constexpr,
                     ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """Program `pid` of the GEMV: out[:, n] (row stride N) for its BLOCK_N output features n."""
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                    mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)
        _triton.pdl_wait(PDL)  # the weights are in flight; x is the previous kernel's output
        i = tl.arange(0, ROWS_PAD)  # every row at once (see _triton.select_row)
        xs = tl.load(x_ptr + i[:, None] * stride_xr + k[None, :], mask=(i[:, None] < ROWS) & (k[None, :] < K),
                     other=0.0).to(tl.float32)
        for r in tl.static_range(ROWS):
            x = _triton.select_row(xs, i, r)
            y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            tl.store(out_ptr + r * N + n, y.to(out_ptr.dtype.element_ty), mask=n < N)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, stride_xr, stride_wn, ROWS: tl.constexpr, ROWS_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        gemv_program(tl.program_id(0), x_ptr, w_ptr, out_ptr, N, K, stride_xr, stride_wn, ROWS, ROWS_PAD, BLOCK_N,
                     BLOCK_K, PDL)


    @triton.jit
    def _gemm_tf32x3_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, K_PER_SPLIT,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[split] (M, N) = x[:, ks] @ w[:, ks].T over this program's K range ks, float32 operands
        as 3xTF32 tensor-core products (hi*hi + hi*lo + lo*hi), float32 accumulation."""
        m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        split = tl.program_id(2)
        k_lo = split * K_PER_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, tl.minimum(k_lo + K_PER_SPLIT, K), BLOCK_K):
            kk = k0 + k
            x = tl.load(x_ptr + m[:, None] * stride_xm + kk[None, :], mask=(m[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + n[None, :].to(tl.int64) * stride_wn + kk[:, None],
                        mask=(n[None, :] < N) & (kk[:, None] < K), other=0.0)
            acc = tl.dot(x, w, acc, input_precision="tf32x3")
        tl.store(out_ptr + (split * M + m[:, None]).to(tl.int64) * N + n[None, :], acc,
                 mask=(m[:, None] < M) & (n[None, :] < N))

GEMM_BLOCK_K = 32


def gemm_config(rows: int, n: int, k: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, SPLITS) of the 3xTF32 GEMM: 64 x 64 tiles (32 rows at <= 32), K split in
    up to 8 ranges of >= 128 until the grid has 2 programs per SM (the best configurations measured
    per shape were within 10% of this rule)."""
    sms = _triton.num_sms(device)
    block_m, block_n = (32 if rows <= 32 else 64), 64
    tiles = triton.cdiv(n, block_n) * triton.cdiv(rows, block_m)
    splits = 1
    while splits < 8 and tiles * splits < 2 * sms and k // (2 * splits) >= 128:
        splits *= 2
    return block_m, block_n, splits


def _alloc_output(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every output and scratch buffer of the GEMV and decode-step Triton paths (tests poison them here)."""
    return torch.empty(rows, n, dtype=dtype, device=device)


def _gemm_tf32x3(x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    rows, k = x.shape
    n = weight.shape[0]
    block_m, block_n, splits = gemm_config(rows, n, k, x.device)
    part = out if splits == 1 else _alloc_output(splits * rows, n, torch.float32, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), GEMM_BLOCK_K) * GEMM_BLOCK_K
    _gemm_tf32x3_kernel[(triton.cdiv(n, block_n), triton.cdiv(rows, block_m), splits)](
        x, weight, part, rows, n, k, x.stride(0), weight.stride(0), k_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GEMM_BLOCK_K, num_warps=4, num_stages=3)
    if splits > 1:
        _triton.sum_splits_kernel[(triton.cdiv(out.numel(), 1024),)](part, out, out.numel(), SPLITS=splits,
                                                                     BLOCK=1024, num_warps=4,
                                                                     **_triton.launch_options(x.device))
    return out


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
    if rows > MAX_ROWS:
        return _gemm_tf32x3(x, weight, out)
    block_n, block_k = tile_shape(k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, out, n, k, x.stride(0), weight.stride(0), ROWS=rows,
                                            ROWS_PAD=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_K=block_k,
                                            num_warps=NUM_WARPS, **_triton.launch_options(x.device))
    return out


_ext.register_backend(_linear, "triton", device_type="cuda", impl=linear_triton,
                      not_supported_reasons=not_supported_reasons, unavailable_reasons=_triton.unavailable_reasons)


# ---- the block prologue and in_proj in one kernel (decoding) -----------------------------------

def add_rmsnorm_modulate_linear_ref(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, shift: Tensor,
                                    scale: Tensor, eps: float, x_gate: Optional[Tensor], weight: Tensor,
                                    x_mean_sq: Optional[Tensor] = None, x_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    h, residual_out = add_rmsnorm_modulate_ref(x, residual, norm_weight, shift, scale, eps, x_gate, x_mean_sq, x_eps)
    return linear_ref(h, weight), residual_out


@torch.library.custom_op("aim_kernels::add_rmsnorm_modulate_linear", mutates_args=())
def _add_rmsnorm_modulate_linear(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, shift: Tensor,
                                 scale: Tensor, eps: float, x_gate: Optional[Tensor], weight: Tensor,
                                 x_mean_sq: Optional[Tensor] = None, x_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    y, residual_out = add_rmsnorm_modulate_linear_ref(x, residual, norm_weight, shift, scale, eps, x_gate, weight,
                                                      x_mean_sq, x_eps)
    return y.contiguous(), residual_out.clone(memory_format=torch.contiguous_format)  # may alias x


@_add_rmsnorm_modulate_linear.register_fake
def _(x, residual, norm_weight, shift, scale, eps, x_gate, weight, x_mean_sq=None, x_eps=0.0):
    wide = torch.promote_types(x.dtype, torch.float32)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape, dtype=wide)


def add_rmsnorm_modulate_linear_not_supported_reasons(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor,
                                                      shift: Tensor, scale: Tensor, eps: float,
                                                      x_gate: Optional[Tensor], weight: Tensor,
                                                      x_mean_sq: Optional[Tensor] = None,
                                                      x_eps: float = 0.0) -> list[str]:
    """Why the fused Triton kernel cannot run these inputs; empty list: it can."""
    reasons = not_supported_reasons(x, weight)
    if x.dim() == 2 and x.shape[0] > MAX_ROWS:
        reasons.append(f"{x.shape[0]} rows > {MAX_ROWS}: the prologue is fused into the GEMV only")
    if x_mean_sq is not None:  # deferred norms come from replay-form decoding, at many rows
        reasons.append("x_mean_sq (a deferred normalisation) is applied by the unfused prologue only")
    reasons += _triton.dtype_reasons(residual=residual, norm_weight=norm_weight, shift=shift, scale=scale,
                                     x_gate=x_gate)
    inputs = (("residual", residual), ("shift", shift), ("scale", scale), ("x_gate", x_gate))
    for name, t in inputs:
        if t is not None and t.stride(-1) != 1:
            reasons.append(f"{name}'s last dimension is not contiguous")
    row_bytes = x.element_size() + sum(t.element_size() for _, t in inputs if t is not None)
    reasons += recompute_reasons(x.shape[-1], x.shape[0] * row_bytes + norm_weight.element_size(),
                                 weight.element_size())
    return reasons


def _add_rmsnorm_modulate_then_linear(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, shift: Tensor,
                                      scale: Tensor, eps: float, x_gate: Optional[Tensor], weight: Tensor,
                                      x_mean_sq: Optional[Tensor] = None,
                                      x_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """The unfused path on CUDA: the two ops, each on its own fastest backend."""
    h, residual_out = _add_rmsnorm_modulate(x, residual, norm_weight, shift, scale, eps, x_gate, x_mean_sq, x_eps)
    return _linear(h, weight), residual_out


if triton is not None:
    @triton.jit
    def _prologue_gemv_kernel(x_ptr, res_ptr, gate_ptr, norm_w_ptr, shift_ptr, scale_ptr, w_ptr, out_ptr, res_out_ptr,
                              h_ptr, N, K, eps, stride_x, stride_res, stride_gate, stride_shift, stride_scale,
                              stride_wn, ROWS: tl.constexpr, ROWS_PAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                              HAS_GATE: tl.constexpr, WRITE_H: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        """Every row's inputs are loaded at once, before any block-wide reduction (see _triton.select_row).
        Program 0 writes the residual and, with WRITE_H, the prologue's output h (rows of K)."""
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        kmask = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                    mask=(n[:, None] < N) & kmask[None, :], other=0.0)
        norm_w = tl.load(norm_w_ptr + k, mask=kmask, other=0.0).to(tl.float32)
        _triton.pdl_wait(PDL)
        i = tl.arange(0, ROWS_PAD)
        m = (i[:, None] < ROWS) & kmask[None, :]
        res = tl.load(x_ptr + i[:, None] * stride_x + k[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_GATE:
            res *= tl.load(gate_ptr + i[:, None] * stride_gate + k[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            res += tl.load(res_ptr + i[:, None] * stride_res + k[None, :], mask=m, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + i[:, None] * stride_scale + k[None, :], mask=m, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + i[:, None] * stride_shift + k[None, :], mask=m, other=0.0).to(tl.float32)
        if pid == 0:
            tl.store(res_out_ptr + i[:, None] * K + k[None, :], res, mask=m)
        rstd = 1.0 / tl.sqrt(tl.sum(res * res, axis=1) / K + eps)  # every row in one reduction
        h = res * rstd[:, None] * norm_w[None, :] * (1.0 + scale) + shift
        h = h.to(x_ptr.dtype.element_ty)  # as the unfused op rounds it
        if WRITE_H:
            if pid == 0:
                tl.store(h_ptr + i[:, None] * K + k[None, :], h, mask=m)
        h = h.to(tl.float32)
        for r in tl.static_range(ROWS):
            h_r = _triton.select_row(h, i, r)
            y = tl.sum(w.to(tl.float32) * h_r[None, :], axis=1)
            tl.store(out_ptr + r * N + n, y.to(out_ptr.dtype.element_ty), mask=n < N)


def launch_prologue_gemv(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, shift: Tensor, scale: Tensor,
                         eps: float, x_gate: Optional[Tensor], weight: Tensor, out: Tensor, residual_out: Tensor,
                         h: Optional[Tensor] = None) -> None:
    """The fused prologue + GEMV kernel on checked inputs (rows >= 1): out = h @ weight.T, residual_out, and
    h itself when given (contiguous, x's dtype)."""
    rows, k = x.shape
    block_n, block_k = tile_shape(k)
    _prologue_gemv_kernel[(triton.cdiv(weight.shape[0], block_n),)](
        x, residual if residual is not None else x, x_gate if x_gate is not None else x, norm_weight, shift, scale,
        weight, out, residual_out, h if h is not None else out, weight.shape[0], k, eps, x.stride(0),
        residual.stride(0) if residual is not None else 0, x_gate.stride(0) if x_gate is not None else 0,
        shift.stride(0), scale.stride(0), weight.stride(0),
        ROWS=rows, ROWS_PAD=triton.next_power_of_2(rows), HAS_RESIDUAL=residual is not None,
        HAS_GATE=x_gate is not None, WRITE_H=h is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
        **_triton.launch_options(x.device))


def add_rmsnorm_modulate_linear_triton(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, shift: Tensor,
                                       scale: Tensor, eps: float, x_gate: Optional[Tensor], weight: Tensor,
                                       x_mean_sq: Optional[Tensor] = None,
                                       x_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """The Triton path of the op, callable on CPU tensors under TRITON_INTERPRET=1 (for tests)."""
    reasons = add_rmsnorm_modulate_linear_not_supported_reasons(x, residual, norm_weight, shift, scale, eps, x_gate,
                                                                weight, x_mean_sq, x_eps)
    if reasons:
        raise ValueError("the Triton add_rmsnorm_modulate_linear cannot run these inputs: " + "; ".join(reasons))
    rows, k = x.shape
    n = weight.shape[0]
    out = _alloc_output(rows, n, x.dtype, x.device)
    residual_out = _alloc_output(rows, k, torch.float32, x.device)
    if rows == 0 or n == 0:
        return out, residual_out
    launch_prologue_gemv(x, residual, norm_weight, shift, scale, eps, x_gate, weight, out, residual_out)
    return out, residual_out


_ext.register_backend(_add_rmsnorm_modulate_linear, "triton", device_type="cuda",
                      impl=add_rmsnorm_modulate_linear_triton,
                      not_supported_reasons=add_rmsnorm_modulate_linear_not_supported_reasons,
                      unavailable_reasons=_triton.unavailable_reasons, fallback=_add_rmsnorm_modulate_then_linear)


# ---- public API --------------------------------------------------------------------------------

def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., in_features) @ weight (out_features, in_features).T, no bias. On CUDA: a GEMV for <= MAX_ROWS
    rows, a 3xTF32 GEMM for float32 up to MAX_GEMM_ROWS rows, else cuBLAS."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape (..., in_features)")
    check_tensor("weight", weight, (None, x.shape[-1]), device=x.device)
    check_tensor("x", x, tuple(x.shape), device=x.device, dtypes=(weight.dtype,))
    return _linear(x, weight)


def check_prologue_args(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, shift: Tensor, scale: Tensor,
                        x_gate: Optional[Tensor], weight: Tensor, weight_name: str = "weight") -> None:
    """The argument checks of `add_rmsnorm_modulate_linear` (also the start of a decode block's)."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError("x must be a (rows, dim) tensor")
    dev = x.device
    check_tensor("x", x, tuple(x.shape), device=dev)
    for name, t in (("residual", residual), ("shift", shift), ("scale", scale), ("x_gate", x_gate)):
        if t is not None or name in ("shift", "scale"):
            check_tensor(name, t, tuple(x.shape), device=dev)
    check_tensor("norm_weight", norm_weight, (x.shape[1],), device=dev)
    check_tensor(weight_name, weight, (None, x.shape[1]), device=dev, dtypes=(x.dtype,))


def add_rmsnorm_modulate_linear(x: Tensor, residual: Optional[Tensor], norm_weight: Tensor, shift: Tensor,
                                scale: Tensor, eps: float, x_gate: Optional[Tensor], weight: Tensor,
                                x_mean_sq: Optional[Tensor] = None, x_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """A decode block's prologue and in_proj: (h @ weight.T, r) for (h, r) = add_rmsnorm_modulate(x, ...).

    x, residual, shift, scale, x_gate (rows, dim); weight (out_features, dim); x_mean_sq (rows, parts)
    float32, x_eps: x's deferred normalisation (see aim_kernels.norm). Decode-only: no autograd.
    """
    check_prologue_args(x, residual, norm_weight, shift, scale, x_gate, weight)
    dev = x.device
    if x_mean_sq is not None:
        check_tensor("x_mean_sq", x_mean_sq, (x.shape[0], None), device=dev, dtypes=(torch.float32, torch.float64))
    return _add_rmsnorm_modulate_linear(x, residual, norm_weight, shift, scale, float(eps), x_gate, weight,
                                        x_mean_sq, float(x_eps))


__all__ = ["add_rmsnorm_modulate_linear", "add_rmsnorm_modulate_linear_ref", "gemm_config", "linear", "linear_ref",
           "linear_triton", "not_supported_reasons"]
