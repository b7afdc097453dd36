"""fastdl: hand-written kernels for the hot paths of classic deep-learning architectures.

``import fastdl.ops`` gives drop-in replacements for the torch modules and functionals; the functions here
choose which backend runs them (see ``fastdl._backends``).
"""
from ._backends import available_backends, backend, get_backend, set_backend
from ._cpu_isa import cpu_isa, set_cpu_isa

__version__ = "0.1.0"

__all__ = ["available_backends", "backend", "cpu_isa", "get_backend", "set_backend", "set_cpu_isa", "__version__"]
