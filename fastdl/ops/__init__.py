"""fastdl's drop-in ops: modules and functionals, each backed by native, Triton and reference kernels."""
from .causal_conv import CausalConv1d, CausalConvState, causal_conv1d, causal_conv1d_init_state, causal_conv1d_step
from .lrn import LocalResponseNorm, local_response_norm

__all__ = ["CausalConv1d", "CausalConvState", "causal_conv1d", "causal_conv1d_init_state", "causal_conv1d_step",
           "LocalResponseNorm", "local_response_norm"]
