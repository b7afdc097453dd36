"""``torch.jit.script`` of fastdl's modules: the PyTorch module they replace, sharing their state.

TorchScript cannot compile fastdl's forwards (backend selection and checks in Python, ``torch.library`` ops
implemented in Python), and what deployment through TorchScript needs is an archive that loads where fastdl
is not installed (libtorch in C++, mobile), so it could not hold fastdl's ops anyway. So every fastdl module
defines ``__prepare_scriptable__`` — the hook ``torch.jit.script`` calls on the module and on each of its
submodules before compiling — to hand TorchScript its PyTorch twin: an instance of the module it replaces
(or, where that is a pattern of several, a small scriptable module with the same parameters) holding the
very same parameters, buffers and hooks. The scripted module computes what the fastdl module computes, with
PyTorch's kernels. ``torch.export`` and ``torch.compile`` keep fastdl's kernels (its ops are registered
``torch.library`` ops).

``torch.jit.script`` puts the prepared submodules in place of the originals in the model it is given (the
hook's result is written back into the parent's module dict), so a warning says so: after scripting a
model, its eager copy runs PyTorch's modules there too.
"""
from __future__ import annotations

import warnings

from torch import nn


def scriptable_twin(module: nn.Module, twin_class: type) -> nn.Module:
    """An instance of ``twin_class`` holding ``module``'s state (parameters, buffers, submodules, hooks:
    shared, not copied) for ``torch.jit.script`` to compile (module docstring)."""
    warnings.warn(
        f"torch.jit.script compiles {twin_class.__module__}.{twin_class.__qualname__} in place of "
        f"{type(module).__module__}.{type(module).__qualname__}: TorchScript cannot compile fastdl's kernels, and "
        "a scripted model must load without fastdl. torch.jit.script also puts it in place of the fastdl module "
        "in the model it scripts. torch.export and torch.compile keep fastdl's kernels.",
        stacklevel=3,
    )
    twin = twin_class.__new__(twin_class)
    twin.__dict__.update(module.__dict__)
    return twin
