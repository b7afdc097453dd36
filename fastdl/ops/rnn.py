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

Beyond first-order eager autograd (fastdl/_autograd.py): under ``torch.func`` transforms and forward-mode
AD the cells run the reference gate math and the layers the reference time loop. A backward that must be
differentiable runs the reference backward, written in the saved activations — which are outputs of the
op, so the second derivative reaches them as gradients of those outputs, and the backward takes such
gradients too (``grad_gates``, ``grad_cells``, ``grad_saved``). Nothing more is saved for it: the input
projection, which recomputing the forward would need, is not kept.

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

from .._autograd import composite_required, differentiable_backward_required
from .._backends import OpKernels, auto_runs_eager, standard_kernels
from .._linear import linear
from .._scripting import scriptable_twin

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell", "lstm_cell", "gru_cell"]


# ------------------------------------------------------------------------------------ reference cell math
def _lstm_gates_reference(input_gates: Tensor, hidden_gates: Tensor, cx: Tensor):
    i, f, g, o = (input_gates + hidden_gates).chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cy = f * cx + i * g
    return o * cy.tanh(), cy, torch.cat([i, f, g, o], 1)


def _lstm_gates_backward_reference(grad_hy: Tensor, grad_cy: Tensor, gates: Tensor, cx: Tensor, cy: Tensor,
                                   grad_gates: Optional[Tensor] = None):
    """(∂L/∂pre-activations, ∂L/∂cx). ``grad_gates`` is a gradient reaching the activated gates directly, as
    the saved output of the op (only when the backward is itself differentiated; see fastdl/_autograd.py)."""
    i, f, g, o = gates.chunk(4, 1)
    tanh_c = cy.tanh()
    grad_c = grad_cy + grad_hy * o * (1 - tanh_c * tanh_c)
    grad_i, grad_f, grad_g, grad_o = grad_c * g, grad_c * cx, grad_c * i, grad_hy * tanh_c  # ∂L/∂(i, f, g, o)
    if grad_gates is not None:
        extra_i, extra_f, extra_g, extra_o = grad_gates.chunk(4, 1)
        grad_i, grad_f, grad_g, grad_o = grad_i + extra_i, grad_f + extra_f, grad_g + extra_g, grad_o + extra_o
    grad_pre = torch.cat([grad_i * i * (1 - i), grad_f * f * (1 - f), grad_g * (1 - g * g), grad_o * o * (1 - o)], 1)
    return grad_pre, grad_c * f


def _gru_gates_reference(input_gates: Tensor, hidden_gates: Tensor, hx: Tensor):
    gi_r, gi_z, gi_n = input_gates.chunk(3, 1)
    gh_r, gh_z, gh_n = hidden_gates.chunk(3, 1)
    r, z = (gi_r + gh_r).sigmoid(), (gi_z + gh_z).sigmoid()
    n = (gi_n + r * gh_n).tanh()
    return n + z * (hx - n), torch.cat([r, z, n, gh_n], 1)


def _gru_gates_backward_reference(grad_hy: Tensor, saved: Tensor, hx: Tensor, grad_saved: Optional[Tensor] = None):
    """(∂L/∂input gates, ∂L/∂hidden gates, ∂L/∂hx through h' = … + z ⊙ hx). ``grad_saved`` is a gradient
    reaching the saved r, z, n, gh_n directly (as for LSTM's ``grad_gates``)."""
    r, z, n, gh_n = saved.chunk(4, 1)
    grad_r, grad_z, grad_n, grad_gh_n = 0, grad_hy * (hx - n), grad_hy * (1 - z), 0  # ∂L/∂(r, z, n, gh_n)
    if grad_saved is not None:
        extra_r, extra_z, extra_n, grad_gh_n = grad_saved.chunk(4, 1)
        grad_r, grad_z, grad_n = extra_r, grad_z + extra_z, grad_n + extra_n
    grad_pre_n = grad_n * (1 - n * n)
    grad_pre_z = grad_z * z * (1 - z)
    grad_pre_r = (grad_pre_n * gh_n + grad_r) * r * (1 - r)
    return (torch.cat([grad_pre_r, grad_pre_z, grad_pre_n], 1),
            torch.cat([grad_pre_r, grad_pre_z, grad_pre_n * r + grad_gh_n], 1), grad_hy * z)


