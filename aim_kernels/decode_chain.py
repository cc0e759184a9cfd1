"""One decode step through a whole chain of Mamba2 blocks at batch 1 with CFG (2 rows), in one kernel.

`mamba2_decode_chain` is `mamba2_block_step` applied block after block, from block 0's input to the last
block's mixer output and residual. Its CUDA implementation (csrc/decode_chain/) is one persistent kernel with
one grid barrier per block: each CTA owns a range of the d_inner channels and takes them from in_proj to
out_proj without leaving its SM, while its weight tiles stream ahead into shared memory. A chain of per-block
kernels pays three dependent kernel boundaries per block instead (benchmarks/notes_generate.md).

Its inputs are laid out for the kernel, once per model (`pack_out_weights`) or per generation (`adaln`):
- `in_weight`: each block's in_proj weight (2 DI + 2 N + H, d), as the model holds them (a list, no copy);
- `out_weight_t` (L, DI, d): out_proj transposed, the mixer's gated-norm weight folded into it;
- `adaln` (3, L, 2, d): per block the gate on the previous block's output (block 0's is unused), the block
  norm's weight times (1 + adaLN scale), and the adaLN shift;
- the caches stacked over blocks: conv_state (L, 2, conv_dim, W - 1), ssm_state (L, 2, H, P, N), float32;
- conv_weight (L, conv_dim, W), conv_bias (L, conv_dim), A_log, D, dt_bias (L, H), float32.
ngroups is 1 (B and C shared by all heads); d_inner = 2 d. Decode-only: no autograd.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _ext
from ._util import check_tensor
from .decode import mamba2_block_step_ref

__all__ = ["mamba2_decode_chain", "mamba2_decode_chain_ref", "pack_out_weights", "device_reasons",
           "not_supported_reasons"]

ROWS, HEADDIM, D_STATE, CONV_WIDTH = 2, 64, 128, 4          # what the CUDA kernel is built for
D_MODELS, MAX_CHANNELS, MAX_BCDT_ROWS, MAX_HEADS = (768, 1024, 1536), 32, 8, 64
SMEM_NEEDED = 227 * 1024  # opt-in shared memory per block of sm_90 parts; the kernel uses up to 217 KB


def pack_out_weights(out_weights: list[Tensor], mixer_norm_weights: list[Tensor]) -> Tensor:
    """(L, DI, d) from each block's out_proj weight (d, DI) and gated-norm weight (DI,): W^T * norm weight."""
    dtype = torch.promote_types(out_weights[0].dtype, torch.float32)
    return torch.stack([(w.to(dtype) * n.to(dtype)).t() for w, n in zip(out_weights, mixer_norm_weights)]).to(
        out_weights[0].dtype).contiguous()


