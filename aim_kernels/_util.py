"""Helpers shared by the op families: input checks with clear messages, and reference backward."""
from __future__ import annotations

import contextlib

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_channels_last(x: Tensor) -> bool:
    """A 4-D tensor laid out channels_last (NHWC), the layout the VQ decoder's Triton passes vectorise."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The dtype the references compute in: at least float32, float64 when any input is float64."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def check_tensor(name: str, t: Tensor, shape: Sequence[Optional[int]], *, device: torch.device,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """Raise ValueError/TypeError naming the argument when `t` is not a tensor of `shape` on `device`.

    `shape` entries of None match any size.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


@contextlib.contextmanager
def _autograd_inside_op():
    """Re-enable autograd inside a custom op's implementation.

    The dispatcher excludes the autograd keys below an op's autograd layer, so the reference
    backward (a recomputation differentiated by autograd) must switch them back on locally.
    """
    key = torch._C.DispatchKey.AutogradFunctionality
    excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, excluded)


def reference_vjp(fn: Callable[..., tuple], inputs: Sequence[Optional[Tensor]],
                  grads: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """Backward of a reference function by autograd over a recomputation.

    Returns one gradient per input: zeros-shaped-like for inputs that receive none, and an empty
    tensor for inputs that are None (custom ops cannot return None).
    """
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None
                  for t in inputs]
        outs = fn(*leaves)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                  allow_unused=True) if pairs else [None] * len(wrt)
    it = iter(got)
    device = next(t.device for t in inputs if t is not None)
    result = []
    for t in leaves:
        if t is None:
            result.append(torch.empty(0, device=device))
        elif not t.requires_grad:
            result.append(torch.zeros_like(t))
        else:
            g = next(it)
            # clone: autograd may hand the same tensor to several inputs; op outputs must not alias
            result.append(torch.zeros_like(t) if g is None else g.clone())
    return result


def placeholder_grads(*tensors: Optional[Tensor]) -> list[Tensor]:
    """Fake-tensor outputs of a reference backward: one gradient per input, empty for None inputs."""
    device = next(t.device for t in tensors if t is not None)
    return [torch.empty(0, device=device) if t is None else torch.empty_like(t) for t in tensors]
