"""LSTM and GRU: ``LSTM``, ``GRU``, ``LSTMCell``, ``GRUCell``, ``lstm_cell`` and ``gru_cell``, drop-in twins of
``nn.LSTM``, ``nn.GRU``, ``nn.LSTMCell`` and ``nn.GRUCell`` (same parameters, names, gate order, state_dict).

LSTM, gate order i, f, g, o, with a = x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh split in four:

    i = σ(a_i)   f = σ(a_f)   g = tanh(a_g)   o = σ(a_o)
    c' = f ⊙ c + i ⊙ g        h' = o ⊙ tanh(c')          (proj_size > 0: h' = (o ⊙ tanh c')·W_hrᵀ)

GRU, gate order r, z, n, with gi = x·W_ihᵀ + b_ih and gh = h·W_hhᵀ + b_hh:

    r = σ(gi_r + gh_r)   z = σ(gi_z + gh_z)   n = tanh(gi_n + r ⊙ gh_n)   h' = (1 − z) ⊙ n + z ⊙ h

How the work is split (the same on every backend):

* cells: the two GEMMs are torch's (``F.linear``, differentiated by autograd); everything after them — the
  gate nonlinearities and the state update — is one fused op, ``fastdl::lstm_gates`` / ``fastdl::gru_gates``,
  with a fused backward. Forward saves the *activated* gates (LSTM: i, f, g, o; GRU: r, z, n and gh_n),
  which is what the derivatives are written in, so backward evaluates no σ or tanh of a pre-activation.
* sequences: per layer and direction, the input projection of all time steps is ONE GEMM (``linear`` of
  fastdl/_linear.py, on oneDNN for fp32 CPU, on the whole [T, B, I] input); the recurrence over time is one
  op, ``fastdl::lstm_layer`` / ``fastdl::gru_layer``, whose native kernel loops over time in C++ (per step:
  one GEMM with W_hh and one fused pointwise pass) and whose backward runs backward through time in C++ as
  well, forming dW_hh as a single GEMM over all steps. On the CPU the per-step GEMMs go through oneDNN with
  W_hh reordered once per layer. On CUDA, whole sequences of at most 8 rows (no projection) run forward as ONE
  persistent cooperative kernel per layer that keeps W_hh in the GPU's shared memories for all steps
  (csrc/cuda/rnn.cu); larger batches use the per-step cuBLAS GEMM and fused pointwise launch.

Packed sequences are run padded and time-major in the PackedSequence's (length-sorted) order, so that the
rows still running at step t are the prefix ``batch_sizes[t]``; rows past their end keep their state.

Dropout between layers is applied as ``nn.LSTM`` applies it: to the output of every layer but the last,
in training mode only.

torch.compile: Dynamo refuses to trace any instance of ``nn.LSTM`` / ``nn.GRU`` — subclasses included —
unless ``torch._dynamo.config.allow_rnn = True``. With it set, ``LSTM`` and ``GRU`` compile with
``fullgraph=True`` (every fastdl op here is a registered ``torch.library`` op with a fake kernel).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .._backends import OpKernels, auto_runs_eager, standard_kernels
from .._linear import linear

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "lstm_cell", "gru_cell"]


# ------------------------------------------------------------------------------------ reference cell math
def _lstm_gates_reference(input_gates: Tensor, hidden_gates: Tensor, cx: Tensor):
    i, f, g, o = (input_gates + hidden_gates).chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    return o * cy.tanh(), cy, torch.cat([i, f, g, o], 1)


def _lstm_gates_backward_reference(grad_hy: Tensor, grad_cy: Tensor, gates: Tensor, cx: Tensor, cy: Tensor):
    i, f, g, o = gates.chunk(4, 1)
    tanh_c = cy.tanh()
    grad_c = grad_cy + grad_hy * o * (1 - tanh_c * tanh_c)
    grad_gates = torch.cat(
        [grad_c * g * i * (1 - i), grad_c * cx * f * (1 - f), grad_c * i * (1 - g * g), grad_hy * tanh_c * o * (1 - o)], 1
    )
    return grad_gates, grad_c * f


def _gru_gates_reference(input_gates: Tensor, hidden_gates: Tensor, hx: Tensor):
    gi_r, gi_z, gi_n = input_gates.chunk(3, 1)
    gh_r, gh_z, gh_n = hidden_gates.chunk(3, 1)
    r, z = (gi_r + gh_r).sigmoid(), (gi_z + gh_z).sigmoid()
    n = (gi_n + r * gh_n).tanh()
    return n + z * (hx - n), torch.cat([r, z, n, gh_n], 1)


def _gru_gates_backward_reference(grad_hy: Tensor, saved: Tensor, hx: Tensor):
    r, z, n, gh_n = saved.chunk(4, 1)
    grad_n = grad_hy * (1 - z) * (1 - n * n)
    grad_z = grad_hy * (hx - n) * z * (1 - z)
    grad_r = grad_n * gh_n * r * (1 - r)
    return torch.cat([grad_r, grad_z, grad_n], 1), torch.cat([grad_r, grad_z, grad_n * r], 1), grad_hy * z


def _triton_cell(name: str) -> Callable:
    def run(*args):
        from ..triton_kernels import rnn as triton_rnn

        return getattr(triton_rnn, name)(*args)

    return run


# ------------------------------------------------------------------- time loops of the Python backends
class _Steps:
    """Which rows of a padded, length-sorted batch run at each step and where their previous state is
    (the same bookkeeping as the C++ kernels; see csrc/cpu/rnn.cpp)."""

    def __init__(self, time: int, batch: int, batch_sizes: Optional[Tensor], reverse: bool):
        self.time, self.reverse = time, reverse
        self.sizes = [batch] * time if batch_sizes is None else [int(s) for s in batch_sizes.tolist()]
        self.packed = time > 0 and self.sizes[-1] < batch

    def order(self, backward: bool = False) -> list[int]:
        forward = list(range(self.time - 1, -1, -1)) if self.reverse else list(range(self.time))
        return forward[::-1] if backward else forward

    def previous(self, t: int) -> Optional[int]:
        previous = t + 1 if self.reverse else t - 1
        return previous if 0 <= previous < self.time else None

    def continuing(self, t: int) -> int:
        """Rows [0, continuing) carry state from the previous step; the others start from the initial one."""
        previous = self.previous(t)
        return 0 if previous is None else min(self.sizes[t], self.sizes[previous])

    def previous_rows(self, t: int, sequence: Tensor, initial: Tensor) -> Tensor:
        continuing, active = self.continuing(t), self.sizes[t]
        if continuing == 0:
            return initial[:active]
        return torch.cat([sequence[self.previous(t)][:continuing], initial[continuing:active]])

    def first_finishing(self, t: int) -> int:
        if self.reverse:
            return 0 if t == 0 else self.sizes[t]
        return self.sizes[t + 1] if t + 1 < self.time else 0

    def allocate(self, shape, like: Tensor) -> Tensor:
        return like.new_zeros(shape) if self.packed else like.new_empty(shape)


def _lstm_layer_loop(gates_fn, input_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse):
    T, B = input_proj.shape[:2]
    steps = _Steps(T, B, batch_sizes, reverse)
    output = steps.allocate((T, B, h0.shape[1]), input_proj)
    gates = steps.allocate((T, B, input_proj.shape[2]), input_proj)
    cells = steps.allocate((T, B, c0.shape[1]), input_proj)
    h_n, c_n = h0.clone(), c0.clone()
    for t in steps.order():
        active = steps.sizes[t]
        h_prev = steps.previous_rows(t, output, h0)
        c_prev = steps.previous_rows(t, cells, c0)
        hy, cells[t, :active], gates[t, :active] = gates_fn(input_proj[t, :active], h_prev @ w_hh.t(), c_prev)
        output[t, :active] = hy if w_hr is None else hy @ w_hr.t()
        finishing = steps.first_finishing(t)
        h_n[finishing:active] = output[t, finishing:active]
        c_n[finishing:active] = cells[t, finishing:active]
    return output, h_n, c_n, gates, cells


def _lstm_layer_backward_loop(gates_backward_fn, grad_output, grad_h_n, grad_c_n, gates, cells, output, h0, c0,
                              w_hh, w_hr, batch_sizes, reverse):
    T, B = gates.shape[:2]
    H = c0.shape[1]
    steps = _Steps(T, B, batch_sizes, reverse)
    grad_proj = steps.allocate(gates.shape, gates)
    grad_h, grad_c = grad_h_n.clone(), grad_c_n.clone()
    grad_w_hh = torch.zeros_like(w_hh)
    grad_w_hr = torch.zeros_like(w_hr) if w_hr is not None else gates.new_empty(0)
    for t in steps.order(backward=True):
        active = steps.sizes[t]
        grad_step = grad_output[t, :active] + grad_h[:active]
        if w_hr is not None:
            unprojected = gates[t, :active, 3 * H:] * cells[t, :active].tanh()
            grad_w_hr += grad_step.t() @ unprojected
            grad_step = grad_step @ w_hr
        c_prev = steps.previous_rows(t, cells, c0)
        grad_gates, grad_c[:active] = gates_backward_fn(grad_step, grad_c[:active], gates[t, :active], c_prev,
                                                        cells[t, :active])
        grad_proj[t, :active] = grad_gates
        grad_w_hh += grad_gates.t() @ steps.previous_rows(t, output, h0)
        grad_h[:active] = grad_gates @ w_hh
    return grad_proj, grad_h, grad_c, grad_w_hh, grad_w_hr


def _gru_layer_loop(gates_fn, input_proj, h0, w_hh, b_hh, batch_sizes, reverse):
    T, B = input_proj.shape[:2]
    H = h0.shape[1]
    steps = _Steps(T, B, batch_sizes, reverse)
    output = steps.allocate((T, B, H), input_proj)
    saved = steps.allocate((T, B, 4 * H), input_proj)
    h_n = h0.clone()
    for t in steps.order():
        active = steps.sizes[t]
        h_prev = steps.previous_rows(t, output, h0)
        hidden_gates = F.linear(h_prev, w_hh, b_hh)
        output[t, :active], saved[t, :active] = gates_fn(input_proj[t, :active], hidden_gates, h_prev)
        finishing = steps.first_finishing(t)
        h_n[finishing:active] = output[t, finishing:active]
    return output, h_n, saved


def _gru_layer_backward_loop(gates_backward_fn, grad_output, grad_h_n, saved, output, h0, w_hh, has_bias,
                             batch_sizes, reverse):
    T, B = saved.shape[:2]
    steps = _Steps(T, B, batch_sizes, reverse)
    grad_proj = steps.allocate((T, B, w_hh.shape[0]), saved)
    grad_h = grad_h_n.clone()
    grad_w_hh = torch.zeros_like(w_hh)
    grad_b_hh = saved.new_zeros(w_hh.shape[0]) if has_bias else saved.new_empty(0)
    for t in steps.order(backward=True):
        active = steps.sizes[t]
        h_prev = steps.previous_rows(t, output, h0)
        grad_step = grad_output[t, :active] + grad_h[:active]
        grad_proj[t, :active], grad_hidden, grad_direct = gates_backward_fn(grad_step, saved[t, :active], h_prev)
        grad_w_hh += grad_hidden.t() @ h_prev
        if has_bias:
            grad_b_hh += grad_hidden.sum(0)
        grad_h[:active] = grad_direct + grad_hidden @ w_hh
    return grad_proj, grad_h, grad_w_hh, grad_b_hh


def _python_layer(loop: Callable, cell: Callable) -> Callable:
    return lambda *args: loop(cell, *args)


# ------------------------------------------------------------------------------------------ kernels
def _native(name: str) -> Callable:
    return lambda *args: getattr(torch.ops.fastdl, name)(*args)


def _kernels(op: str, native, triton, reference, sequence: bool = False) -> OpKernels:
    # A whole layer runs best as the native C++/CUDA time loop; the Triton backend drives its fused cell
    # from a Python loop, so on CUDA it comes after native for layers (and first for single cells).
    order = {"cuda": ("native", "triton", "reference") if sequence else ("triton", "native", "reference"),
             "cpu": ("native", "reference")}
    return standard_kernels(op, native, triton, reference, auto_order=order)


_LSTM_GATES = _kernels("fastdl.lstm_cell", _native("lstm_pointwise_forward"), _triton_cell("lstm_gates_forward"),
                       _lstm_gates_reference)
_LSTM_GATES_BACKWARD = _kernels("fastdl.lstm_cell (backward)", _native("lstm_pointwise_backward"),
                                _triton_cell("lstm_gates_backward"), _lstm_gates_backward_reference)
_GRU_GATES = _kernels("fastdl.gru_cell", _native("gru_pointwise_forward"), _triton_cell("gru_gates_forward"),
                      _gru_gates_reference)
_GRU_GATES_BACKWARD = _kernels("fastdl.gru_cell (backward)", _native("gru_pointwise_backward"),
                               _triton_cell("gru_gates_backward"), _gru_gates_backward_reference)
_LSTM_LAYER = _kernels(
    "fastdl.LSTM", _native("lstm_sequence_forward"),
    _python_layer(_lstm_layer_loop, _triton_cell("lstm_gates_forward")),
    _python_layer(_lstm_layer_loop, _lstm_gates_reference), sequence=True,
)
_LSTM_LAYER_BACKWARD = _kernels(
    "fastdl.LSTM (backward)", _native("lstm_sequence_backward"),
    _python_layer(_lstm_layer_backward_loop, _triton_cell("lstm_gates_backward")),
    _python_layer(_lstm_layer_backward_loop, _lstm_gates_backward_reference), sequence=True,
)
_GRU_LAYER = _kernels(
    "fastdl.GRU", _native("gru_sequence_forward"),
    _python_layer(_gru_layer_loop, _triton_cell("gru_gates_forward")),
    _python_layer(_gru_layer_loop, _gru_gates_reference), sequence=True,
)
_GRU_LAYER_BACKWARD = _kernels(
    "fastdl.GRU (backward)", _native("gru_sequence_backward"),
    _python_layer(_gru_layer_backward_loop, _triton_cell("gru_gates_backward")),
    _python_layer(_gru_layer_backward_loop, _gru_gates_backward_reference), sequence=True,
)


# -------------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("fastdl::lstm_gates", mutates_args=())
def _lstm_gates_op(input_gates: Tensor, hidden_gates: Tensor, cx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(hy, cy, activated gates) of one LSTM step from its two gate pre-activations and the cell state."""
    return _LSTM_GATES.select(cx.device, cx.dtype).run(input_gates, hidden_gates, cx)


