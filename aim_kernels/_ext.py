"""The compiled extension, and the one mechanism by which fast backends plug into the ops.

How an op is served
-------------------
Every public op is a `torch.library` custom op in the `aim_kernels` namespace whose default
implementation, on every device, is the pure-PyTorch reference (e.g. `aim_kernels::causal_conv1d`,
defined in causal_conv1d.py). A faster backend -- compiled CUDA from `aim_kernels._C`, or a Triton
kernel -- plugs in with :func:`register_backend`::

    register_backend(_causal_conv1d, "cuda", device_type="cuda",
                     impl=_causal_conv1d_cuda, not_supported_reasons=_conv_reasons)

That (1) records the backend, so `python -m aim_kernels.info` lists it and says why it is unavailable,
and (2) registers, once per (op, device type), a kernel for that device's dispatch key
(`op.register_kernel("cuda")`), so PyTorch still dispatches by device. The kernel tries the op's
backends for that device in registration order: the first whose `not_supported_reasons(*args)` is
empty runs; when none accepts the inputs (float64, an unsupported width, a GPU the build lacks...)
the reference runs. A backend only ever changes speed, never the op's semantics, schema, autograd or
fake (meta) implementation, which stay next to the reference.

`not_supported_reasons(*args)` takes the op's own arguments and returns human-readable strings, empty
when the backend can run them (xformers-style). It should start with the machine-level reasons of
its kind (for compiled CUDA: :func:`cuda_unavailable_reasons`).

The compiled extension
----------------------
`aim_kernels._C` (csrc/, built by setup.py when CUDA is available) defines low-level "out" ops in the
`aim_kernels_cuda` namespace with TORCH_LIBRARY (no pybind11 functions); loading the library registers
them: `torch.ops.aim_kernels_cuda.causal_conv1d_fwd(x, w, b, out, silu)`. Python allocates the outputs
(`torch.empty_like(x)`: the same layout the fake implementations promise) and calls them.

Set `AIM_KERNELS_DISABLE=cuda,triton` (backend names) to switch backends off, e.g. to compare.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["register_backend", "backends", "backend_for", "extension_path", "extension_error",
           "cuda_unavailable_reasons", "build_info", "Backend"]

# ---- the compiled library -------------------------------------------------------------------------

_EXT = {"path": None, "error": None}


def _load_extension() -> None:
    try:
        spec = importlib.util.find_spec("aim_kernels._C")
    except Exception as e:  # noqa: BLE001
        spec, _EXT["error"] = None, f"looking for aim_kernels._C failed: {e}"
    if spec is None or spec.origin is None:
        _EXT["error"] = _EXT["error"] or ("the CUDA extension aim_kernels._C is not built "
                                          "(pure-Python install; see docs/build.md)")
        return
    try:
        torch.ops.load_library(spec.origin)
    except Exception as e:  # noqa: BLE001 - e.g. undefined symbols from a torch version mismatch
        _EXT["error"] = (f"aim_kernels._C at {spec.origin} failed to load ({type(e).__name__}: {e}); "
                         "rebuild it against this torch (docs/build.md)")
        return
    _EXT["path"] = spec.origin


_load_extension()


def extension_path() -> Optional[str]:
    """Path of the loaded compiled extension, or None."""
    return _EXT["path"]


def extension_error() -> Optional[str]:
    """Why the compiled extension is not loaded, or None when it is."""
    return _EXT["error"]


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the extension was built for: {'cuda_archs': ['8.0', '9.0+PTX'], 'cuda_version': '13000'} ({} if not loaded)."""
    if _EXT["path"] is None:
        return {}
    raw = torch.ops.aim_kernels_cuda.build_info()
    info = dict(kv.split("=", 1) for kv in raw.split(";") if "=" in kv)
    info["cuda_archs"] = [a for a in info.get("cuda_archs", "").split("_") if a]
    return info


def _arch_runs_on(arch: str, cap: tuple[int, int]) -> bool:
    """Whether code built for `arch` (TORCH_CUDA_ARCH_LIST entry: '8.0', '9.0+PTX', '9.0a') runs on `cap`."""
    ptx = arch.endswith("+PTX")
    core = arch.removesuffix("+PTX")
    specific = core[-1:].isalpha()  # 9.0a / 10.0f: arch-specific, runs on that exact chip only
    try:
        major, minor = (int("".join(ch for ch in part if ch.isdigit())) for part in core.split("."))
    except ValueError:
        return False
    if specific:
        return cap == (major, minor)
    if ptx and cap >= (major, minor):
        return True
    return cap[0] == major and cap[1] >= minor


def _disabled(name: str) -> bool:
    return name in {s.strip() for s in os.environ.get("AIM_KERNELS_DISABLE", "").split(",")}


