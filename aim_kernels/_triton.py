"""What every Triton backend shares: the guarded import and the machine-level reasons it cannot run.

Triton backends serve the CUDA dispatch key through `_ext.register_backend`; under
`TRITON_INTERPRET=1` their kernels also run on CPU tensors when called directly (the CI tests them so).

Programmatic dependent launch (PDL, Hopper and later). Batch-1 decoding is a chain of ~120 tiny
kernels per step, each waiting for the one before. A kernel launched with `launch_pdl=True` may start
while its predecessor still runs: it loads its parameters (weights: no kernel writes them while the
model runs), then calls `pdl_wait`, which lets the next kernel launch and blocks until every earlier
kernel has finished and its writes are visible. Rules for a PDL kernel: before `pdl_wait` read only
parameters and write nothing (activations, even per-generation ones, may come from a PDL kernel still
running); every program calls `pdl_wait` exactly once (so a kernel never finishes before its
predecessors). Kernels without PDL in the same stream stay correct: they start only after the
previous kernel, which waited for all before it, has finished.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import _ext

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    IMPORT_ERROR: Optional[str] = None
except Exception as e:  # noqa: BLE001 - any import failure means "no Triton backend"
    triton = tl = None
    IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def reasons(device: Optional[torch.device] = None) -> list[str]:
    """Why no Triton kernel can run (on `device`, when given); empty when one can."""
    out = []
    if _ext._disabled("triton"):
        out.append(f"disabled by AIM_KERNELS_DISABLE={os.environ.get('AIM_KERNELS_DISABLE')}")
    if IMPORT_ERROR is not None:
        out.append(IMPORT_ERROR)
    if device is not None and device.type != "cuda" and not interpreting():
        out.append(f"inputs are on {device}, not a CUDA device (and TRITON_INTERPRET is not set)")
    return out


def unavailable_reasons() -> list[str]:
    """Machine-level reasons, for aim_kernels.info (Triton backends serve the CUDA dispatch key)."""
    out = reasons()
    if not torch.cuda.is_available():
        out.append("no CUDA device (torch.cuda.is_available() is False)")
    return out


MAX_POW2_DIM = 256


def pow2_reasons(**dims: int) -> list[str]:
    """One reason per dimension that is not a power of two <= MAX_POW2_DIM (the SSM kernels' tiles)."""
    return [f"{name} {v} is not a power of two <= {MAX_POW2_DIM}" for name, v in dims.items()
            if v & (v - 1) or v > MAX_POW2_DIM]


def dtype_reasons(**tensors) -> list[str]:
    """One reason per tensor whose dtype the Triton kernels do not take (None tensors are skipped)."""
    return [f"{name} is {t.dtype}; the Triton kernel takes float32, bfloat16 or float16"
            for name, t in tensors.items() if t is not None and t.dtype not in DTYPES]


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (see the module docstring).

    Off under the interpreter, before Hopper, and with AIM_KERNELS_DISABLE=pdl."""
    if device.type != "cuda" or interpreting() or _ext._disabled("pdl"):
        return False
    return _pdl_capable(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for `kernel[grid](...)`: the PDL constexpr and launch flag together."""
    on = pdl(device)
    return dict(PDL=on, launch_pdl=True) if on else dict(PDL=False)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch-grid heuristics); an H100/H200's 132 elsewhere
    (the interpreter), so CPU tests take the same configurations."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


if triton is not None:
    @triton.jit
    def sum_splits_kernel(part_ptr, out_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out[i] = sum over s of part[s * numel + i], in split order (deterministic, unlike atomics)."""
        pdl_wait(PDL)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            acc += tl.load(part_ptr + s * numel + i, mask=mask, other=0.0)
        tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def select_row(tile, rows, r: tl.constexpr):
        """Row r of a (ROWS_PAD, K) register tile (`rows` = tl.arange(0, ROWS_PAD)). The few-row kernels
        load every row as one 2-D tile: loaded row by row, a load written after a block-wide reduction
        could not be issued before its barrier, one more dependent round trip each."""
        return tl.sum(tl.where(rows[:, None] == r, tile, 0.0), axis=0)

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Let the next kernel launch, then wait for the previous ones (no-op without PDL)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