@_lstm_gates_op.register_fake
def _(input_gates, hidden_gates, cx):
    return cx.new_empty(cx.shape), cx.new_empty(cx.shape), input_gates.new_empty(input_gates.shape)


@torch.library.custom_op("fastdl::lstm_gates_backward", mutates_args=())
def _lstm_gates_backward_op(grad_hy: Tensor, grad_cy: Tensor, gates: Tensor, cx: Tensor,
                            cy: Tensor) -> tuple[Tensor, Tensor]:
    return _LSTM_GATES_BACKWARD.select(cx.device, cx.dtype).run(grad_hy, grad_cy, gates, cx, cy)


@_lstm_gates_backward_op.register_fake
def _(grad_hy, grad_cy, gates, cx, cy):
    return gates.new_empty(gates.shape), cx.new_empty(cx.shape)


def _lstm_gates_setup(ctx, inputs, output) -> None:
    _, _, cx = inputs
    _, cy, gates = output
    # Backward is written in the activated gates and both cell states; no pre-activation is needed.
    ctx.save_for_backward(gates, cx, cy)


def _lstm_gates_backward(ctx, grad_hy, grad_cy, _grad_gates):
    gates, cx, cy = ctx.saved_tensors
    grad_gates, grad_cx = _lstm_gates_backward_op(grad_hy, grad_cy, gates, cx, cy)
    return grad_gates, grad_gates, grad_cx