@functools.lru_cache(maxsize=None)
def _cuda_device_reasons(index: int) -> tuple[str, ...]:
    if not torch.cuda.is_available():
        return ("no CUDA device (torch.cuda.is_available() is False)",)
    if index >= torch.cuda.device_count():
        return (f"no CUDA device {index}",)
    cap = torch.cuda.get_device_capability(index)
    archs = build_info().get("cuda_archs", [])
    if archs and not any(_arch_runs_on(a, cap) for a in archs):
        return (f"GPU {index} has compute capability {cap[0]}.{cap[1]}, the extension was built for "
                f"{';'.join(archs)} (rebuild with TORCH_CUDA_ARCH_LIST)",)
    return ()


def cuda_unavailable_reasons(device: Optional[torch.device] = None, name: str = "cuda") -> list[str]:
    """Machine-level reasons the compiled CUDA backend `name` cannot run on `device` (default: current GPU)."""
    reasons = []
    if _disabled(name):
        reasons.append(f"disabled by AIM_KERNELS_DISABLE={os.environ.get('AIM_KERNELS_DISABLE')}")
    if _EXT["error"] is not None:
        reasons.append(_EXT["error"])
    if device is not None and device.type != "cuda":
        reasons.append(f"inputs are on {device}, not a CUDA device")
        return reasons
    index = device.index if device is not None and device.index is not None else (
        torch.cuda.current_device() if torch.cuda.is_available() else 0)
    reasons.extend(_cuda_device_reasons(index))
    return reasons


# ---- backends -------------------------------------------------------------------------------------

@dataclass
class Backend:
    op: str                 # "aim_kernels::causal_conv1d"
    name: str               # "cuda", "triton", ...
    device_type: str        # dispatch device type: "cuda"
    impl: Callable          # same arguments and results as the op
    not_supported_reasons: Callable[..., list]   # (*op_args) -> list of reasons, empty when impl runs them
    unavailable_reasons: Callable[[], list]      # machine-level reasons, for aim_kernels.info


_BACKENDS: dict[str, list[Backend]] = {}   # op name -> backends in priority order
_OPS: dict[str, object] = {}                # op name -> op object, every op that has a backend or was declared
_REGISTERED: set[tuple[str, str]] = set()


def _op_name(op) -> str:
    name = getattr(op, "_qualname", None) or getattr(op, "_name", None) or str(op)
    return name if "::" in name else f"aim_kernels::{name}"


def declare_op(op) -> None:
    """List an op (even one with only the reference) for aim_kernels.info."""
    _OPS.setdefault(_op_name(op), op)


def register_backend(op, name: str, *, device_type: str, impl: Callable,
                     not_supported_reasons: Callable[..., list],
                     unavailable_reasons: Optional[Callable[[], list]] = None,
                     fallback: Optional[Callable] = None) -> Backend:
    """Serve `op` (a torch.library custom op) on `device_type` with `impl` when it supports the inputs.

    fallback: what runs when no backend accepts the inputs; default: the op's own (reference) body.
    """
    qual = _op_name(op)
    declare_op(op)
    backend = Backend(qual, name, device_type, impl, not_supported_reasons,
                      unavailable_reasons or (lambda: cuda_unavailable_reasons(None, name)))
    _BACKENDS.setdefault(qual, []).append(backend)
    if (qual, device_type) not in _REGISTERED:
        _REGISTERED.add((qual, device_type))
        ref = fallback if fallback is not None else getattr(op, "_init_fn", None)
        if ref is None:
            raise TypeError(f"register_backend({qual}): pass fallback= (the op has no _init_fn)")
        candidates = [b for b in _BACKENDS[qual] if b.device_type == device_type]

        def kernel(*args):
            for b in candidates:
                if not b.not_supported_reasons(*args):
                    return b.impl(*args)
            return ref(*args)

        kernel.__name__ = f"{qual.split('::')[-1]}_{device_type}"
        if hasattr(op, "register_kernel"):
            op.register_kernel(device_type)(kernel)
        else:
            torch.library.register_kernel(qual, device_type, kernel)
        _KERNELS[(qual, device_type)] = candidates
    else:
        _KERNELS[(qual, device_type)].append(backend)
    return backend


_KERNELS: dict[tuple[str, str], list[Backend]] = {}


def backends(op=None) -> dict[str, list[Backend]]:
    """Registered backends, by op name (all ops, or one)."""
    if op is None:
        return {k: _BACKENDS.get(k, []) for k in _OPS}
    return {_op_name(op): _BACKENDS.get(_op_name(op), [])}


def backend_for(op, *args) -> str:
    """Name of the backend that would run `op(*args)`: a registered backend's name, or 'reference'."""
    device_types = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    for b in _BACKENDS.get(_op_name(op), []):
        if b.device_type in device_types and not b.not_supported_reasons(*args):
            return b.name
    return "reference"
