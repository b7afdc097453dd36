"""fastdl's drop-in ops: modules and functionals, each backed by native, Triton and reference kernels."""
from .attention import MultiheadAttention, scaled_dot_product_attention
from .causal_conv import CausalConv1d, CausalConvState, causal_conv1d, causal_conv1d_step
from .conv_relu_pool import ConvReLUPool2d, conv_relu_pool2d, fuse_conv_relu_pool
from .lrn import LocalResponseNorm, local_response_norm
from .rnn import GRU, LSTM, GRUCell, LSTMCell, gru_cell, lstm_cell
from .spectral_norm import spectral_norm, spectral_normalize

__all__ = [
    "CausalConv1d",
    "CausalConvState",
    "ConvReLUPool2d",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "LocalResponseNorm",
    "MultiheadAttention",
    "causal_conv1d",
    "causal_conv1d_step",
    "conv_relu_pool2d",
    "fuse_conv_relu_pool",
    "gru_cell",
    "local_response_norm",
    "lstm_cell",
    "scaled_dot_product_attention",
    "spectral_norm",
    "spectral_normalize",
]
