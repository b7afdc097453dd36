"""fastdl's drop-in ops: modules and functionals, each backed by native, Triton and reference kernels."""
from .lrn import LocalResponseNorm, local_response_norm
from .spectral_norm import spectral_norm, spectral_normalize

__all__ = ["LocalResponseNorm", "local_response_norm", "spectral_norm", "spectral_normalize"]
