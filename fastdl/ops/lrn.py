"""Local response normalization (AlexNet, ZFNet, GoogLeNet): ``LocalResponseNorm`` and
``local_response_norm``, drop-in twins of ``nn.LocalResponseNorm`` and ``F.local_response_norm``.

For an input of shape (N, C, *) and window size n, at every batch index and spatial position:

    scale_c = k + α/n · Σ_{j = c − ⌊n/2⌋ … c + ⌊(n−1)/2⌋} x_j²      (channels outside 0…C−1 count as 0)
    y_c     = x_c · scale_c^(−β)

and the gradient, with g = ∂L/∂y:

    ∂L/∂x_c = g_c · scale_c^(−β) − (2αβ/n) · x_c · Σ_{j = c − ⌊(n−1)/2⌋ … c + ⌊n/2⌋} g_j · x_j · scale_j^(−β−1)

Layers: kernels in ``csrc/cpu/lrn.cpp``, ``csrc/cuda/lrn.cu`` and ``triton_kernels/lrn.py``; here the
``torch.library`` ops ``fastdl::local_response_norm`` and ``fastdl::local_response_norm_backward``
(fake kernels and autograd included, so ``torch.compile(fullgraph=True)`` keeps them whole), backend
selection, the functional and the module.

Autograd keeps only the input for backward. The scale is rebuilt there from x: the window sum costs two
flops per element in a pass that reads x anyway, while keeping it would cost a full-size write in forward,
a full-size read in backward, and one more activation held per LRN layer.

The reference kernels double as the composite of ``fastdl/_autograd.py``: under ``torch.func`` transforms
and forward-mode AD the functional is ``F.local_response_norm``, and a backward that must itself be
differentiable (``create_graph=True``) is the reference backward, plain PyTorch in (g, x).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._autograd import composite_required, differentiable_backward_required
from .._backends import standard_kernels
from .._scripting import scriptable_twin
from .._layout import in_format, preserved_format

__all__ = ["LocalResponseNorm", "local_response_norm"]


def _channel_window_sum(values: Tensor, before: int, after: int) -> Tensor:
    """Σ_{j = c − before … c + after} values_j along dim 1, zeros outside the channels."""
    channels = values.shape[1]
    padded = F.pad(values, (0, 0) * (values.dim() - 2) + (before, after))
    return sum(padded.narrow(1, shift, channels) for shift in range(before + after + 1))


def _reference_forward(input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    return F.local_response_norm(input, size, alpha, beta, k)


def _reference_backward(grad: Tensor, input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    scale = k + alpha / size * _channel_window_sum(input * input, size // 2, (size - 1) // 2)
    scale_pow = scale.pow(-beta)
    if beta == 0:  # the window term is exactly 0, as torch's pow backward for a zero exponent (0 · NaN is not)
        return grad * scale_pow
    mirrored = _channel_window_sum(grad * input * scale_pow / scale, (size - 1) // 2, size // 2)
    return grad * scale_pow - (2 * alpha * beta / size) * input * mirrored


def _native_forward(input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    return torch.ops.fastdl.lrn_forward(input, size, alpha, beta, k)


def _native_backward(grad: Tensor, input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    return torch.ops.fastdl.lrn_backward(grad, input, size, alpha, beta, k)


def _triton_forward(input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    from ..triton_kernels.lrn import lrn_forward

    return lrn_forward(input, size, alpha, beta, k)


def _triton_backward(grad: Tensor, input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    from ..triton_kernels.lrn import lrn_backward

    return lrn_backward(grad, input, size, alpha, beta, k)


_FORWARD = standard_kernels("fastdl.local_response_norm", _native_forward, _triton_forward, _reference_forward)
_BACKWARD = standard_kernels("fastdl.local_response_norm (backward)", _native_backward, _triton_backward, _reference_backward)


@torch.library.custom_op("fastdl::local_response_norm", mutates_args=())
def _forward_op(input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    if input.numel() == 0:  # F.local_response_norm returns an empty input itself; an op may not alias
        return torch.empty_like(input, memory_format=preserved_format(input))
    kernel = _FORWARD.select(input.device, input.dtype)
    return in_format(kernel.run(input, size, alpha, beta, k), input)


@_forward_op.register_fake
def _(input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    return torch.empty_like(input, memory_format=preserved_format(input))


@torch.library.custom_op("fastdl::local_response_norm_backward", mutates_args=())
def _backward_op(grad_output: Tensor, input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    kernel = _BACKWARD.select(input.device, input.dtype)
    return in_format(kernel.run(grad_output, input, size, alpha, beta, k), input)


@_backward_op.register_fake
def _(grad_output: Tensor, input: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    return torch.empty_like(input, memory_format=preserved_format(input))


def _setup_context(ctx, inputs, output) -> None:
    input, size, alpha, beta, k = inputs
    ctx.save_for_backward(input)  # only x: the scale is rebuilt in backward (module docstring says why)
    ctx.hyperparameters = (size, alpha, beta, k)


def _backward(ctx, grad_output: Tensor):
    (input,) = ctx.saved_tensors
    if input.numel() == 0:  # nothing to differentiate (and the window size was never checked)
        return torch.empty_like(input, memory_format=preserved_format(input)), None, None, None, None
    if differentiable_backward_required():  # the reference formula is plain PyTorch in (g, x): differentiable
        return _reference_backward(grad_output, input, *ctx.hyperparameters), None, None, None, None
    grad_input = _backward_op(grad_output, input, *ctx.hyperparameters)
    return grad_input, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check(input: Tensor, size: int) -> None:
    # The exception types are the ones torch raises for the same mistakes, in its order: an empty input is
    # returned before the window size is looked at.
    if not isinstance(input, Tensor):
        raise TypeError(f"local_response_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 3:
        raise ValueError(
            f"local_response_norm: expected an input of 3 or more dimensions (N, C, *), got {input.dim()} "
            f"dimensions of shape {tuple(input.shape)}"
        )
    if input.numel() == 0:  # returned as it is (below)
        return
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"local_response_norm: size must be an int, got {type(size).__name__}")
    if size < 1:
        raise RuntimeError(f"local_response_norm: size (the number of channels in the window) must be >= 1, got {size}")


def local_response_norm(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Tensor:
    r"""Local response normalization over channels, the same numbers as ``F.local_response_norm``.

    .. math::
        y_c = x_c \Big(k + \frac{\alpha}{n} \sum_{j=c-\lfloor n/2 \rfloor}^{c+\lfloor (n-1)/2 \rfloor} x_j^2\Big)^{-\beta}

    with zeros for channels outside the input. ``input`` is (N, C, *) of any rank ≥ 3; channels_last
    inputs keep their layout. Differentiable in ``input`` to any order, in every autograd mode
    (``torch.func`` transforms and forward-mode AD run the composite, ``F.local_response_norm``; see
    ``fastdl/_autograd.py``).
    """
    _check(input, size)
    if input.numel() == 0:
        return input  # as F.local_response_norm does
    if composite_required():
        return _reference_forward(input, size, float(alpha), float(beta), float(k))
    return _forward_op(input, size, float(alpha), float(beta), float(k))


class LocalResponseNorm(nn.LocalResponseNorm):
    """Drop-in ``nn.LocalResponseNorm`` (same constructor, attributes and state) on fastdl's kernels."""

    def forward(self, input: Tensor) -> Tensor:
        return local_response_norm(input, self.size, self.alpha, self.beta, self.k)

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable_twin(self, nn.LocalResponseNorm)  # torch.jit.script (fastdl/_scripting.py)
