"""fastdl's drop-in ops: modules and functionals, each backed by native, Triton and reference kernels."""
from .conv_relu_pool import ConvReLUPool2d, conv_relu_pool2d, fuse_conv_relu_pool
from .lrn import LocalResponseNorm, local_response_norm

__all__ = ["ConvReLUPool2d", "conv_relu_pool2d", "fuse_conv_relu_pool", "LocalResponseNorm", "local_response_norm"]
