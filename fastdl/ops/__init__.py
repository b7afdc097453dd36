"""fastdl's drop-in ops: modules and functionals, each backed by native, Triton and reference kernels."""
from .attention import MultiheadAttention, scaled_dot_product_attention
from .lrn import LocalResponseNorm, local_response_norm

__all__ = ["LocalResponseNorm", "MultiheadAttention", "local_response_norm", "scaled_dot_product_attention"]
