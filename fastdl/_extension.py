"""Loads the compiled kernels, ``fastdl._C``, without ever making ``import fastdl`` fail.

If the extension is missing (a source checkout that was never built) or broken (built against another
torch), the ``native`` backend is unavailable and :data:`LOAD_ERROR` says why.
"""
from __future__ import annotations

import importlib

LOAD_ERROR: str | None = None
BUILT_WITH_CUDA = False

try:
    _C = importlib.import_module("fastdl._C")
except Exception as error:  # ImportError, or an OSError/RuntimeError from a torch ABI mismatch
    LOAD_ERROR = f"fastdl._C could not be imported ({type(error).__name__}: {error})"
else:
    BUILT_WITH_CUDA = bool(_C.built_with_cuda)
