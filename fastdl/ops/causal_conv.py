"""Dilated causal 1-D convolution (WaveNet, TCN): ``CausalConv1d`` and ``causal_conv1d``, plus streaming
generation by ``CausalConv1d.init_state`` / ``CausalConv1d.step``.

For an input x of shape (N, C_in, T), weight w of shape (C_out, C_in/groups, k), dilation d, and the
shift of tap j, s_j = d·(k − 1 − j):

    y[n, o, t] = b[o] + Σ_{j<k} Σ_{i in o's group} w[o, i, j] · x[n, i, t − s_j]      (x at t < 0 is 0)

which is exactly ``F.conv1d(F.pad(x, (d·(k−1), 0)), w, b, dilation=d, groups=groups)``: output length =
input length, and y at t depends only on x at ≤ t. With g = ∂L/∂y the gradients are

    ∂L/∂x[n, i, t] = Σ_j Σ_{o in i's group} w[o, i, j] · g[n, o, t + s_j]      (t + s_j < T)
    ∂L/∂w[o, i, j] = Σ_n Σ_{t ≥ s_j} g[n, o, t] · x[n, i, t − s_j]
    ∂L/∂b[o]       = Σ_n Σ_t g[n, o, t]

The kernels read the causal window in place: no left-padded copy of x (pad + Conv1d) and no chomped copy
of an over-long output (TCN's ``Conv1d(padding=p)`` followed by ``[..., :-p]``).

Streaming (the fast-WaveNet queue). A layer's output at t needs x at t − s_j, j < k: the last
R = d·(k − 1) inputs. The state keeps them in a ring buffer of R + 1 slots of shape (N, R + 1, C_in),
x at step t living in slot t mod (R + 1). One step reads the k slots it needs and writes x_t into its own
slot: O(k·C_in·C_out) work per sample per layer, instead of recomputing the whole receptive field. The
extra slot makes the write never land on a slot this step reads (every read shift is 1…R), so a parallel
kernel needs no ordering between reads and the write. Slots of steps before 0 are never written and read
as the zeros the buffer starts with, which is the causal zero padding.

Layers: kernels in ``csrc/cpu/causal_conv.cpp``, ``csrc/cuda/causal_conv.{cu,cpp}`` and
``triton_kernels/causal_conv.py``; here the ``torch.library`` ops ``fastdl::causal_conv1d``,
``fastdl::causal_conv1d_backward`` and ``fastdl::causal_conv1d_step`` (fake kernels and autograd
included), backend selection, the functionals and the module.

Autograd saves x and w: the input gradient needs w, the weight gradient needs x, and nothing of the
output is needed (the op is linear). The reference kernels double as the composite of
``fastdl/_autograd.py``: ``F.conv1d`` of the left-padded input under ``torch.func`` transforms and
forward-mode AD, ATen's (differentiable) convolution backward when a backward must be differentiable.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _extension
from .._autograd import composite_required, differentiable_backward_required
from .._backends import standard_kernels
from .._scripting import scriptable_twin

__all__ = ["CausalConv1d", "CausalConvState", "causal_conv1d", "causal_conv1d_init_state", "causal_conv1d_step"]


class CausalConvState(NamedTuple):
    """Streaming state of one causal conv layer.

    ``buffer`` (N, d·(k−1) + 1, C_in) holds the last inputs, x at step t in slot t mod (d·(k−1) + 1);
    ``position`` is the index of the next step. ``step`` updates ``buffer`` in place and returns a state
    with ``position + 1``; the state passed in is stale afterwards.
    """

    buffer: Tensor
    position: int


def _shifts(kernel_size: int, dilation: int) -> list[int]:
    return [dilation * (kernel_size - 1 - tap) for tap in range(kernel_size)]


# ---------------------------------------------------------------------------------------------- reference


def _reference_forward(input: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, groups: int) -> Tensor:
    if input.shape[0] == 0 or input.shape[2] == 0:  # F.conv1d rejects a padded length shorter than the window
        return input.new_empty((input.shape[0], weight.shape[0], input.shape[2]))
    padding = dilation * (weight.shape[-1] - 1)
    return F.conv1d(F.pad(input, (padding, 0)), weight, bias, dilation=dilation, groups=groups)


def _reference_backward(grad_output: Tensor, input: Tensor, weight: Tensor, dilation: int, groups: int):
    if input.shape[0] == 0 or input.shape[2] == 0:  # F.conv1d rejects a padded length shorter than the window
        return torch.zeros_like(input), torch.zeros_like(weight), weight.new_zeros((weight.shape[0],))
    padding = dilation * (weight.shape[-1] - 1)
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_output, F.pad(input, (padding, 0)), weight, [weight.shape[0]], [1], [0], [dilation], False, [0],
        groups, [True, True, True],
    )
    return grad_input[..., padding:].contiguous(), grad_weight, grad_bias


def _reference_step(input: Tensor, buffer: Tensor, position: int, weight: Tensor, bias: Tensor | None,
                    dilation: int, groups: int) -> Tensor:
    slots = buffer.shape[1]
    window = [input if shift == 0 else buffer[:, (position - shift) % slots] for shift in _shifts(weight.shape[-1], dilation)]
    output = F.conv1d(torch.stack(window, dim=-1), weight, bias, groups=groups).squeeze(-1)
    buffer[:, position % slots] = input
    return output


# ------------------------------------------------------------------------------------------------- native


def _native_forward(input, weight, bias, dilation, groups):
    return torch.ops.fastdl.causal_conv_forward(input, weight, bias, dilation, groups)


def _native_backward(grad_output, input, weight, dilation, groups):
    return torch.ops.fastdl.causal_conv_backward(grad_output, input, weight, dilation, groups)


def _native_step(input, buffer, position, weight, bias, dilation, groups):
    return torch.ops.fastdl.causal_conv_step(input, buffer, position, weight, bias, dilation, groups)


# ------------------------------------------------------------------------------------------------- triton


def _triton_forward(input, weight, bias, dilation, groups):
    from ..triton_kernels.causal_conv import causal_conv_forward

    return causal_conv_forward(input, weight, bias, dilation, groups)


def _triton_backward(grad_output, input, weight, dilation, groups):
    from ..triton_kernels.causal_conv import causal_conv_backward

    return causal_conv_backward(grad_output, input, weight, dilation, groups)


def _triton_step(input, buffer, position, weight, bias, dilation, groups):
    from ..triton_kernels.causal_conv import causal_conv_step

    return causal_conv_step(input, buffer, position, weight, bias, dilation, groups)


_FORWARD = standard_kernels("fastdl.causal_conv1d", _native_forward, _triton_forward, _reference_forward)
_BACKWARD = standard_kernels("fastdl.causal_conv1d (backward)", _native_backward, _triton_backward, _reference_backward)
_STEP = standard_kernels("fastdl.causal_conv1d_step", _native_step, _triton_step, _reference_step)


# ------------------------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastdl::causal_conv1d", mutates_args=())
def _forward_op(input: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, groups: int) -> Tensor:
    if input.shape[0] == 0 or input.shape[2] == 0:
        return _reference_forward(input, weight, bias, dilation, groups)
    kernel = _FORWARD.select(input.device, input.dtype)
    return kernel.run(input, weight, bias, dilation, groups)


@_forward_op.register_fake
def _(input, weight, bias, dilation, groups):
    return input.new_empty((input.shape[0], weight.shape[0], input.shape[2]))


@torch.library.custom_op("fastdl::causal_conv1d_backward", mutates_args=())
def _backward_op(grad_output: Tensor, input: Tensor, weight: Tensor, dilation: int,
                 groups: int) -> tuple[Tensor, Tensor, Tensor]:
    if input.shape[0] == 0 or input.shape[2] == 0:
        return _reference_backward(grad_output, input, weight, dilation, groups)
    kernel = _BACKWARD.select(input.device, input.dtype)
    return kernel.run(grad_output, input, weight, dilation, groups)


@_backward_op.register_fake
def _(grad_output, input, weight, dilation, groups):
    return torch.empty_like(input, memory_format=torch.contiguous_format), torch.empty_like(weight), \
        weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, dilation, groups = inputs
    ctx.save_for_backward(input, weight)  # x for ∂w, w for ∂x; the op is linear, y is not needed
    ctx.has_bias = bias is not None
    ctx.hyperparameters = (dilation, groups)


def _backward(ctx, grad_output: Tensor):
    input, weight = ctx.saved_tensors
    # The reference backward is ATen's convolution backward, itself differentiable (fastdl/_autograd.py).
    backward = _reference_backward if differentiable_backward_required() else _backward_op
    grad_input, grad_weight, grad_bias = backward(grad_output.contiguous(), input, weight, *ctx.hyperparameters)
    return grad_input, grad_weight, grad_bias if ctx.has_bias else None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastdl::causal_conv1d_step", mutates_args=("buffer",))
def _step_op(input: Tensor, buffer: Tensor, position: int, weight: Tensor, bias: Tensor | None, dilation: int,
             groups: int) -> Tensor:
    kernel = _STEP.select(input.device, input.dtype)
    return kernel.run(input, buffer, position, weight, bias, dilation, groups)


@_step_op.register_fake
def _(input, buffer, position, weight, bias, dilation, groups):
    return input.new_empty((input.shape[0], weight.shape[0]))


def _eager_native_step(input) -> bool:
    """Whether a step on ``input`` runs as ``fastdl._C.causal_conv_step``: the native CPU kernel called
    straight from Python, its argument checks in C++, its output outside autograd.

    Generation runs one step per layer per sample on a few hundred numbers, so the fixed cost of a call is
    the cost: ``torch.library.custom_op`` spends ~35 µs of Python per call (argument re-packing, its
    autograd wrapper, the dynamo guard around the implementation) and the dispatcher called through
    ``torch.ops`` several more, many times the kernel; a pybind11 function costs ~1 µs. Eager calls on
    plain CPU tensors that would run the native kernel thus take it; traced code (torch.compile, export:
    their tensors are subclasses, or dynamo is compiling), CUDA and the other backends go through
    ``fastdl::causal_conv1d_step``. The kernel is the same either way.
    """
    if type(input) is not Tensor or not input.is_cpu or torch.compiler.is_compiling() or composite_required():
        return False
    return _STEP.native_on_cpu(input.dtype)


def _step_eager_native(input: Tensor, state: CausalConvState, weight: Tensor, bias: Tensor | None, dilation: int,
                       groups: int) -> tuple[Tensor, CausalConvState]:
    buffer, position = state
    output = _extension._C.causal_conv_step(input, buffer, position, weight, bias, dilation, groups)
    return output, CausalConvState(buffer, position + 1)


# ------------------------------------------------------------------------------------------ input checks


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"causal_conv1d: {name} must be an int, got {type(value).__name__}")
    if value < minimum:  # RuntimeError, as F.conv1d's for a non-positive dilation or groups
        raise RuntimeError(f"causal_conv1d: {name} must be >= {minimum}, got {value}")


def _check_weight_and_bias(weight: Tensor, bias: Tensor | None, dilation: int, groups: int) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 3:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise RuntimeError(f"causal_conv1d: weight must be a 3-D tensor (out_channels, in_channels/groups, kernel_size), got {shape}")
    _check_int("dilation", dilation, 1)
    _check_int("groups", groups, 1)
    if weight.shape[0] % groups != 0:
        raise RuntimeError(f"causal_conv1d: out_channels ({weight.shape[0]}) must be divisible by groups ({groups})")
    if weight.shape[-1] < 1:
        raise RuntimeError("causal_conv1d: kernel_size must be >= 1")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise RuntimeError(f"causal_conv1d: bias must have shape ({weight.shape[0]},) (out_channels), got {shape}")


def _check_operands(input: Tensor, weight: Tensor, bias: Tensor | None, channels: int) -> None:
    if input.shape[1] != channels:
        raise RuntimeError(
            f"causal_conv1d: input has {input.shape[1]} channels but weight {tuple(weight.shape)} with these groups "
            f"expects {channels}"
        )
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.device != input.device:
            raise RuntimeError(f"causal_conv1d: {name} is on {tensor.device} but input is on {input.device}")
        if tensor.dtype != input.dtype:
            raise RuntimeError(f"causal_conv1d: {name} has dtype {tensor.dtype} but input has {input.dtype}")


# -------------------------------------------------------------------------------------------- functionals


def causal_conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, dilation: int = 1,
                  groups: int = 1) -> Tensor:
    r"""Dilated causal convolution, the same numbers as
    ``F.conv1d(F.pad(input, (dilation·(k−1), 0)), weight, bias, dilation=dilation, groups=groups)``.

    .. math::
        y_{n,o,t} = b_o + \sum_{j<k} \sum_{i} w_{o,i,j}\, x_{n,i,\,t - d(k-1-j)} \qquad (x_{\cdot,\cdot,t<0} = 0)

    ``input`` is (N, C_in, T) or unbatched (C_in, T); the output has the same length T. Differentiable
    in input, weight and bias to any order, in every autograd mode (``torch.func`` transforms and
    forward-mode AD run the composite, the ``F.conv1d`` above; see ``fastdl/_autograd.py``).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"causal_conv1d: input must be a Tensor, got {type(input).__name__}")
    if input.dim() not in (2, 3):
        raise RuntimeError(
            f"causal_conv1d: expected a 2-D (unbatched) or 3-D (batched) input (N, C_in, T), got shape {tuple(input.shape)}"
        )
    _check_weight_and_bias(weight, bias, dilation, groups)
    batched = input if input.dim() == 3 else input.unsqueeze(0)
    _check_operands(batched, weight, bias, weight.shape[1] * groups)
    forward = _reference_forward if composite_required() else _forward_op
    output = forward(batched, weight, bias, dilation, groups)
    return output if input.dim() == 3 else output.squeeze(0)