def mamba2_decode_chain_ref(x: Tensor, in_weight: list[Tensor], out_weight_t: Tensor, adaln: Tensor,
                            conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                            A_log: Tensor, D: Tensor, dt_bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """mamba2_block_step_ref block after block, in float32 (float64 for float64 x); updates the caches in place."""
    io_dtype, x = x.dtype, x.to(_compute_dtype(x))
    gate, mod_a, shift = adaln.to(x.dtype).unbind(0)
    d, d_inner = x.shape[1], out_weight_t.shape[1]
    ones_d, ones_di = x.new_ones(d), x.new_ones(d_inner)
    out, residual = x, None
    for layer, w in enumerate(in_weight):
        out, residual = mamba2_block_step_ref(
            out, residual, gate[layer] if layer else None, ones_d, shift[layer], mod_a[layer] - 1, w.to(x.dtype),
            conv_state[layer], ssm_state[layer], conv_weight[layer].to(x.dtype), conv_bias[layer].to(x.dtype),
            A_log[layer], D[layer].to(x.dtype), dt_bias[layer].to(x.dtype), ones_di, eps, ssm_state.shape[3], 1,
            out_weight_t[layer].t().to(x.dtype))
    return out.to(io_dtype), residual


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The residual's and the arithmetic's dtype: float32, or float64 for float64 x."""
    return torch.promote_types(x.dtype, torch.float32)


@torch.library.custom_op("aim_kernels::mamba2_decode_chain", mutates_args=("conv_state", "ssm_state"))
def _mamba2_decode_chain(x: Tensor, in_weight: list[Tensor], out_weight_t: Tensor, adaln: Tensor,
                         conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor, A_log: Tensor,
                         D: Tensor, dt_bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    out, residual = mamba2_decode_chain_ref(x, in_weight, out_weight_t, adaln, conv_state, ssm_state, conv_weight,
                                            conv_bias, A_log, D, dt_bias, eps)
    return out.contiguous(), residual.clone(memory_format=torch.contiguous_format)  # may alias x


@_mamba2_decode_chain.register_fake
def _(x, in_weight, out_weight_t, adaln, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=_compute_dtype(x))


def _kernel_limits(d_model: int, nheads: int, sms: int) -> list[str]:
    """Why the kernel's fixed per-CTA shares do not fit this model on `sms` SMs (one CTA per SM)."""
    d_inner, reasons = 2 * d_model, []
    if d_model not in D_MODELS:
        reasons.append(f"d_model {d_model} is not one the kernel is built for {D_MODELS}")
        return reasons
    if nheads > MAX_HEADS:
        reasons.append(f"{nheads} heads (at most {MAX_HEADS})")
    if -(-d_inner // sms) > min(MAX_CHANNELS, d_model // 64) or -(-(2 * D_STATE + nheads) // sms) > MAX_BCDT_ROWS:
        reasons.append(f"{sms} SMs are too few for d_model {d_model} (each SM takes ~d_inner / SMs channels)")
    return reasons


def device_reasons(device: torch.device, d_model: int, nheads: int) -> list[str]:
    """Why the CUDA kernel cannot run on `device` for this model width, whatever the tensors: callers check this
    before packing weights for it (`aim.model.ChainPack` copies a third of them)."""
    reasons = _ext.cuda_unavailable_reasons(device)
    if reasons:
        return reasons
    prop = torch.cuda.get_device_properties(device)
    if prop.major < 9:
        reasons.append(f"compute capability {prop.major}.{prop.minor}: the kernel needs 9.0+ (bulk copies)")
    optin = getattr(prop, "shared_memory_per_block_optin", SMEM_NEEDED)  # torch without the field: the C++ checks
    if optin < SMEM_NEEDED:
        reasons.append(f"{optin} bytes of shared memory per block (needs {SMEM_NEEDED})")
    return reasons + _kernel_limits(d_model, nheads, prop.multi_processor_count)


def not_supported_reasons(x: Tensor, in_weight: list[Tensor], out_weight_t: Tensor, adaln: Tensor,
                          conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                          A_log: Tensor, D: Tensor, dt_bias: Tensor, eps: float) -> list[str]:
    """Why the CUDA kernel cannot run these (already validated) inputs; the reference runs them instead."""
    reasons = device_reasons(x.device, x.shape[1], A_log.shape[1])
    if x.shape[0] != ROWS:
        reasons.append(f"{x.shape[0]} rows: the kernel takes the 2 rows of one guided image")
    if ssm_state.shape[3:] != (HEADDIM, D_STATE) or conv_weight.shape[2] != CONV_WIDTH:
        reasons.append(f"headdim {ssm_state.shape[3]}, d_state {ssm_state.shape[4]}, conv width "
                       f"{conv_weight.shape[2]}: the kernel takes {HEADDIM}, {D_STATE}, {CONV_WIDTH}")
    if out_weight_t.dtype not in (torch.bfloat16, torch.float32) or any(
            t.dtype != out_weight_t.dtype for t in (*in_weight, adaln)):
        reasons.append("weights and adaln must be all bfloat16 or all float32")
    if x.dtype not in (torch.bfloat16, torch.float32):
        reasons.append("x must be bfloat16 or float32")
    if any(t.dtype != torch.float32 for t in (conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias)):
        reasons.append("the caches and the small parameters must be float32")
    tensors = (x, *in_weight, out_weight_t, adaln, conv_state, ssm_state, conv_weight, conv_bias, A_log, D, dt_bias)
    if any(not t.is_contiguous() or t.data_ptr() % 16 for t in tensors):
        reasons.append("every tensor must be contiguous and 16-byte aligned")
    return reasons


_POINTER_TABLES: dict[tuple, Tensor] = {}


def _pointer_table(in_weight: list[Tensor]) -> Tensor:
    """The device array of the blocks' in_proj pointers, built once per list (not inside a graph capture)."""
    key = tuple((w.data_ptr(), w.device.index) for w in in_weight)
    table = _POINTER_TABLES.get(key)
    if table is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("mamba2_decode_chain: run it once before capturing a CUDA graph (it builds a table of "
                               "the in_proj weights' addresses on the device)")
        table = _POINTER_TABLES[key] = torch.tensor([k[0] for k in key], dtype=torch.int64, device=in_weight[0].device)
    return table


@functools.cache
def _scratch_bytes(layers: int, d_model: int, heads: int) -> int:
    """The kernel's scratch (B/C/dt words, out_proj sums, sums of squares, barrier), zeroed by one memset."""
    return torch.ops.aim_kernels_cuda.decode_chain_scratch_bytes(layers, d_model, heads)


def _mamba2_decode_chain_cuda(x: Tensor, in_weight: list[Tensor], out_weight_t: Tensor, adaln: Tensor,
                              conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                              A_log: Tensor, D: Tensor, dt_bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    layers, (rows, d), heads = len(in_weight), x.shape, A_log.shape[1]
    residual, out = x.new_empty(x.shape, dtype=_compute_dtype(x)), torch.empty_like(x)  # as the fake op's
    scratch = torch.empty(_scratch_bytes(layers, d, heads), dtype=torch.uint8, device=x.device)
    torch.ops.aim_kernels_cuda.decode_chain(in_weight, _pointer_table(in_weight), out_weight_t, adaln, conv_state,
                                            ssm_state, conv_weight, conv_bias, A_log, D, dt_bias, x, residual, out,
                                            scratch, eps)
    return out, residual


_ext.register_backend(_mamba2_decode_chain, "cuda", device_type="cuda", impl=_mamba2_decode_chain_cuda,
                      not_supported_reasons=not_supported_reasons)


def mamba2_decode_chain(x: Tensor, in_weight: list[Tensor], out_weight_t: Tensor, adaln: Tensor,
                        conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor, A_log: Tensor,
                        D: Tensor, dt_bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """One decode step of L Mamba2 blocks (module docstring): x (R, d), block 0's input (its residual too).
    Returns (the last block's mixer output in x's dtype, its residual in float32 (float64 for float64 x)), both
    (R, d); updates the caches in place. x is float32, float64, bfloat16 or float16: a bfloat16 model's hidden
    state goes in and comes out without conversion kernels around the chain.
    On CUDA (sm_90, 2 rows, bf16 or float32 weights, float32 caches, d_model 768 / 1024 / 1536) one kernel runs it;
    elsewhere the reference runs."""
    if not in_weight:
        raise ValueError("in_weight: at least one block")
    if x.dim() != 2 or out_weight_t.dim() != 3 or conv_weight.dim() != 3:
        raise ValueError(f"x must be (rows, d_model), out_weight_t (L, d_inner, d_model), conv_weight (L, conv_dim, "
                         f"width); got {tuple(x.shape)}, {tuple(out_weight_t.shape)}, {tuple(conv_weight.shape)}")
    dev, (rows, d), layers = x.device, x.shape, len(in_weight)
    d_inner, conv_dim, heads = out_weight_t.shape[1], conv_weight.shape[1], A_log.shape[-1]
    if conv_dim <= d_inner or (conv_dim - d_inner) % 2:
        raise ValueError(f"conv_weight must be (L, d_inner + 2 d_state, width), got {tuple(conv_weight.shape)}")
    d_state = (conv_dim - d_inner) // 2
    check_tensor("x", x, (rows, d), device=dev, dtypes=(torch.bfloat16, torch.float16, torch.float32, torch.float64))
    for i, w in enumerate(in_weight):
        check_tensor(f"in_weight[{i}]", w, (2 * d_inner + 2 * d_state + heads, d), device=dev)
    check_tensor("out_weight_t", out_weight_t, (layers, d_inner, d), device=dev)
    check_tensor("adaln", adaln, (3, layers, rows, d), device=dev)
    check_tensor("conv_state", conv_state, (layers, rows, conv_dim, conv_weight.shape[2] - 1), device=dev)
    if d_inner % heads:
        raise ValueError(f"d_inner {d_inner} is not a multiple of the {heads} heads")
    check_tensor("ssm_state", ssm_state, (layers, rows, heads, d_inner // heads, d_state), device=dev)
    check_tensor("conv_bias", conv_bias, (layers, conv_dim), device=dev)
    for name, t in (("A_log", A_log), ("D", D), ("dt_bias", dt_bias)):
        check_tensor(name, t, (layers, heads), device=dev)
    return _mamba2_decode_chain(x, list(in_weight), out_weight_t, adaln, conv_state, ssm_state, conv_weight,
                                conv_bias, A_log, D, dt_bias, float(eps))
