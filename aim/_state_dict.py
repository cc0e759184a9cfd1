"""Strict state-dict loading with an error message that says what is wrong."""

import torch
from torch import nn

_MAX_LISTED = 20


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "".join(f"    {s}\n" for s in shown).rstrip("\n") + more


def load_state_dict_strict(module: nn.Module, state_dict: dict, what: str, assign: bool = False) -> None:
    """Load `state_dict` into `module`, requiring exactly the same keys and shapes.

    Values are copied into the module's existing tensors, so they take the module's dtype and
    device; with `assign=True` the given tensors replace them (for modules built on the meta device). On any mismatch nothing is loaded and a ValueError lists the missing, unexpected and
    mis-shaped keys; `what` names the source in that message (e.g. a checkpoint path).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = []
    for k, ref in expected.items():
        if k not in state_dict:
            continue
        got = state_dict[k]
        if not isinstance(got, torch.Tensor):
            misshaped.append(f"{k}: expected a tensor of shape {tuple(ref.shape)}, got {type(got).__name__}")
        elif got.shape != ref.shape:
            misshaped.append(f"{k}: expected shape {tuple(ref.shape)}, got {tuple(got.shape)}")
    if missing or unexpected or misshaped:
        parts = [f"{what}: state dict does not match {type(module).__name__}"]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if misshaped:
            parts.append(_listing("mis-shaped keys", misshaped))
        raise ValueError("\n".join(parts))
    module.load_state_dict(state_dict, strict=True, assign=assign)
