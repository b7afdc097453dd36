"""Fused convolution + ReLU + max-pool, the block of AlexNet, ZFNet, VGG and LeNet: ``ConvReLUPool2d`` (a
subclass of ``nn.Conv2d``), ``conv_relu_pool2d`` and ``fuse_conv_relu_pool(model)``.

For an input x (N, C_in, H, W), weight w (C_out, C_in/groups, KH, KW), bias b and a pooling window of
PH × PW positions (stride, padding, dilation, ceil_mode as in ``nn.MaxPool2d``):

    z[n, c, h, w]   = Σ_{k, i, j} x[n, g(c)·C_in/groups + k, h·s + i·d − p, w·s + j·d − p] · w[c, k, i, j]
    y[n, c, oh, ow] = max_{(i, j) in window(oh, ow)} relu(z[n, c, i, j] + b[c])
                    = relu(b[c] + max_{window} z)                   (relu and + b[c] are non-decreasing)

The second form is what the kernels compute: the window max of the bias-free conv output, then one add
and one clamp per *pooled* value. Ties resolve to the first window position in row-major order, as
``nn.MaxPool2d`` does, and a NaN wins its window, as there.

Backward. With g = ∂L/∂y, let a[n, c, oh, ow] be the window offset (i·PW + j) of the max, or −1 when
y ≤ 0 (the ReLU clipped it, so no gradient flows). Then

    ∂L/∂z[n, c, h, w] = Σ_{windows whose argmax is (h, w)} g[n, c, oh, ow]
    ∂L/∂b[c]          = Σ_{n, oh, ow: a ≥ 0} g[n, c, oh, ow]
    ∂L/∂x, ∂L/∂w      = the convolution's backward applied to ∂L/∂z.

So autograd keeps, besides the conv's own input and weight, only ``a``: one int8 per pooled value (int16
or int32 for windows of more than 127 or 32767 positions) instead of eager's full-resolution ReLU output
plus int64 pooled indices. The ReLU mask is folded into a (−1), so the output need not be kept either.

Backends: ``native`` CPU (``csrc/cpu/conv_relu_pool.cpp``) runs the convolution through ATen (oneDNN,
channels-last) and then ONE fused pass for bias + ReLU + pool + argmax that never writes the
full-resolution ReLU output; ``native`` CUDA (``csrc/cuda/conv_relu_pool.cu``) is a cuDNN convolution
followed by the same fused pass as one CUDA kernel; ``triton`` (``triton_kernels/conv_relu_pool.py``) is
an implicit-GEMM convolution with bias, ReLU and pooling in its epilogue, so z is never stored at all. CUDA
and Triton route the backward through the compact argmax into ATen's ``convolution_backward``. Native CPU
computes the convolution's backward itself where that pays: ∂L/∂z has one nonzero per pooled window, so
each window scatters g·w into ∂L/∂x and g·x into ∂L/∂w directly (4× fewer multiply-adds for 2×2 pools);
where a group's filters do not fit in cache (VGG16 block 5) it uses oneDNN's dense backward. ``reference``
is plain PyTorch, and doubles as the composite of ``fastdl/_autograd.py``: under ``torch.func`` transforms
and forward-mode AD the functional is ``F.max_pool2d(F.relu(F.conv2d(…)))``, and a backward that must be
differentiable is the reference backward.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.nn.utils import parametrize

from .._autograd import composite_required, differentiable_backward_required
from .._backends import auto_runs_eager, standard_kernels
from .._scripting import scriptable_twin
from .._layout import preserved_format

__all__ = ["ConvReLUPool2d", "conv_relu_pool2d", "fuse_conv_relu_pool"]

# A block's configuration travels through every op and kernel as this tuple: (stride, padding, dilation,
# groups, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode), pairs of ints but groups and
# ceil_mode.
_Params = tuple


def argmax_dtype(pool_kernel: Sequence[int]) -> torch.dtype:
    """The narrowest signed integer that holds every window offset and −1."""
    positions = pool_kernel[0] * pool_kernel[1]
    if positions <= 127:
        return torch.int8
    return torch.int16 if positions <= 32767 else torch.int32


def pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """``nn.MaxPool2d``'s output length along one dimension."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:  # the last window must start inside the input
        out -= 1
    return out


