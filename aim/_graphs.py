"""CUDA graphs cached on a module: a graph holds the addresses of the weights it read, so it is captured
again when they move (`module.to(...)`, a new state dict loaded with assign=True)."""
from typing import Callable, Hashable, TypeVar

from torch import nn

G = TypeVar("G")


def weight_pointers(module: nn.Module) -> tuple:
    """The data pointers of the module's state dict, in order."""
    return tuple(t.data_ptr() for t in module.state_dict().values())


def cached_graph(module: nn.Module, key: Hashable, capture: Callable[[], G]) -> G:
    """The graph `capture()` returned for `key` on this module, captured again if its weights moved since."""
    graphs = module.__dict__.setdefault("_cuda_graphs", {})
    pointers = weight_pointers(module)
    entry = graphs.get(key)
    if entry is None or entry[0] != pointers:
        entry = graphs[key] = (pointers, capture())
    return entry[1]