_lstm_gates_op.register_autograd(_lstm_gates_backward, setup_context=_lstm_gates_setup)


@torch.library.custom_op("fastdl::gru_gates", mutates_args=())
def _gru_gates_op(input_gates: Tensor, hidden_gates: Tensor, hx: Tensor) -> tuple[Tensor, Tensor]:
    """(hy, saved = (r, z, n, gh_n)) of one GRU step from its two gate pre-activations and the state."""
    return _GRU_GATES.select(hx.device, hx.dtype).run(input_gates, hidden_gates, hx)


@_gru_gates_op.register_fake
def _(input_gates, hidden_gates, hx):
    return hx.new_empty(hx.shape), hx.new_empty(hx.shape[0], 4 * hx.shape[1])


@torch.library.custom_op("fastdl::gru_gates_backward", mutates_args=())
def _gru_gates_backward_op(grad_hy: Tensor, saved: Tensor, hx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _GRU_GATES_BACKWARD.select(hx.device, hx.dtype).run(grad_hy, saved, hx)


@_gru_gates_backward_op.register_fake
def _(grad_hy, saved, hx):
    gate_shape = (hx.shape[0], 3 * hx.shape[1])
    return hx.new_empty(gate_shape), hx.new_empty(gate_shape), hx.new_empty(hx.shape)


def _gru_gates_setup(ctx, inputs, output) -> None:
    _, _, hx = inputs
    # r, z, n and gh_n (the only part of the hidden gates backward needs, for dr) plus the old state.
    ctx.save_for_backward(output[1], hx)


def _gru_gates_backward(ctx, grad_hy, _grad_saved):
    saved, hx = ctx.saved_tensors
    return _gru_gates_backward_op(grad_hy, saved, hx)


_gru_gates_op.register_autograd(_gru_gates_backward, setup_context=_gru_gates_setup)


@torch.library.custom_op("fastdl::lstm_layer", mutates_args=())
def _lstm_layer_op(input_proj: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                   batch_sizes: Optional[Tensor], reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer in one direction over a time-major input projection (T, B, 4H) that already holds
    x·W_ihᵀ + b_ih + b_hh: returns (output, h_n, c_n, activated gates, cell states)."""
    kernel = _LSTM_LAYER.select(input_proj.device, input_proj.dtype)
    return kernel.run(input_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse)


@_lstm_layer_op.register_fake
def _(input_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse):
    T, B = input_proj.shape[:2]
    return (input_proj.new_empty(T, B, h0.shape[1]), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
            input_proj.new_empty(input_proj.shape), input_proj.new_empty(T, B, c0.shape[1]))


@torch.library.custom_op("fastdl::lstm_layer_backward", mutates_args=())
def _lstm_layer_backward_op(grad_output: Tensor, grad_h_n: Tensor, grad_c_n: Tensor, gates: Tensor, cells: Tensor,
                            output: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
                            batch_sizes: Optional[Tensor],
                            reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad input_proj, grad h0, grad c0, grad W_hh, grad W_hr — empty without projection)."""
    kernel = _LSTM_LAYER_BACKWARD.select(gates.device, gates.dtype)
    return kernel.run(grad_output, grad_h_n, grad_c_n, gates, cells, output, h0, c0, w_hh, w_hr, batch_sizes, reverse)


@_lstm_layer_backward_op.register_fake
def _(grad_output, grad_h_n, grad_c_n, gates, cells, output, h0, c0, w_hh, w_hr, batch_sizes, reverse):
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else gates.new_empty(0)
    return gates.new_empty(gates.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape), w_hh.new_empty(w_hh.shape), grad_w_hr


def _lstm_layer_setup(ctx, inputs, output) -> None:
    _, h0, c0, w_hh, w_hr, batch_sizes, reverse = inputs
    layer_output, _, _, gates, cells = output
    # Activated gates and cell states give every pointwise derivative; the output (the h of every step)
    # and h0 are the left factors of dW_hh; o ⊙ tanh c for dW_hr is rebuilt from gates and cells.
    ctx.save_for_backward(gates, cells, layer_output, h0, c0, w_hh, w_hr, batch_sizes)
    ctx.reverse = reverse
    # Gates and cells are outputs only so that backward can have them; their "gradients" are always
    # unused, and materializing them would zero-fill two [T, B, ·] tensors per call.
    ctx.set_materialize_grads(False)


def _zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _lstm_layer_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
    gates, cells, output, h0, c0, w_hh, w_hr, batch_sizes = ctx.saved_tensors
    grad_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr = _lstm_layer_backward_op(
        _zeros_if_none(grad_output, output), _zeros_if_none(grad_h_n, h0), _zeros_if_none(grad_c_n, c0), gates,
        cells, output, h0, c0, w_hh, w_hr, batch_sizes, ctx.reverse
    )
    return grad_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr if w_hr is not None else None, None, None


_lstm_layer_op.register_autograd(_lstm_layer_backward, setup_context=_lstm_layer_setup)


@torch.library.custom_op("fastdl::gru_layer", mutates_args=())
def _gru_layer_op(input_proj: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], batch_sizes: Optional[Tensor],
                  reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One GRU layer in one direction over a time-major input projection (T, B, 3H) holding x·W_ihᵀ + b_ih:
    returns (output, h_n, saved = r, z, n, gh_n of every step)."""
    kernel = _GRU_LAYER.select(input_proj.device, input_proj.dtype)
    return kernel.run(input_proj, h0, w_hh, b_hh, batch_sizes, reverse)


@_gru_layer_op.register_fake
def _(input_proj, h0, w_hh, b_hh, batch_sizes, reverse):
    T, B = input_proj.shape[:2]
    H = h0.shape[1]
    return input_proj.new_empty(T, B, H), h0.new_empty(h0.shape), input_proj.new_empty(T, B, 4 * H)


@torch.library.custom_op("fastdl::gru_layer_backward", mutates_args=())
def _gru_layer_backward_op(grad_output: Tensor, grad_h_n: Tensor, saved: Tensor, output: Tensor, h0: Tensor,
                           w_hh: Tensor, has_bias: bool, batch_sizes: Optional[Tensor],
                           reverse: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad input_proj, grad h0, grad W_hh, grad b_hh — empty without bias)."""
    kernel = _GRU_LAYER_BACKWARD.select(saved.device, saved.dtype)
    return kernel.run(grad_output, grad_h_n, saved, output, h0, w_hh, has_bias, batch_sizes, reverse)


@_gru_layer_backward_op.register_fake
def _(grad_output, grad_h_n, saved, output, h0, w_hh, has_bias, batch_sizes, reverse):
    T, B = saved.shape[:2]
    return (saved.new_empty(T, B, w_hh.shape[0]), h0.new_empty(h0.shape), w_hh.new_empty(w_hh.shape),
            saved.new_empty(w_hh.shape[0] if has_bias else 0))


def _gru_layer_setup(ctx, inputs, output) -> None:
    _, h0, w_hh, b_hh, batch_sizes, reverse = inputs
    layer_output, _, saved = output
    # r, z, n, gh_n give every pointwise derivative; output and h0 are the previous states (for dz and
    # as the left factors of dW_hh).
    ctx.save_for_backward(saved, layer_output, h0, w_hh, batch_sizes)
    ctx.reverse, ctx.has_bias = reverse, b_hh is not None
    ctx.set_materialize_grads(False)  # as for LSTM: the saved activations' "gradient" is never used


def _gru_layer_backward(ctx, grad_output, grad_h_n, _grad_saved):
    saved, output, h0, w_hh, batch_sizes = ctx.saved_tensors
    grad_proj, grad_h0, grad_w_hh, grad_b_hh = _gru_layer_backward_op(
        _zeros_if_none(grad_output, output), _zeros_if_none(grad_h_n, h0), saved, output, h0, w_hh, ctx.has_bias,
        batch_sizes, ctx.reverse
    )
    return grad_proj, grad_h0, grad_w_hh, grad_b_hh if ctx.has_bias else None, None, None


_gru_layer_op.register_autograd(_gru_layer_backward, setup_context=_gru_layer_setup)


# ------------------------------------------------------------------------------------------ functionals
def _check_cell(name: str, input: Tensor, states: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, gates: int) -> None:
    # The exception types are the ones torch's cells raise for the same mistakes.
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    hidden = w_hh.shape[1]
    if w_ih.shape[0] != gates * hidden or w_hh.shape[0] != gates * hidden:
        raise RuntimeError(f"{name}: w_ih and w_hh must have {gates}·hidden_size = {gates * hidden} rows, got "
                           f"{w_ih.shape[0]} and {w_hh.shape[0]}")
    if input.shape[-1] != w_ih.shape[1]:
        raise RuntimeError(f"{name}: input has inconsistent input_size: got {input.shape[-1]} expected {w_ih.shape[1]}")
    for index, state in enumerate(states):
        if state.dim() != input.dim():
            raise ValueError(f"{name}: Expected hx[{index}] to be {input.dim()}D like the input, got {state.dim()}D")
        if state.shape[-1] != hidden or (input.dim() == 2 and state.shape[0] != input.shape[0]):
            raise RuntimeError(f"{name}: hx[{index}] has shape {tuple(state.shape)}, expected "
                               f"{tuple(input.shape[:-1]) + (hidden,)}")


def lstm_cell(input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    r"""One LSTM step, the same numbers as ``nn.LSTMCell`` / ``torch.lstm_cell``.

    With :math:`a = x W_{ih}^\top + b_{ih} + h W_{hh}^\top + b_{hh}` split into i, f, g, o:
    :math:`c' = \sigma(a_f) \odot c + \sigma(a_i) \odot \tanh(a_g)`, :math:`h' = \sigma(a_o) \odot \tanh(c')`.
    ``input`` is (B, I) or (I,), ``hx = (h, c)`` each (B, H) or (H,). Returns ``(h', c')``.
    """
    h, c = hx
    _check_cell("lstm_cell", input, (h, c), w_ih, w_hh, 4)
    batched = input.dim() == 2
    if not batched:
        input, h, c = input.unsqueeze(0), h.unsqueeze(0), c.unsqueeze(0)
    hy, cy, _ = _lstm_gates_op(F.linear(input, w_ih, b_ih), F.linear(h, w_hh, b_hh), c)
    return (hy, cy) if batched else (hy.squeeze(0), cy.squeeze(0))


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    r"""One GRU step, the same numbers as ``nn.GRUCell`` / ``torch.gru_cell``.

    With :math:`g_i = x W_{ih}^\top + b_{ih}`, :math:`g_h = h W_{hh}^\top + b_{hh}` split into r, z, n:
    :math:`r = \sigma(g_{i,r} + g_{h,r})`, :math:`z = \sigma(g_{i,z} + g_{h,z})`,
    :math:`n = \tanh(g_{i,n} + r \odot g_{h,n})`, :math:`h' = (1 - z) \odot n + z \odot h`.
    ``input`` is (B, I) or (I,), ``hx`` (B, H) or (H,). Returns ``h'``.
    """
    _check_cell("gru_cell", input, (hx,), w_ih, w_hh, 3)
    batched = input.dim() == 2
    if not batched:
        input, hx = input.unsqueeze(0), hx.unsqueeze(0)
    hy, _ = _gru_gates_op(F.linear(input, w_ih, b_ih), F.linear(hx, w_hh, b_hh), hx)
    return hy if batched else hy.squeeze(0)


class LSTMCell(nn.LSTMCell):
    """Drop-in ``nn.LSTMCell`` (same constructor, parameters and state) on fastdl's fused gate kernels."""

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is None:
            zeros = input.new_zeros(input.shape[:-1] + (self.hidden_size,))
            hx = (zeros, zeros)
        return lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(nn.GRUCell):
    """Drop-in ``nn.GRUCell`` (same constructor, parameters and state) on fastdl's fused gate kernels."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is None:
            hx = input.new_zeros(input.shape[:-1] + (self.hidden_size,))
        return gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


# ------------------------------------------------------------------------------------------ modules
def _layer_parameters(module: nn.RNNBase, layer: int, direction: int) -> dict[str, Optional[Tensor]]:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return {name: getattr(module, name + suffix, None) for name in names}


def _run_stack(module: nn.RNNBase, input: Tensor, batch_sizes: Optional[Tensor], h0: Tensor,
               c0: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """All layers and directions over a time-major padded input (T, B, I); states (layers·directions, B, ·)."""
    is_lstm = c0 is not None
    directions = 2 if module.bidirectional else 1
    layer_input, h_finals, c_finals = input, [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index, reverse = layer * directions + direction, direction == 1
            p = _layer_parameters(module, layer, direction)
            if is_lstm:
                # Both biases enter the gates only as a sum: fold them into the one input-projection GEMM.
                bias = p["bias_ih"] + p["bias_hh"] if module.bias else None
                projection = linear(layer_input, p["weight_ih"], bias)
                output, h_n, c_n, _, _ = _lstm_layer_op(projection, h0[index], c0[index], p["weight_hh"],
                                                        p["weight_hr"], batch_sizes, reverse)
                c_finals.append(c_n)
            else:
                # b_hn sits inside r ⊙ (W_hn h + b_hn), so b_hh stays with the recurrent GEMM.
                projection = linear(layer_input, p["weight_ih"], p["bias_ih"])
                output, h_n, _ = _gru_layer_op(projection, h0[index], p["weight_hh"], p["bias_hh"], batch_sizes,
                                               reverse)
            outputs.append(output)
            h_finals.append(h_n)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 2)
        if module.training and module.dropout > 0 and layer + 1 < module.num_layers:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    return layer_input, torch.stack(h_finals), torch.stack(c_finals) if is_lstm else None


def _forward(module: nn.RNNBase, input, hx):
    """nn.LSTM / nn.GRU forward semantics (packed, unbatched, batch_first, optional states) on fastdl ops."""
    is_lstm = isinstance(module, nn.LSTM)
    name = type(module).__name__
    directions = 2 if module.bidirectional else 1
    state_size = module.proj_size if is_lstm and module.proj_size > 0 else module.hidden_size
    packed = isinstance(input, PackedSequence)
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        batched = True
    else:
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
        batched = input.dim() == 3
        if not batched:
            data = input.unsqueeze(1 if not module.batch_first else 0)
    batch = int(batch_sizes[0]) if packed else data.shape[0 if module.batch_first else 1]
    if hx is None:
        h = data.new_zeros(module.num_layers * directions, batch, state_size)
        hx = (h, data.new_zeros(module.num_layers * directions, batch, module.hidden_size)) if is_lstm else h
    else:
        states = hx if is_lstm else (hx,)
        expected = 3 if batched else 2
        if any(state.dim() != expected for state in states):
            got = ", ".join(f"{state.dim()}-D" for state in states)
            raise RuntimeError(f"{name}: for {'batched 3-D' if batched else 'unbatched 2-D'} input, hx"
                               f"{' and cx' if is_lstm else ''} should be {expected}-D, got {got}")
        if not batched:
            hx = tuple(state.unsqueeze(1) for state in hx) if is_lstm else hx.unsqueeze(1)
        hx = module.permute_hidden(hx, sorted_indices)
    module.check_forward_args(data, hx, batch_sizes)
    if packed:
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
    else:
        padded = data.transpose(0, 1) if module.batch_first else data
    h0, c0 = hx if is_lstm else (hx, None)
    output, h_n, c_n = _run_stack(module, padded, batch_sizes, h0, c0)
    hidden = (h_n, c_n) if is_lstm else h_n
    if packed:
        output = PackedSequence(pack_padded_sequence(output, lengths).data, batch_sizes, sorted_indices,
                                unsorted_indices)
        return output, module.permute_hidden(hidden, unsorted_indices)
    if module.batch_first:
        output = output.transpose(0, 1)
    if not batched:
        output = output.squeeze(0 if module.batch_first else 1)
        hidden = tuple(state.squeeze(1) for state in hidden) if is_lstm else hidden.squeeze(1)
    return output, hidden


class LSTM(nn.LSTM):
    """Drop-in ``nn.LSTM``: every constructor argument (``num_layers``, ``bias``, ``batch_first``,
    ``dropout``, ``bidirectional``, ``proj_size``), the same parameters and state_dict, PackedSequence,
    unbatched input and optional ``(h_0, c_0)`` — on fastdl's sequence kernels (module docstring)."""

    def forward(self, input, hx=None):
        if auto_runs_eager("LSTM", self.weight_ih_l0.device, self.weight_ih_l0.dtype):
            return super().forward(input, hx)
        return _forward(self, input, hx)


class GRU(nn.GRU):
    """Drop-in ``nn.GRU``: every constructor argument (``num_layers``, ``bias``, ``batch_first``,
    ``dropout``, ``bidirectional``), the same parameters and state_dict, PackedSequence, unbatched input and
    optional ``h_0`` — on fastdl's sequence kernels (module docstring)."""

    def forward(self, input, hx=None):
        return _forward(self, input, hx)