def _conv_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _output_shapes(input: Tensor, weight: Tensor, params: _Params) -> tuple[list[int], list[int]]:
    stride, padding, dilation, _, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode = params
    conv = [_conv_size(input.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2)]
    pooled = [pooled_size(conv[i], pool_kernel[i], pool_stride[i], pool_padding[i], pool_dilation[i], ceil_mode)
              for i in range(2)]
    return conv, pooled


# ----------------------------------------------------------------------------------------------- reference

def _reference_forward(input: Tensor, weight: Tensor, bias: Tensor | None, *params) -> tuple[Tensor, Tensor]:
    stride, padding, dilation, groups, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode = params
    z = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    output, flat = F.max_pool2d(F.relu(z), pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode,
                                return_indices=True)
    # flat index h·W + w in z's plane → window offset i·PW + j, from the window's first corner.
    rows = torch.arange(output.shape[2], device=input.device).view(-1, 1) * pool_stride[0] - pool_padding[0]
    cols = torch.arange(output.shape[3], device=input.device).view(1, -1) * pool_stride[1] - pool_padding[1]
    i = (flat // z.shape[3] - rows) // pool_dilation[0]
    j = (flat % z.shape[3] - cols) // pool_dilation[1]
    argmax = torch.where(output <= 0, -1, i * pool_kernel[1] + j)  # a NaN output keeps its offset
    return output, argmax.to(argmax_dtype(pool_kernel))


def _reference_backward(grad_output: Tensor, argmax: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                        input_needs_grad: bool, weight_needs_grad: bool, *params) -> tuple[Tensor, Tensor, Tensor]:
    stride, padding, dilation, groups, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode = params
    conv_shape, _ = _output_shapes(input, weight, params)
    flows = argmax >= 0
    g = torch.where(flows, grad_output, 0)
    offset = torch.where(flows, argmax.long(), 0)
    rows = torch.arange(argmax.shape[2], device=input.device).view(-1, 1) * pool_stride[0] - pool_padding[0]
    cols = torch.arange(argmax.shape[3], device=input.device).view(1, -1) * pool_stride[1] - pool_padding[1]
    h = rows + offset // pool_kernel[1] * pool_dilation[0]
    w = cols + offset % pool_kernel[1] * pool_dilation[1]
    grad_z = torch.zeros(*argmax.shape[:2], conv_shape[0] * conv_shape[1], dtype=grad_output.dtype,
                         device=grad_output.device)
    # Windows without a gradient point at their first corner, which may lie in the padding: clamp (adds 0).
    # Out of place, so that it also runs on batched gradients (a transform over the backward).
    flat = (h * conv_shape[1] + w).clamp(0, conv_shape[0] * conv_shape[1] - 1)
    grad_z = grad_z.scatter_add(2, flat.flatten(2), g.flatten(2))
    grad_z = grad_z.view(*argmax.shape[:2], *conv_shape)
    grad_bias = g.sum((0, 2, 3)) if has_bias else g.new_empty(0)
    return _conv_backward(grad_z, input, weight, input_needs_grad, weight_needs_grad, stride, padding, dilation,
                          groups) + (grad_bias,)


def _conv_backward(grad_z: Tensor, input: Tensor, weight: Tensor, input_needs_grad: bool, weight_needs_grad: bool,
                   stride, padding, dilation, groups) -> tuple[Tensor, Tensor]:
    """ATen's convolution backward for the two gradients asked for (the bias one is the caller's)."""
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_z, input, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [input_needs_grad, weight_needs_grad, False],
    )
    grad_input = grad_input.contiguous(memory_format=preserved_format(input)) if input_needs_grad else input.new_empty(0)
    grad_weight = grad_weight.contiguous() if weight_needs_grad else weight.new_empty(0)
    return grad_input, grad_weight


# ------------------------------------------------------------------------------------------- native, triton

def _native_forward(input: Tensor, weight: Tensor, bias: Tensor | None, *params) -> tuple[Tensor, Tensor]:
    return torch.ops.fastdl.conv_relu_pool_forward(input, weight, bias, *params)