def _triton_cell(name: str) -> Callable:
    def run(*args):
        from ..triton_kernels import rnn as triton_rnn

        return getattr(triton_rnn, name)(*args)

    return run


# ------------------------------------------------------------------- time loops of the Python backends
# Plain PyTorch, out of place and with shapes that do not depend on the data (every row is computed at every
# step; rows of a packed batch that are not running keep their state), so that they also run under
# torch.func transforms and torch.compile and can be differentiated again: the layers of the reference and
# Triton backends, and the composite of fastdl/_autograd.py.
def _running(batch_sizes: Optional[Tensor], batch: int, like: Tensor) -> Optional[Tensor]:
    """(T, B, 1): whether row b runs at step t of a packed, length-sorted batch (the first batch_sizes[t]
    rows do); None when every row runs at every step."""
    if batch_sizes is None:
        return None
    return (torch.arange(batch)[None, :] < batch_sizes[:, None]).to(like.device).unsqueeze(-1)


def _order(time: int, reverse: bool, backward: bool = False) -> range:
    return range(time - 1, -1, -1) if reverse != backward else range(time)


def _where(running: Optional[Tensor], value: Tensor, other) -> Tensor:
    return value if running is None else torch.where(running, value, other)


def _previous_states(t: int, running: Optional[Tensor], reverse: bool, per_step: Tensor, initial: Tensor) -> Tensor:
    """The state step t started from: the previous step's for the rows that ran then, else the initial one."""
    previous = t + 1 if reverse else t - 1
    if not 0 <= previous < per_step.shape[0]:
        return initial
    return _where(None if running is None else running[previous], per_step[previous], initial)


def _lstm_layer_loop(gates_fn, input_proj, h0, c0, w_hh, w_hr, batch_sizes, reverse):
    T, B = input_proj.shape[:2]
    running = _running(batch_sizes, B, input_proj)
    h, c = h0, c0
    outputs, gates, cells = [None] * T, [None] * T, [None] * T
    for t in _order(T, reverse):
        runs = None if running is None else running[t]
        hy, cy, step_gates = gates_fn(input_proj[t], h @ w_hh.t(), c)
        out = hy if w_hr is None else hy @ w_hr.t()
        h, c = _where(runs, out, h), _where(runs, cy, c)
        outputs[t], gates[t], cells[t] = _where(runs, out, 0), _where(runs, step_gates, 0), _where(runs, cy, 0)
    return torch.stack(outputs), h, c, torch.stack(gates), torch.stack(cells)


def _lstm_layer_backward_loop(gates_backward_fn, grad_output, grad_h_n, grad_c_n, gates, cells, output, h0, c0,
                              w_hh, w_hr, batch_sizes, reverse, grad_gates=None, grad_cells=None):
    """The layer's backward through time. ``grad_gates`` and ``grad_cells`` are gradients reaching the saved
    gates and cell states directly (only when the backward is itself differentiated)."""
    T, B = gates.shape[:2]
    H = c0.shape[1]
    running = _running(batch_sizes, B, gates)
    grad_proj = [None] * T
    grad_h, grad_c = grad_h_n, grad_c_n
    grad_w_hh = torch.zeros_like(w_hh)
    grad_w_hr = torch.zeros_like(w_hr) if w_hr is not None else gates.new_empty(0)
    for t in _order(T, reverse, backward=True):
        runs = None if running is None else running[t]
        grad_step = grad_output[t] + grad_h
        if w_hr is not None:
            grad_w_hr = grad_w_hr + _where(runs, grad_step, 0).t() @ (gates[t, :, 3 * H:] * cells[t].tanh())
            grad_step = grad_step @ w_hr
        grad_cell = grad_c if grad_cells is None else grad_c + grad_cells[t]
        extra = () if grad_gates is None else (grad_gates[t],)
        c_prev = _previous_states(t, running, reverse, cells, c0)
        grad_pre, grad_c_prev = gates_backward_fn(grad_step, grad_cell, gates[t], c_prev, cells[t], *extra)
        grad_proj[t] = grad_pre = _where(runs, grad_pre, 0)
        grad_w_hh = grad_w_hh + grad_pre.t() @ _previous_states(t, running, reverse, output, h0)
        grad_h, grad_c = _where(runs, grad_pre @ w_hh, grad_h), _where(runs, grad_c_prev, grad_c)
    return torch.stack(grad_proj), grad_h, grad_c, grad_w_hh, grad_w_hr