def causal_conv1d_init_state(batch_size: int, in_channels: int, kernel_size: int, dilation: int = 1, *,
                             device=None, dtype=None) -> CausalConvState:
    """The state before the first step: an all-zero history (the causal zero padding)."""
    _check_int("batch_size", batch_size, 0)
    slots = dilation * (kernel_size - 1) + 1
    return CausalConvState(torch.zeros(batch_size, slots, in_channels, device=device, dtype=dtype), 0)


def causal_conv1d_step(input: Tensor, state: CausalConvState, weight: Tensor, bias: Tensor | None = None,
                       dilation: int = 1, groups: int = 1) -> tuple[Tensor, CausalConvState]:
    """One streaming step: ``input`` (N, C_in) is x at step ``state.position``; returns y at that step,
    (N, C_out), and the state for the next step (its buffer is ``state.buffer``, updated in place).
    Running it over t = 0 … T−1 gives ``causal_conv1d`` of the whole sequence, column by column. Meant for
    generation: reverse-mode autograd does not record it, forward-mode AD carries tangents through it."""
    _check_weight_and_bias(weight, bias, dilation, groups)
    if not isinstance(input, Tensor) or input.dim() != 2:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise RuntimeError(f"causal_conv1d_step: input must be (batch, in_channels), got {shape}")
    buffer, position = state
    expected = (input.shape[0], dilation * (weight.shape[-1] - 1) + 1, weight.shape[1] * groups)
    if tuple(buffer.shape) != expected:
        raise RuntimeError(
            f"causal_conv1d_step: state buffer has shape {tuple(buffer.shape)}, expected {expected} "
            "(batch, dilation·(kernel_size−1)+1, in_channels): make it with init_state"
        )
    _check_operands(input.unsqueeze(-1), weight, bias, weight.shape[1] * groups)
    if buffer.dtype != input.dtype or buffer.device != input.device:
        raise RuntimeError(f"causal_conv1d_step: state buffer is {buffer.dtype} on {buffer.device}, input is "
                           f"{input.dtype} on {input.device}")
    if _eager_native_step(input):
        return _step_eager_native(input, state, weight, bias, dilation, groups)
    # Under forward-mode AD and torch.func transforms the step is plain PyTorch (fastdl/_autograd.py), so
    # tangents reach its output.
    step = _reference_step if composite_required() else _step_op
    output = step(input.contiguous(), buffer, position, weight, bias, dilation, groups)
    return output, CausalConvState(buffer, position + 1)