def _native_backward(grad_output: Tensor, argmax: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                     input_needs_grad: bool, weight_needs_grad: bool, *params) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.fastdl.conv_relu_pool_backward(grad_output, argmax, input, weight, has_bias,
                                                      input_needs_grad, weight_needs_grad, *params)


def _triton_forward(input: Tensor, weight: Tensor, bias: Tensor | None, *params) -> tuple[Tensor, Tensor]:
    from ..triton_kernels.conv_relu_pool import conv_relu_pool

    return conv_relu_pool(input, weight, bias, *params, argmax_dtype(params[4]))


def _triton_backward(grad_output: Tensor, argmax: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                     input_needs_grad: bool, weight_needs_grad: bool, *params) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels.conv_relu_pool import unpool_grad

    stride, padding, dilation, groups, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode = params
    conv_shape, _ = _output_shapes(input, weight, params)
    grad_z = unpool_grad(grad_output, argmax, conv_shape, pool_kernel, pool_stride, pool_padding, pool_dilation)
    grad_bias = torch.where(argmax >= 0, grad_output, 0).sum((0, 2, 3), dtype=torch.float32).to(grad_output.dtype) \
        if has_bias else grad_output.new_empty(0)
    return _conv_backward(grad_z, input, weight, input_needs_grad, weight_needs_grad, stride, padding, dilation,
                          groups) + (grad_bias,)


_FORWARD = standard_kernels("fastdl.conv_relu_pool2d", _native_forward, _triton_forward, _reference_forward)
_BACKWARD = standard_kernels("fastdl.conv_relu_pool2d (backward)", _native_backward, _triton_backward, _reference_backward)


# ------------------------------------------------------------------------------------------ torch.library

@torch.library.custom_op("fastdl::conv_relu_pool2d", mutates_args=())
def _forward_op(input: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, pool_kernel_size: Sequence[int], pool_stride: Sequence[int],
                pool_padding: Sequence[int], pool_dilation: Sequence[int], ceil_mode: bool) -> tuple[Tensor, Tensor]:
    """(output, argmax): see the module docstring for argmax (window offset of the max, −1 where y ≤ 0)."""
    params = (stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)
    kernel = _FORWARD.select(input.device, input.dtype)
    output, argmax = kernel.run(input, weight, bias, *params)
    format = preserved_format(input)
    return output.contiguous(memory_format=format), argmax.contiguous(memory_format=format)


@_forward_op.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding,
      pool_dilation, ceil_mode):
    params = (stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)
    _, pooled = _output_shapes(input, weight, params)
    shape = (input.shape[0], weight.shape[0], *pooled)
    format = preserved_format(input)
    output = input.new_empty(shape).contiguous(memory_format=format)
    argmax = input.new_empty(shape, dtype=argmax_dtype(pool_kernel_size)).contiguous(memory_format=format)
    return output, argmax