def _gru_layer_loop(gates_fn, input_proj, h0, w_hh, b_hh, batch_sizes, reverse):
    T, B = input_proj.shape[:2]
    running = _running(batch_sizes, B, input_proj)
    h = h0
    outputs, saved = [None] * T, [None] * T
    for t in _order(T, reverse):
        runs = None if running is None else running[t]
        hy, step_saved = gates_fn(input_proj[t], F.linear(h, w_hh, b_hh), h)
        h = _where(runs, hy, h)
        outputs[t], saved[t] = _where(runs, hy, 0), _where(runs, step_saved, 0)
    return torch.stack(outputs), h, torch.stack(saved)


def _gru_layer_backward_loop(gates_backward_fn, grad_output, grad_h_n, saved, output, h0, w_hh, has_bias,
                             batch_sizes, reverse, grad_saved=None):
    """The layer's backward through time; ``grad_saved`` as ``grad_gates`` for LSTM."""
    T, B = saved.shape[:2]
    running = _running(batch_sizes, B, saved)
    grad_proj = [None] * T
    grad_h = grad_h_n
    grad_w_hh = torch.zeros_like(w_hh)
    grad_b_hh = saved.new_zeros(w_hh.shape[0]) if has_bias else saved.new_empty(0)
    for t in _order(T, reverse, backward=True):
        runs = None if running is None else running[t]
        h_prev = _previous_states(t, running, reverse, output, h0)
        extra = () if grad_saved is None else (grad_saved[t],)
        grad_input, grad_hidden, grad_direct = gates_backward_fn(grad_output[t] + grad_h, saved[t], h_prev, *extra)
        grad_proj[t], grad_hidden = _where(runs, grad_input, 0), _where(runs, grad_hidden, 0)
        grad_w_hh = grad_w_hh + grad_hidden.t() @ h_prev
        if has_bias:
            grad_b_hh = grad_b_hh + grad_hidden.sum(0)
        grad_h = _where(runs, grad_direct + grad_hidden @ w_hh, grad_h)
    return torch.stack(grad_proj), grad_h, grad_w_hh, grad_b_hh


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
    # The gates are an output only so that backward can have them: a gradient reaches them only when a
    # backward is differentiated (they are then saved outputs in its graph), and materializing it would
    # zero-fill them on every step.
    ctx.set_materialize_grads(False)


def _zeros_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _lstm_gates_backward(ctx, grad_hy, grad_cy, grad_gates):
    gates, cx, cy = ctx.saved_tensors
    grad_hy, grad_cy = _zeros_if_none(grad_hy, cy), _zeros_if_none(grad_cy, cy)
    if grad_gates is not None or differentiable_backward_required():
        # Differentiable, in the saved outputs too (fastdl/_autograd.py).
        grad_pre, grad_cx = _lstm_gates_backward_reference(grad_hy, grad_cy, gates, cx, cy, grad_gates)
    else:
        grad_pre, grad_cx = _lstm_gates_backward_op(grad_hy, grad_cy, gates, cx, cy)
    return grad_pre, grad_pre, grad_cx


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
    ctx.set_materialize_grads(False)  # as for LSTM's gates


