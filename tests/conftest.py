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
from fastdl._cpu_isa import use_cpu_isa  # noqa: E402

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


@pytest.fixture(autouse=True)
def _cpu_isa_mark(request):
    """A test marked ``cpu_isa(name)`` (see fastdl.testing.cpu_isa_cases) runs with the native CPU kernels
    capped at that instruction set."""
    mark = request.node.get_closest_marker("cpu_isa")
    if mark is None:
        yield
        return
    with use_cpu_isa(mark.args[0]):
        yield