@torch.library.custom_op("fastdl::conv_relu_pool2d_backward", mutates_args=())
def _backward_op(grad_output: Tensor, argmax: Tensor, input: Tensor, weight: Tensor, has_bias: bool,
                 input_needs_grad: bool, weight_needs_grad: bool, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, pool_kernel_size: Sequence[int], pool_stride: Sequence[int],
                 pool_padding: Sequence[int], pool_dilation: Sequence[int],
                 ceil_mode: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); a gradient not asked for (flags) is an empty tensor."""
    params = (stride, padding, dilation, groups, pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)
    kernel = _BACKWARD.select(input.device, input.dtype)
    return kernel.run(grad_output, argmax, input, weight, has_bias, input_needs_grad, weight_needs_grad, *params)


@_backward_op.register_fake
def _(grad_output, argmax, input, weight, has_bias, input_needs_grad, weight_needs_grad, *params):
    grad_input = torch.empty_like(input, memory_format=preserved_format(input)) if input_needs_grad else input.new_empty(0)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_needs_grad else weight.new_empty(0)
    grad_bias = weight.new_empty(weight.shape[0] if has_bias else 0)
    return grad_input, grad_weight, grad_bias


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, *params = inputs
    # input and weight for the convolution's backward; the compact argmax (which also carries the ReLU
    # mask) for the pooling's: no full-resolution tensor is kept.
    ctx.save_for_backward(input, weight, output[1])
    ctx.has_bias = bias is not None
    ctx.params = params
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" for the integer argmax


def _backward(ctx, grad_output: Tensor, _grad_argmax):
    input, weight, argmax = ctx.saved_tensors
    if grad_output is None:  # only the argmax was used downstream: nothing flows back
        return (None,) * (3 + len(ctx.params))
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    # The reference backward (scatter by the saved argmax, ATen's convolution backward) is differentiable
    # PyTorch: the gradients of ReLU and max-pool are piecewise constant, so it is the exact backward to
    # differentiate again (fastdl/_autograd.py).
    backward = _reference_backward if differentiable_backward_required() else _backward_op
    grad_input, grad_weight, grad_bias = backward(grad_output, argmax, input, weight, ctx.has_bias and needs_bias,
                                                  needs_input, needs_weight, *ctx.params)
    return (grad_input if needs_input else None, grad_weight if needs_weight else None,
            grad_bias if ctx.has_bias and needs_bias else None) + (None,) * len(ctx.params)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------- functional

def _pair_of_ints(value, name: str, minimum: int) -> tuple[int, int]:
    pair = _pair(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise TypeError(f"conv_relu_pool2d: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise RuntimeError(f"conv_relu_pool2d: {name} must be >= {minimum}, got {value!r}")
    return pair


def _resolve_padding(input: Tensor, weight: Tensor, padding, stride, dilation) -> tuple[Tensor, tuple[int, int]]:
    """Integer padding for the kernels; 'same' with an odd total pads the input's far side by one more, as
    torch does."""
    if not isinstance(padding, str):
        return input, _pair_of_ints(padding, "padding", 0)
    if padding == "valid":
        return input, (0, 0)
    if padding != "same":
        raise RuntimeError(f"conv_relu_pool2d: padding must be 'valid', 'same' or ints, got {padding!r}")
    if stride != (1, 1):  # RuntimeError, as F.conv2d's (nn.Conv2d's constructor raises ValueError)
        raise RuntimeError("conv_relu_pool2d: padding='same' is not supported for strided convolutions")
    totals = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
    if totals[0] % 2 or totals[1] % 2:
        input = F.pad(input, (0, totals[1] % 2, 0, totals[0] % 2))
    return input, (totals[0] // 2, totals[1] // 2)


def conv_relu_pool2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                     groups: int = 1, pool_kernel_size=2, pool_stride=None, pool_padding=0, ceil_mode: bool = False,
                     pool_dilation=1) -> Tensor:
    r"""``F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups)),
    pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)`` in one op that never keeps the
    full-resolution activation:

    .. math::
        y_{n,c,o} = \max\big(0,\; b_c + \max_{p \in \mathrm{window}(o)} (x \star w)_{n,c,p}\big)

    ``input`` is (N, C_in, H, W) or unbatched (C_in, H, W); ``pool_stride`` defaults to
    ``pool_kernel_size``. channels_last inputs give channels_last outputs. Differentiable in input, weight
    and bias to any order, in every autograd mode (``torch.func`` transforms and forward-mode AD run the
    composite, the ``F`` expression above; see ``fastdl/_autograd.py``).
    """
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("conv_relu_pool2d: input and weight must be Tensors")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"conv_relu_pool2d: bias must be a Tensor or None, got {type(bias).__name__}")
    if input.dim() == 3:
        return conv_relu_pool2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups, pool_kernel_size,
                                pool_stride, pool_padding, ceil_mode, pool_dilation).squeeze(0)
    if input.dim() != 4:
        raise RuntimeError(f"conv_relu_pool2d: expected a 3-D (unbatched) or 4-D (batched) input, got "
                           f"{input.dim()}-D of shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"conv_relu_pool2d: expected a 4-D weight (C_out, C_in/groups, KH, KW), got shape "
                           f"{tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise RuntimeError(f"conv_relu_pool2d: groups must be a positive int, got {groups!r}")
    if input.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise RuntimeError(
            f"conv_relu_pool2d: input has {input.shape[1]} channels and weight has shape {tuple(weight.shape)} with "
            f"groups={groups}; expected input channels = weight.shape[1] * groups and weight.shape[0] divisible by groups")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise RuntimeError(f"conv_relu_pool2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.dtype != input.dtype or tensor.device != input.device):
            raise RuntimeError(f"conv_relu_pool2d: {name} is {tensor.dtype} on {tensor.device} but input is "
                               f"{input.dtype} on {input.device}; expected the same dtype and device")
    stride = _pair_of_ints(stride, "stride", 1)
    dilation = _pair_of_ints(dilation, "dilation", 1)
    input, padding = _resolve_padding(input, weight, padding, stride, dilation)
    pool_kernel = _pair_of_ints(pool_kernel_size, "pool_kernel_size", 1)
    pool_stride = pool_kernel if pool_stride is None or pool_stride == [] else _pair_of_ints(pool_stride, "pool_stride", 1)
    pool_padding = _pair_of_ints(pool_padding, "pool_padding", 0)
    pool_dilation = _pair_of_ints(pool_dilation, "pool_dilation", 1)
    for i in range(2):
        if pool_padding[i] > pool_kernel[i] // 2:
            raise RuntimeError(f"conv_relu_pool2d: pool_padding must be at most half of pool_kernel_size, got "
                               f"pool_padding={pool_padding} and pool_kernel_size={pool_kernel}")
    params = (stride, padding, dilation, groups, pool_kernel, pool_stride, pool_padding, pool_dilation, bool(ceil_mode))
    conv_shape, pooled = _output_shapes(input, weight, params)
    if min(conv_shape) < 1 or min(pooled) < 1:
        raise RuntimeError(
            f"conv_relu_pool2d: input of spatial size {tuple(input.shape[2:])} is too small: the convolution gives "
            f"{tuple(conv_shape)} and the pooling {tuple(pooled)}; expected both at least 1x1")
    if composite_required() or auto_runs_eager("conv_relu_pool2d", input.device, input.dtype, input, weight):
        return F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups)), pool_kernel,
                            pool_stride, pool_padding, pool_dilation, bool(ceil_mode))
    output, _ = _forward_op(input, weight, bias, *params)
    return output


# ---------------------------------------------------------------------------------------------- modules

class ConvReLUPool2d(nn.Conv2d):
    """``nn.Sequential(nn.Conv2d(...), nn.ReLU(), nn.MaxPool2d(...))`` as one module: an ``nn.Conv2d``
    (same constructor, ``weight``/``bias`` names, shapes, init and ``state_dict``) whose forward applies
    ReLU and max-pooling in the convolution's epilogue. The pooling arguments are keyword-only and named
    like ``nn.MaxPool2d``'s with a ``pool_`` prefix; ``pool_stride`` defaults to ``pool_kernel_size``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 pool_kernel_size=2, pool_stride=None, pool_padding=0, pool_dilation=1, ceil_mode: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self._set_pooling(pool_kernel_size, pool_stride, pool_padding, pool_dilation, ceil_mode)

    def _set_pooling(self, kernel_size, stride, padding, dilation, ceil_mode) -> None:
        self.pool_kernel_size = _pair(kernel_size)
        self.pool_stride = self.pool_kernel_size if stride is None else _pair(stride)
        self.pool_padding = _pair(padding)
        self.pool_dilation = _pair(dilation)
        self.ceil_mode = bool(ceil_mode)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, pool: nn.MaxPool2d) -> "ConvReLUPool2d":
        """The fused module for ``conv → ReLU → pool``. It shares ``conv``'s state (no copy): parameters,
        buffers, parametrizations (weight norm, spectral norm, ...: the fused module is parametrized the
        same way) and forward pre-hooks, which see the same input. Hooks that would see the conv's output or
        its gradient cannot be kept — the fused module never forms that tensor — so a conv carrying them is
        refused (``fuse_conv_relu_pool`` leaves such a block unfused)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ConvReLUPool2d.from_modules: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(pool, nn.MaxPool2d):
            raise TypeError(f"ConvReLUPool2d.from_modules: pool must be an nn.MaxPool2d, got {type(pool).__name__}")
        if pool.return_indices:
            raise ValueError("ConvReLUPool2d.from_modules: pool.return_indices=True is not supported (the fused "
                             "module returns only the pooled activation)")
        if _output_hooks(conv):
            raise ValueError(f"ConvReLUPool2d.from_modules: conv has {', '.join(_output_hooks(conv))}, which would "
                             "see the convolution's output or its gradient; the fused module never forms them")
        fused = cls.__new__(_fused_class(cls, conv))
        fused.__dict__.update(conv.__dict__)
        fused._set_pooling(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)
        return fused

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable_twin(self, _ScriptableConvReLUPool2d)  # torch.jit.script (fastdl/_scripting.py)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, pool_kernel_size={self.pool_kernel_size}, pool_stride={self.pool_stride}, "
                f"pool_padding={self.pool_padding}, pool_dilation={self.pool_dilation}, ceil_mode={self.ceil_mode}")

    def forward(self, input: Tensor) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad explicitly, then convolve unpadded
            input, padding = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return conv_relu_pool2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                                self.pool_kernel_size, self.pool_stride, self.pool_padding, self.ceil_mode,
                                self.pool_dilation)


class _ScriptableConvReLUPool2d(nn.Conv2d):
    """ConvReLUPool2d's forward in TorchScript-compilable PyTorch (fastdl/_scripting.py): the conv (any
    padding mode), ReLU and max-pool."""

    def forward(self, input: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self._conv_forward(input, self.weight, self.bias)), self.pool_kernel_size,
                            self.pool_stride, self.pool_padding, self.pool_dilation, self.ceil_mode)


def _output_hooks(module: nn.Module) -> list[str]:
    """The kinds of hooks on ``module`` that see its output or the gradient of its output."""
    kinds = {"_forward_hooks": "forward hooks", "_backward_hooks": "backward hooks",
             "_backward_pre_hooks": "backward pre-hooks"}
    return [name for attribute, name in kinds.items() if getattr(module, attribute)]


def _fused_class(cls: type, conv: nn.Conv2d) -> type:
    """``cls``, or for a parametrized conv the parametrized twin of ``cls``: what
    ``torch.nn.utils.parametrize`` makes of a module's class (a subclass holding one property per
    parametrized tensor, so that ``remove_parametrizations`` finds ``cls`` as its first base)."""
    if not parametrize.is_parametrized(conv):
        return cls
    inherited = ("__module__", "__qualname__", "__doc__", "__dict__", "__weakref__")
    namespace = {name: value for name, value in vars(type(conv)).items() if name not in inherited}
    return type(f"Parametrized{cls.__name__}", (cls,), namespace)


def fuse_conv_relu_pool(model: nn.Module) -> nn.Module:
    """Replaces, in place, every ``nn.Conv2d → nn.ReLU → nn.MaxPool2d`` run of consecutive children of an
    ``nn.Sequential`` inside ``model`` by ``ConvReLUPool2d, nn.Identity, nn.Identity``: the fused module
    takes the conv's place and state (parameters, parametrizations, forward pre-hooks; see
    :meth:`ConvReLUPool2d.from_modules`), so ``state_dict()`` keys and values are unchanged. A run where a
    hook would see a tensor the fused module never forms (hooks on the ReLU or the pool, forward or
    backward hooks on the conv) is left as it is, so every hook keeps running as before. Returns ``model``."""
    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(sequential._modules)
        for first in range(len(keys) - 2):
            conv, relu, pool = (sequential._modules[k] for k in keys[first:first + 3])
            if (isinstance(conv, nn.Conv2d) and not isinstance(conv, ConvReLUPool2d) and type(relu) is nn.ReLU
                    and isinstance(pool, nn.MaxPool2d) and not pool.return_indices and not _output_hooks(conv)
                    and not _hooks(relu) and not _hooks(pool)):
                sequential._modules[keys[first]] = ConvReLUPool2d.from_modules(conv, pool)
                sequential._modules[keys[first + 1]] = nn.Identity()
                sequential._modules[keys[first + 2]] = nn.Identity()
    return model


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_pre_hooks or _output_hooks(module))