def _gru_gates_backward(ctx, grad_hy, grad_saved):
    saved, hx = ctx.saved_tensors
    grad_hy = _zeros_if_none(grad_hy, hx)
    if grad_saved is not None or differentiable_backward_required():
        return _gru_gates_backward_reference(grad_hy, saved, hx, grad_saved)
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
    # Gates and cells are outputs only so that backward can have them; a gradient reaches them only when a
    # backward is differentiated, and materializing it would zero-fill two [T, B, ·] tensors per call.
    ctx.set_materialize_grads(False)


def _lstm_layer_backward(ctx, grad_output, grad_h_n, grad_c_n, grad_gates, grad_cells):
    gates, cells, output, h0, c0, w_hh, w_hr, batch_sizes = ctx.saved_tensors
    grads = (_zeros_if_none(grad_output, output), _zeros_if_none(grad_h_n, h0), _zeros_if_none(grad_c_n, c0))
    saved = (gates, cells, output, h0, c0, w_hh, w_hr, batch_sizes, ctx.reverse)
    if grad_gates is not None or grad_cells is not None or differentiable_backward_required():
        # The reference loop is differentiable, in the saved outputs too (fastdl/_autograd.py).
        grad_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr = _lstm_layer_backward_loop(
            _lstm_gates_backward_reference, *grads, *saved, grad_gates, grad_cells)
    else:
        grad_proj, grad_h0, grad_c0, grad_w_hh, grad_w_hr = _lstm_layer_backward_op(*grads, *saved)
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
    ctx.set_materialize_grads(False)  # as for LSTM: a gradient reaches the saved activations only when differentiated


def _gru_layer_backward(ctx, grad_output, grad_h_n, grad_saved):
    saved, output, h0, w_hh, batch_sizes = ctx.saved_tensors
    arguments = (_zeros_if_none(grad_output, output), _zeros_if_none(grad_h_n, h0), saved, output, h0, w_hh,
                 ctx.has_bias, batch_sizes, ctx.reverse)
    if grad_saved is not None or differentiable_backward_required():  # as for LSTM
        grad_proj, grad_h0, grad_w_hh, grad_b_hh = _gru_layer_backward_loop(_gru_gates_backward_reference,
                                                                            *arguments, grad_saved)
    else:
        grad_proj, grad_h0, grad_w_hh, grad_b_hh = _gru_layer_backward_op(*arguments)
    return grad_proj, grad_h0, grad_w_hh, grad_b_hh if ctx.has_bias else None, None, None


_gru_layer_op.register_autograd(_gru_layer_backward, setup_context=_gru_layer_setup)


# ------------------------------------------------------------------------------------------ functionals
def _batched_step_operands(name: str, input: Tensor, states: tuple[Tensor, ...],
                           labels: tuple[str, ...]) -> tuple[bool, Tensor, tuple[Tensor, ...]]:
    """(batched, input, states) with unbatched operands given their batch dim of 1, after the rank checks
    torch's cell modules make (nn.LSTMCell / nn.GRUCell: ``name`` and the states' ``labels`` in its words)."""
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for label, state in zip(labels, states):
        if state.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected {label} to be 1D or 2D, got {state.dim()}D instead")
    if input.dim() == 2:
        return True, input, states
    return False, input.unsqueeze(0), tuple(state.unsqueeze(0) for state in states)


