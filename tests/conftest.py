"""Shared test setup: the `gpu` marker, GPU tests skipped without CUDA, Triton in its interpreter on CPU."""
import os

import pytest

# Decide before anything imports triton: without a GPU, Triton kernels run in the interpreter.
try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # noqa: BLE001
    HAS_CUDA = False
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch sees none)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
