"""LSTM and GRU cells in Triton: the gate nonlinearities and state update of one step, forward and backward,
each one kernel (math in ``fastdl/ops/rnn.py``).

One program owns BLOCK hidden units of one batch row and reads the matching slice of every gate, so each
gate pre-activation is read once and each result written once; all arithmetic is in fp32 whatever the
storage dtype. The GEMMs around the cell (x·W_ihᵀ, h·W_hhᵀ) stay with torch (cuBLAS), which is what they
are best at; the sequence backend drives these kernels once per step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 128


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # 2σ(2x) − 1: tl has no tanh of its own on every backend (the interpreter included).
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def _load(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _lstm_forward_kernel(input_gates_ptr, hidden_gates_ptr, cx_ptr, hy_ptr, cy_ptr, gates_ptr, hidden,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    units = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = units < hidden
    gate_row = row * 4 * hidden + units
    state = row * hidden + units
    i = _sigmoid(_load(input_gates_ptr, gate_row, mask) + _load(hidden_gates_ptr, gate_row, mask))
    f = _sigmoid(_load(input_gates_ptr, gate_row + hidden, mask) + _load(hidden_gates_ptr, gate_row + hidden, mask))
    g = _tanh(_load(input_gates_ptr, gate_row + 2 * hidden, mask) + _load(hidden_gates_ptr, gate_row + 2 * hidden, mask))
    o = _sigmoid(_load(input_gates_ptr, gate_row + 3 * hidden, mask) + _load(hidden_gates_ptr, gate_row + 3 * hidden, mask))
    c = f * _load(cx_ptr, state, mask) + i * g
    out_type = gates_ptr.dtype.element_ty
    tl.store(gates_ptr + gate_row, i.to(out_type), mask=mask)
    tl.store(gates_ptr + gate_row + hidden, f.to(out_type), mask=mask)
    tl.store(gates_ptr + gate_row + 2 * hidden, g.to(out_type), mask=mask)
    tl.store(gates_ptr + gate_row + 3 * hidden, o.to(out_type), mask=mask)
    tl.store(cy_ptr + state, c.to(out_type), mask=mask)
    tl.store(hy_ptr + state, (o * _tanh(c)).to(out_type), mask=mask)


@triton.jit
def _lstm_backward_kernel(grad_hy_ptr, grad_cy_ptr, gates_ptr, cx_ptr, cy_ptr, grad_gates_ptr, grad_cx_ptr, hidden,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    units = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = units < hidden
    gate_row = row * 4 * hidden + units
    state = row * hidden + units
    i = _load(gates_ptr, gate_row, mask)
    f = _load(gates_ptr, gate_row + hidden, mask)
    g = _load(gates_ptr, gate_row + 2 * hidden, mask)
    o = _load(gates_ptr, gate_row + 3 * hidden, mask)
    dh = _load(grad_hy_ptr, state, mask)
    tanh_c = _tanh(_load(cy_ptr, state, mask))
    dc = _load(grad_cy_ptr, state, mask) + dh * o * (1.0 - tanh_c * tanh_c)
    out_type = grad_gates_ptr.dtype.element_ty
    tl.store(grad_gates_ptr + gate_row, (dc * g * i * (1.0 - i)).to(out_type), mask=mask)
    tl.store(grad_gates_ptr + gate_row + hidden, (dc * _load(cx_ptr, state, mask) * f * (1.0 - f)).to(out_type), mask=mask)
    tl.store(grad_gates_ptr + gate_row + 2 * hidden, (dc * i * (1.0 - g * g)).to(out_type), mask=mask)
    tl.store(grad_gates_ptr + gate_row + 3 * hidden, (dh * tanh_c * o * (1.0 - o)).to(out_type), mask=mask)
    tl.store(grad_cx_ptr + state, (dc * f).to(out_type), mask=mask)


@triton.jit
def _gru_forward_kernel(input_gates_ptr, hidden_gates_ptr, hx_ptr, hy_ptr, saved_ptr, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    units = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = units < hidden
    gate_row = row * 3 * hidden + units
    saved_row = row * 4 * hidden + units
    state = row * hidden + units
    r = _sigmoid(_load(input_gates_ptr, gate_row, mask) + _load(hidden_gates_ptr, gate_row, mask))
    z = _sigmoid(_load(input_gates_ptr, gate_row + hidden, mask) + _load(hidden_gates_ptr, gate_row + hidden, mask))
    gh_n = _load(hidden_gates_ptr, gate_row + 2 * hidden, mask)
    n = _tanh(_load(input_gates_ptr, gate_row + 2 * hidden, mask) + r * gh_n)
    h = _load(hx_ptr, state, mask)
    out_type = saved_ptr.dtype.element_ty
    tl.store(saved_ptr + saved_row, r.to(out_type), mask=mask)
    tl.store(saved_ptr + saved_row + hidden, z.to(out_type), mask=mask)
    tl.store(saved_ptr + saved_row + 2 * hidden, n.to(out_type), mask=mask)
    tl.store(saved_ptr + saved_row + 3 * hidden, gh_n.to(out_type), mask=mask)
    tl.store(hy_ptr + state, (n + z * (h - n)).to(out_type), mask=mask)


@triton.jit
def _gru_backward_kernel(grad_hy_ptr, saved_ptr, hx_ptr, grad_input_gates_ptr, grad_hidden_gates_ptr, grad_hx_ptr,
                         hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    units = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = units < hidden
    gate_row = row * 3 * hidden + units
    saved_row = row * 4 * hidden + units
    state = row * hidden + units
    r = _load(saved_ptr, saved_row, mask)
    z = _load(saved_ptr, saved_row + hidden, mask)
    n = _load(saved_ptr, saved_row + 2 * hidden, mask)
    gh_n = _load(saved_ptr, saved_row + 3 * hidden, mask)
    dh = _load(grad_hy_ptr, state, mask)
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (_load(hx_ptr, state, mask) - n) * z * (1.0 - z)
    dr = dn * gh_n * r * (1.0 - r)
    out_type = grad_input_gates_ptr.dtype.element_ty
    tl.store(grad_input_gates_ptr + gate_row, dr.to(out_type), mask=mask)
    tl.store(grad_input_gates_ptr + gate_row + hidden, dz.to(out_type), mask=mask)
    tl.store(grad_input_gates_ptr + gate_row + 2 * hidden, dn.to(out_type), mask=mask)
    tl.store(grad_hidden_gates_ptr + gate_row, dr.to(out_type), mask=mask)
    tl.store(grad_hidden_gates_ptr + gate_row + hidden, dz.to(out_type), mask=mask)
    tl.store(grad_hidden_gates_ptr + gate_row + 2 * hidden, (dn * r).to(out_type), mask=mask)
    tl.store(grad_hx_ptr + state, (dh * z).to(out_type), mask=mask)


def _grid(batch: int, hidden: int) -> tuple[int, int]:
    return batch, triton.cdiv(hidden, _BLOCK)


def lstm_gates_forward(input_gates: torch.Tensor, hidden_gates: torch.Tensor, cx: torch.Tensor):
    input_gates, hidden_gates, cx = input_gates.contiguous(), hidden_gates.contiguous(), cx.contiguous()
    hy, cy, gates = torch.empty_like(cx), torch.empty_like(cx), torch.empty_like(input_gates)
    if cx.numel():
        _lstm_forward_kernel[_grid(*cx.shape)](input_gates, hidden_gates, cx, hy, cy, gates, cx.shape[1], BLOCK=_BLOCK)
    return hy, cy, gates


def lstm_gates_backward(grad_hy, grad_cy, gates, cx, cy):
    grad_hy, grad_cy, gates, cx, cy = (t.contiguous() for t in (grad_hy, grad_cy, gates, cx, cy))
    grad_gates, grad_cx = torch.empty_like(gates), torch.empty_like(cx)
    if cx.numel():
        _lstm_backward_kernel[_grid(*cx.shape)](grad_hy, grad_cy, gates, cx, cy, grad_gates, grad_cx, cx.shape[1],
                                                BLOCK=_BLOCK)
    return grad_gates, grad_cx


def gru_gates_forward(input_gates: torch.Tensor, hidden_gates: torch.Tensor, hx: torch.Tensor):
    input_gates, hidden_gates, hx = input_gates.contiguous(), hidden_gates.contiguous(), hx.contiguous()
    hy, saved = torch.empty_like(hx), hx.new_empty(hx.shape[0], 4 * hx.shape[1])
    if hx.numel():
        _gru_forward_kernel[_grid(*hx.shape)](input_gates, hidden_gates, hx, hy, saved, hx.shape[1], BLOCK=_BLOCK)
    return hy, saved


def gru_gates_backward(grad_hy, saved, hx):
    grad_hy, saved, hx = grad_hy.contiguous(), saved.contiguous(), hx.contiguous()
    grad_input_gates = hx.new_empty(hx.shape[0], 3 * hx.shape[1])
    grad_hidden_gates, grad_hx = torch.empty_like(grad_input_gates), torch.empty_like(hx)
    if hx.numel():
        _gru_backward_kernel[_grid(*hx.shape)](grad_hy, saved, hx, grad_input_gates, grad_hidden_gates, grad_hx,
                                               hx.shape[1], BLOCK=_BLOCK)
    return grad_input_gates, grad_hidden_gates, grad_hx
