"""``linear``: ``F.linear`` that runs fp32 CPU products on oneDNN, with its own backward — the linear
layers around fastdl's kernels (MultiheadAttention's projections, the LSTM/GRU input projections).

For fp32 on CPU, torch's ``F.linear`` goes to MKL; oneDNN's JIT GEMM, reached through torch's own
``mkldnn._linear_pointwise`` (the op Inductor uses for CPU linears), ran MultiheadAttention's
(2048 × 512)·(512 × 1536) in-projection and its g·W in 12% less CPU time on one core of the AMD test
machine (≈101 vs 89 GFLOP/s; on both cores of the quiet machine the gap shrank to 0–5%, and under load it
grew), and it adds the bias in the GEMM's epilogue instead of a separate broadcast copy of the bias into
the output. The weights are passed in their plain layout, so no reordered copy has to be kept in sync
with parameters the optimizer changes. Below AVX2 it is the other way round: oneDNN's SSE4.1 GEMM took
2–2.6× MKL's time (one core, the same machine with both capped to that level), so there, and for
everything else (empty products, other dtypes, GPUs), it is ``F.linear``.

``fastdl::linear`` / ``fastdl::linear_backward`` are registered ``torch.library`` ops (fake kernels and
autograd included), so ``torch.compile`` traces them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _cpu_isa
from ._autograd import composite_required, differentiable_backward_required

_ONEDNN_BUILT = torch.backends.mkldnn.is_available()  # read once: torch.compile may not trace the call


def _onednn_usable(input: Tensor, weight: Tensor) -> bool:
    """Whether the product runs on oneDNN: non-empty fp32 CPU tensors (oneDNN rejects empty products),
    with oneDNN built and enabled (``torch.backends.mkldnn``), on a CPU with AVX2 at least (module
    docstring; fastdl's instruction set stands for the CPU's). It is torch's own GEMM library, so
    fastdl's backend choice, which picks among fastdl's kernels, does not apply."""
    return (input.device.type == "cpu" and input.dtype == weight.dtype == torch.float32
            and input.numel() > 0 and weight.numel() > 0 and _ONEDNN_BUILT and torch.backends.mkldnn.enabled
            and _cpu_isa.cpu_isa().active != "baseline")


def _onednn_matmul(left: Tensor, right_t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """left (M, K) · right_t (N, K)ᵀ (+ bias) on oneDNN. right_t may have any strides; a non-contiguous
    left is first copied contiguous by torch's entry point."""
    return torch.ops.mkldnn._linear_pointwise(left, right_t, bias, "none", [], "")


@torch.library.custom_op("fastdl::linear", mutates_args=())
def _linear_op(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear(input, weight, bias) for fp32 CPU input (…, K), weight (N, K), bias (N) or None."""
    flat = input.reshape(-1, input.shape[-1])
    return _onednn_matmul(flat, weight, bias).view(*input.shape[:-1], weight.shape[0])


@_linear_op.register_fake
def _(input, weight, bias):
    return input.new_empty(*input.shape[:-1], weight.shape[0])


@torch.library.custom_op("fastdl::linear_backward", mutates_args=())
def _linear_backward_op(grad_out: Tensor, input: Tensor, weight: Tensor, input_grad: bool, weight_grad: bool,
                            bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """∂L/∂input = g·W, ∂L/∂W = gᵀ·x, ∂L/∂b = Σ_rows g — each an empty tensor unless asked for."""
    grad = grad_out.reshape(-1, grad_out.shape[-1])
    flat = input.reshape(-1, input.shape[-1])
    grad_input = _onednn_matmul(grad, weight.t()).view(input.shape) if input_grad else grad.new_empty(0)
    # gᵀ·x stays on torch.mm: its BLAS call reads the transposed operand in place, while torch's oneDNN
    # entry would first copy it contiguous (measured: equal or slower, copies included).
    grad_weight = torch.mm(grad.t(), flat) if weight_grad else grad.new_empty(0)
    # A matrix-vector product with ones: torch's column sum grad.sum(0) of this (2048 × 1536) gradient took
    # ~10× as long on the test machine.
    grad_bias = torch.mv(grad.t(), grad.new_ones(grad.shape[0])) if bias_grad else grad.new_empty(0)
    return grad_input, grad_weight, grad_bias


@_linear_backward_op.register_fake
def _(grad_out, input, weight, input_grad, weight_grad, bias_grad):
    return (input.new_empty(input.shape) if input_grad else grad_out.new_empty(0),
            weight.new_empty(weight.shape) if weight_grad else grad_out.new_empty(0),
            grad_out.new_empty(weight.shape[0]) if bias_grad else grad_out.new_empty(0))


def _linear_setup_context(ctx, inputs, output) -> None:
    input, weight, bias = inputs
    # Both GEMM operands of the forward: each is the other's gradient's right-hand factor.
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, grad_out: Tensor):
    input, weight = ctx.saved_tensors
    wants_input, wants_weight, wants_bias = ctx.needs_input_grad
    if differentiable_backward_required():  # F.linear's gradient in differentiable PyTorch (fastdl/_autograd.py)
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        return (grad_out.matmul(weight) if wants_input else None,
                grad.t().mm(input.reshape(-1, input.shape[-1])) if wants_weight else None,
                grad.sum(0) if wants_bias and ctx.has_bias else None)
    grad_input, grad_weight, grad_bias = _linear_backward_op(
        grad_out, input, weight, wants_input, wants_weight, wants_bias and ctx.has_bias)
    return (grad_input if wants_input else None, grad_weight if wants_weight else None,
            grad_bias if wants_bias and ctx.has_bias else None)


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear(input, weight, bias), on oneDNN for fp32 CPU tensors (module docstring); ``F.linear`` itself
    under ``torch.func`` transforms and forward-mode AD (fastdl/_autograd.py)."""
    if _onednn_usable(input, weight) and not composite_required():
        return _linear_op(input, weight, bias)
    return F.linear(input, weight, bias)