def _check_cell(input: Tensor, states: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor, gates: int) -> None:
    """ATen's checks of an RNN cell step, in its words (torch.lstm_cell / torch.gru_cell), on batched operands."""
    hidden = w_hh.shape[1]
    if w_ih.shape[0] != gates * hidden or w_hh.shape[0] != gates * hidden:
        raise RuntimeError(f"w_ih and w_hh must have {gates}·hidden_size = {gates * hidden} rows, got "
                           f"{w_ih.shape[0]} and {w_hh.shape[0]}")
    if input.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}")
    for index, state in enumerate(states):
        if input.shape[0] != state.shape[0]:
            raise RuntimeError(f"Input batch size {input.shape[0]} doesn't match hidden{index} batch size "
                               f"{state.shape[0]}")
        if state.shape[1] != hidden:
            raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got {state.shape[1]}, expected {hidden}")


def _lstm_step(name: str, input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
               b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    batched, input, (h, c) = _batched_step_operands(name, input, (hx[0], hx[1]), ("hx[0]", "hx[1]"))
    _check_cell(input, (h, c), w_ih, w_hh, 4)
    gates = _lstm_gates_reference if composite_required() else _lstm_gates_op  # fastdl/_autograd.py
    hy, cy, _ = gates(F.linear(input, w_ih, b_ih), F.linear(h, w_hh, b_hh), c)
    return (hy, cy) if batched else (hy.squeeze(0), cy.squeeze(0))


def _gru_step(name: str, input: Tensor, hx: Tensor, label: str, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
              b_hh: Optional[Tensor]) -> Tensor:
    batched, input, (h,) = _batched_step_operands(name, input, (hx,), (label,))
    _check_cell(input, (h,), w_ih, w_hh, 3)
    gates = _gru_gates_reference if composite_required() else _gru_gates_op
    hy, _ = gates(F.linear(input, w_ih, b_ih), F.linear(h, w_hh, b_hh), h)
    return hy if batched else hy.squeeze(0)


def lstm_cell(input: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
              b_hh: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    r"""One LSTM step, the same numbers as ``nn.LSTMCell`` / ``torch.lstm_cell``.

    With :math:`a = x W_{ih}^\top + b_{ih} + h W_{hh}^\top + b_{hh}` split into i, f, g, o:
    :math:`c' = \sigma(a_f) \odot c + \sigma(a_i) \odot \tanh(a_g)`, :math:`h' = \sigma(a_o) \odot \tanh(c')`.
    ``input`` is (B, I) or (I,), ``hx = (h, c)`` each (B, H) or (H,). Returns ``(h', c')``. Differentiable
    to any order, in every autograd mode (fastdl/_autograd.py).
    """
    return _lstm_step("lstm_cell", input, hx, w_ih, w_hh, b_ih, b_hh)


def gru_cell(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None) -> Tensor:
    r"""One GRU step, the same numbers as ``nn.GRUCell`` / ``torch.gru_cell``.

    With :math:`g_i = x W_{ih}^\top + b_{ih}`, :math:`g_h = h W_{hh}^\top + b_{hh}` split into r, z, n:
    :math:`r = \sigma(g_{i,r} + g_{h,r})`, :math:`z = \sigma(g_{i,z} + g_{h,z})`,
    :math:`n = \tanh(g_{i,n} + r \odot g_{h,n})`, :math:`h' = (1 - z) \odot n + z \odot h`.
    ``input`` is (B, I) or (I,), ``hx`` (B, H) or (H,). Returns ``h'``. Differentiable to any order, in
    every autograd mode (fastdl/_autograd.py).
    """
    return _gru_step("gru_cell", input, hx, "hx", w_ih, w_hh, b_ih, b_hh)


class LSTMCell(nn.LSTMCell):
    """Drop-in ``nn.LSTMCell`` (same constructor, parameters, state and errors) on fastdl's fused gate kernels."""

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
        if hx is None:
            zeros = input.new_zeros(input.shape[:-1] + (self.hidden_size,))
            hx = (zeros, zeros)
        return _lstm_step("LSTMCell", input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable_twin(self, nn.LSTMCell)  # torch.jit.script (fastdl/_scripting.py)


class GRUCell(nn.GRUCell):
    """Drop-in ``nn.GRUCell`` (same constructor, parameters, state and errors) on fastdl's fused gate kernels."""

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if hx is None:
            hx = input.new_zeros(input.shape[:-1] + (self.hidden_size,))
        return _gru_step("GRUCell", input, hx, "hidden", self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable_twin(self, nn.GRUCell)  # torch.jit.script (fastdl/_scripting.py)


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
    # Under torch.func transforms and forward-mode AD, each layer runs as the reference loop (fastdl/_autograd.py).
    composite = composite_required()
    lstm_layer = _python_layer(_lstm_layer_loop, _lstm_gates_reference) if composite else _lstm_layer_op
    gru_layer = _python_layer(_gru_layer_loop, _gru_gates_reference) if composite else _gru_layer_op
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
                output, h_n, c_n, _, _ = lstm_layer(projection, h0[index], c0[index], p["weight_hh"], p["weight_hr"],
                                                    batch_sizes, reverse)
                c_finals.append(c_n)
            else:
                # b_hn sits inside r ⊙ (W_hn h + b_hn), so b_hh stays with the recurrent GEMM.
                projection = linear(layer_input, p["weight_ih"], p["bias_ih"])
                output, h_n, _ = gru_layer(projection, h0[index], p["weight_hh"], p["bias_hh"], batch_sizes, reverse)
            outputs.append(output)
            h_finals.append(h_n)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, 2)
        if module.training and module.dropout > 0 and layer + 1 < module.num_layers:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    return layer_input, torch.stack(h_finals), torch.stack(c_finals) if is_lstm else None


_SCALAR_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16"}


def _check_state_dtypes(states, data: Tensor) -> None:
    """States of another dtype than the input raise torch's GRU words (its recurrent GEMM raises them; its
    fp32 CPU LSTM raises a oneDNN-internal message instead)."""
    for state in states:
        if state.dtype != data.dtype:
            raise RuntimeError(f"mat1 and mat2 must have the same dtype, but got {_SCALAR_NAMES[state.dtype]} and "
                               f"{_SCALAR_NAMES[data.dtype]}")


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
        # torch's checks in its words (nn.LSTM / nn.GRU), the LSTM state read as hx[0], hx[1] as there.
        rank, kind = (3, "batched 3-D") if batched else (2, "unbatched 2-D")
        if is_lstm and (hx[0].dim() != rank or hx[1].dim() != rank):
            raise RuntimeError(f"For {kind} input, hx and cx should also be {rank}-D but got ({hx[0].dim()}-D, "
                               f"{hx[1].dim()}-D) tensors")
        if not is_lstm and hx.dim() != rank:
            raise RuntimeError(f"For {kind} input, hx should also be {rank}-D but got {hx.dim()}-D tensor")
        if not batched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if is_lstm else hx.unsqueeze(1)
        hx = module.permute_hidden(hx, sorted_indices)
    module.check_forward_args(data, hx, batch_sizes)
    _check_state_dtypes(hx if is_lstm else (hx,), data)
    if packed:
        padded, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
    else:
        padded = data.transpose(0, 1) if module.batch_first else data
        if padded.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
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
            if hx is not None:
                _check_state_dtypes(hx, input.data if isinstance(input, PackedSequence) else input)
            return super().forward(input, hx)
        return _forward(self, input, hx)

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable_twin(self, nn.LSTM)  # torch.jit.script (fastdl/_scripting.py)


class GRU(nn.GRU):
    """Drop-in ``nn.GRU``: every constructor argument (``num_layers``, ``bias``, ``batch_first``,
    ``dropout``, ``bidirectional``), the same parameters and state_dict, PackedSequence, unbatched input and
    optional ``h_0`` — on fastdl's sequence kernels (module docstring)."""

    def forward(self, input, hx=None):
        return _forward(self, input, hx)

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable_twin(self, nn.GRU)  # torch.jit.script (fastdl/_scripting.py)