# ------------------------------------------------------------------------------------------------- module


class CausalConv1d(nn.Conv1d):
    """Drop-in causal ``nn.Conv1d``: same ``weight`` and ``bias`` (so state_dicts load both ways), no
    padding attribute in use, output length = input length, output at t sees inputs ≤ t only.

    ``init_state(batch_size)`` and ``step(x_t, state)`` run it one sample at a time (see module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1,
                 bias: bool = True, device=None, dtype=None) -> None:
        if isinstance(kernel_size, (tuple, list)):
            (kernel_size,) = kernel_size
        if isinstance(dilation, (tuple, list)):
            (dilation,) = dilation
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=dilation,
                         groups=groups, bias=bias, device=device, dtype=dtype)

    @property
    def receptive_field(self) -> int:
        """How many input steps one output step sees: dilation·(kernel_size−1) + 1."""
        return self.dilation[0] * (self.kernel_size[0] - 1) + 1

    def forward(self, input: Tensor) -> Tensor:
        return causal_conv1d(input, self.weight, self.bias, self.dilation[0], self.groups)

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable_twin(self, _ScriptableCausalConv1d)  # torch.jit.script (fastdl/_scripting.py)

    def init_state(self, batch_size: int) -> CausalConvState:
        return causal_conv1d_init_state(batch_size, self.in_channels, self.kernel_size[0], self.dilation[0],
                                        device=self.weight.device, dtype=self.weight.dtype)

    def step(self, input: Tensor, state: CausalConvState) -> tuple[Tensor, CausalConvState]:
        if _eager_native_step(input):
            # The module's weight, bias, dilation and groups were checked when it was built; the native
            # kernel checks the input and the state against them. The parameters are read from
            # _parameters: nn.Module finds them by __getattr__ only after a failed normal lookup, which
            # costs as much as the rest of this call. A parametrized weight (weight_norm, spectral_norm)
            # is not there: it is computed, by the attribute.
            parameters = self._parameters
            weight = parameters["weight"] if "weight" in parameters else self.weight
            bias = parameters["bias"] if "bias" in parameters else self.bias
            return _step_eager_native(input, state, weight, bias, self.dilation[0], self.groups)
        with torch.no_grad():
            return causal_conv1d_step(input, state, self.weight, self.bias, self.dilation[0], self.groups)


class _ScriptableCausalConv1d(nn.Conv1d):
    """CausalConv1d's forward in TorchScript-compilable PyTorch (fastdl/_scripting.py): the left-padded
    ``F.conv1d`` the module docstring defines."""

    def forward(self, input: Tensor) -> Tensor:
        padding = self.dilation[0] * (self.kernel_size[0] - 1)
        return F.conv1d(F.pad(input, [padding, 0]), self.weight, self.bias, 1, 0, self.dilation, self.groups)
