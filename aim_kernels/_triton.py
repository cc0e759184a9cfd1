"""What every Triton backend shares: the guarded import and the machine-level reasons it cannot run.

Triton backends serve the CUDA dispatch key through `_ext.register_backend`; under
`TRITON_INTERPRET=1` their kernels also run on CPU tensors when called directly (the CI tests them so).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _ext

try:
    import triton
    import triton.language as tl
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
