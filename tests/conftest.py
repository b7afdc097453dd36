"""Shared test setup.

Without a GPU, Triton kernels are exercised on CPU tensors by its interpreter; TRITON_INTERPRET must be
set before any kernel module is imported (Triton reads it when @triton.jit runs), hence here.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastdl  # noqa: E402  (after TRITON_INTERPRET)

HAS_CUDA = torch.cuda.is_available()
SLOW = os.environ.get("FASTDL_SLOW_TESTS") == "1"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow: set FASTDL_SLOW_TESTS=1 (the GPU run does)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not SLOW:
            item.add_marker(skip_slow)


@pytest.fixture
def use_backend():
    """``use_backend(name, device)``: skips when the backend cannot run on the device here, else returns
    the context manager that selects it."""

    def select(name, device):
        reason = fastdl._backends.why_unavailable(name, device)
        if reason is not None:
            pytest.skip(f"{name} backend unavailable on {device}: {reason}")
        return fastdl.backend(name)

    return select
