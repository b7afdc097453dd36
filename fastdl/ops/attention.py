"""Attention: ``scaled_dot_product_attention`` and ``MultiheadAttention``, drop-in twins of
``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

For one batch index and query head h (key/value head h // (Hq / Hk) under grouped-query attention), with
scores s_ij = scale · q_i · k_j + mask_ij (−∞ where a boolean mask is False or causality forbids j > i,
the top-left alignment torch uses when Nq ≠ Nk):

    lse_i = log Σ_j exp(s_ij)          p_ij = exp(s_ij − lse_i)          o_i = Σ_j p_ij · z_ij · v_j

with z_ij = keep_ij / (1 − dropout_p) (z = 1 without dropout). A row whose every score is −∞ gives o_i = 0
and zero gradients, as torch does. Backward, with g = ∂L/∂o and δ_i = g_i · o_i:

    ∂L/∂v_j = Σ_i p_ij z_ij g_i        ds_ij = p_ij (z_ij g_i · v_j − δ_i)        (= ∂L/∂mask_ij)
    ∂L/∂q_i = scale Σ_j ds_ij k_j      ∂L/∂k_j = scale Σ_i ds_ij q_i

Every kernel is flash attention: tiles of queries against tiles of keys with an online softmax (exp2, with
log2 e folded into the scale), the Nq×Nk matrix never stored, lse_i saved for backward, the tiles
recomputed there, and tiles that causality masks entirely skipped.

δ_i must come from the unrounded output: formed from o_i rounded to fp16/bf16, its error is relative to
|g_i|·|o_i| while ds_ij is a difference against it, so when the values share a large common offset the
rounding error can exceed the gradient itself. So for fp16/bf16 inputs the ops keep the output in fp32
(every kernel writes its fp32 accumulator there), the functional and the module round it for the caller,
and backward forms δ from the fp32 output. The output is laid out as the query is among (batch, head,
row), as torch's.

Beyond first-order eager autograd (fastdl/_autograd.py) the reference math is the composite: under
``torch.func`` transforms and forward-mode AD the functional and the module run it, and a backward that
must be differentiable recomputes it and differentiates it (the saved lse carries no graph).

Dropout draws keep_ij from a counter-based hash of (seed, global row, column) — ``_dropout_bits`` below is
its definition, which the C++, CUDA and Triton kernels reproduce bit for bit — so backward recomputes the
forward's mask instead of storing it, and every backend drops the same elements for the same seed. The
seed is drawn from torch's default generator, so ``torch.manual_seed`` makes dropout reproducible; it
reaches the ops as a 0-d int64 tensor (read inside the op, not with ``.item()`` outside it), so
``torch.compile`` traces dropout without a graph break.

Layers: kernels in ``csrc/cpu/attention.cpp``, ``csrc/cuda/attention.cu`` and ``triton_kernels/attention.py``;
here the ``torch.library`` ops ``fastdl::attention_forward`` and ``fastdl::attention_backward`` on canonical
4-D tensors (fake kernels and autograd included), their packed self-attention twins
``fastdl::attention_packed_forward``/``_backward`` (q, k, v and their gradient as views of one projection),
the broadcasting that brings any input torch accepts to the canonical form, backend selection, the functional
and the module.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention._utils import _validate_sdpa_input
from torch.nn.attention.bias import CausalBias, CausalVariant

from .._autograd import composite_required, differentiable_backward_required
from .._backends import standard_kernels
from .._linear import linear
from .._scripting import scriptable_twin

__all__ = ["MultiheadAttention", "scaled_dot_product_attention"]

_MASK32 = 0xFFFFFFFF


def _head_dim_limit(query: Tensor, key: Tensor, value: Tensor, *args) -> str | None:
    # The GPU kernels stage whole head dims in shared memory/registers; the CPU kernel takes any.
    if query.device.type == "cuda" and (query.shape[-1] > 256 or value.shape[-1] > 256):
        return f"head dims {query.shape[-1]}/{value.shape[-1]}: the GPU kernels take at most 256"
    return None


# ----------------------------------------------------------------------------------------------------
# Dropout: the counter-based hash shared by every backend.


def _mix32(x: Tensor) -> Tensor:
    """A bijective avalanche mix of 32-bit values held in int64 (products wrap; the mask keeps 32 bits)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _dropout_bits(seed: int | Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """32 random bits for every (global row, column): row = (batch·Hq + head)·Nq + query index."""
    seed_lo, seed_hi = seed & _MASK32, (seed >> 32) & _MASK32
    row_key = _mix32(_mix32((rows & _MASK32) ^ seed_lo) ^ (rows >> 32) ^ seed_hi)
    return _mix32(row_key ^ columns)


def dropout_threshold(dropout_p: float) -> int:
    """Element (i, j) is kept when its 32 bits are ≥ this: a fraction 1 − p of all bit patterns."""
    return min(int(round(dropout_p * 2.0**32)), 2**32)


def _draw_seed() -> Tensor:
    """A dropout seed from torch's default generator, as a 0-d int64 CPU tensor."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _seed_value(seed: Tensor | None) -> int:
    return 0 if seed is None else int(seed.item())


def dropout_scale(dropout_p: float) -> float:
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def dropout_multiplier(seed: int | Tensor, dropout_p: float, batch: int, heads: int, nq: int, nk: int, device,
                       dtype: torch.dtype) -> Tensor:
    """z_ij = keep_ij / (1 − p), shape (batch, heads, nq, nk): the mask every backend applies."""
    rows = torch.arange(batch * heads * nq, device=device, dtype=torch.int64).view(batch, heads, nq, 1)
    columns = torch.arange(nk, device=device, dtype=torch.int64)
    keep = _dropout_bits(seed, rows, columns) >= dropout_threshold(dropout_p)
    return keep.to(dtype) * dropout_scale(dropout_p)


# ----------------------------------------------------------------------------------------------------
# Reference kernels: plain PyTorch, the spec and the fallback. They materialize the score matrix.


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _output_like(query: Tensor, value: Tensor) -> Tensor:
    """The output every backend writes: (B, Hq, Nq, Dv) in the accumulation dtype — fp32 for fp16/bf16
    inputs, so that backward's δ_i = g_i · o_i reads the unrounded output (the functional and the module
    round it for the caller) — laid out as the query is among (batch, head, row), as torch does: a
    contiguous query gives a contiguous output, and MultiheadAttention's query, a view of its (B, N, H·D)
    or (N, B, H·D) projection, gives an output it reads as (B, N, E) or (N, B, E) for free."""
    batch, heads, nq, _ = query.shape
    stride_batch, stride_head, stride_row = query.stride()[:3]
    shape, dtype = (batch, heads, nq, value.shape[-1]), _accumulation_dtype(query.dtype)
    if stride_row > stride_head and stride_row > stride_batch:  # rows outermost: (N, B, H, D)
        return query.new_empty(nq, batch, heads, shape[3], dtype=dtype).permute(1, 2, 0, 3)
    if stride_row > stride_head:  # (B, N, H, D)
        return query.new_empty(batch, nq, heads, shape[3], dtype=dtype).transpose(1, 2)
    return query.new_empty(shape, dtype=dtype)


def _lse_like(query: Tensor) -> Tensor:
    return query.new_empty(query.shape[:3], dtype=_accumulation_dtype(query.dtype))


def _reference_scores(query, key, mask, is_causal, scale):
    compute = _accumulation_dtype(query.dtype)
    group = query.shape[1] // key.shape[1]
    key = key.to(compute).repeat_interleave(group, dim=1)
    scores = torch.matmul(query.to(compute), key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.to(compute)
    if is_causal:
        nq, nk = scores.shape[-2:]
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores


def _reference_probabilities(scores: Tensor, lse: Tensor) -> Tensor:
    # lse = +inf marks a fully masked row: exp(−inf − inf) = 0 there.
    return torch.exp(scores - lse.unsqueeze(-1))


def _reference_attention(query, key, value, mask, dropout_p, is_causal, scale, seed) -> tuple[Tensor, Tensor]:
    """(output, lse) in the accumulation dtype, in differentiable PyTorch ops: the reference kernel's math,
    and the composite of fastdl/_autograd.py. lse = +∞ marks a fully masked row (its output is 0)."""
    scores = _reference_scores(query, key, mask, is_causal, scale)
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(lse == float("-inf"), float("inf"), lse)
    probabilities = _reference_probabilities(scores, lse)
    if dropout_p > 0:
        probabilities = probabilities * dropout_multiplier(seed, dropout_p, *scores.shape, scores.device, scores.dtype)
    group = query.shape[1] // key.shape[1]
    return torch.matmul(probabilities, value.to(scores.dtype).repeat_interleave(group, dim=1)), lse


def _reference_forward(query, key, value, mask, dropout_p, is_causal, scale, seed, out):
    output, lse = _reference_attention(query, key, value, mask, dropout_p, is_causal, scale, seed)
    out.copy_(output)
    return lse


def _reference_backward(grad_out, query, key, value, mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    scores = _reference_scores(query, key, mask, is_causal, scale)
    compute = scores.dtype
    probabilities = _reference_probabilities(scores, lse.to(compute))
    group = query.shape[1] // key.shape[1]
    batch, heads_kv = key.shape[:2]
    key_r = key.to(compute).repeat_interleave(group, dim=1)
    value_r = value.to(compute).repeat_interleave(group, dim=1)
    grad = grad_out.to(compute)
    dropped = probabilities
    grad_p = torch.matmul(grad, value_r.transpose(-1, -2))
    if dropout_p > 0:
        multiplier = dropout_multiplier(seed, dropout_p, *scores.shape, scores.device, compute)
        dropped = probabilities * multiplier
        grad_p = grad_p * multiplier
    delta = (grad * out.to(compute)).sum(-1, keepdim=True)
    grad_s = probabilities * (grad_p - delta)
    grad_q = torch.matmul(grad_s, key_r) * scale
    grad_k = torch.matmul(grad_s.transpose(-1, -2), query.to(compute)) * scale
    grad_v = torch.matmul(dropped.transpose(-1, -2), grad)
    grad_k = grad_k.view(batch, heads_kv, group, *grad_k.shape[2:]).sum(2)
    grad_v = grad_v.view(batch, heads_kv, group, *grad_v.shape[2:]).sum(2)
    grad_mask = grad_s.to(query.dtype) if mask_grad else query.new_empty(0)
    return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), grad_mask


# ----------------------------------------------------------------------------------------------------
# Native (C++ / CUDA C++) and Triton kernels.


def _native_forward(query, key, value, mask, dropout_p, is_causal, scale, seed, out):
    return torch.ops.fastdl.attention_forward_kernel(query, key, value, mask, dropout_p, is_causal, scale, seed, out)


def _native_backward(grad_out, query, key, value, mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    return torch.ops.fastdl.attention_backward_kernel(
        grad_out, query, key, value, mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad
    )


def _triton_forward(*args):
    from ..triton_kernels.attention import attention_forward

    return attention_forward(*args)


def _triton_backward(*args):
    from ..triton_kernels.attention import attention_backward

    return attention_backward(*args)


_FORWARD = standard_kernels("fastdl.scaled_dot_product_attention", _native_forward, _triton_forward,
                            _reference_forward, limits=_head_dim_limit)
_BACKWARD = standard_kernels("fastdl.scaled_dot_product_attention (backward)", _native_backward, _triton_backward,
                             _reference_backward, limits=_head_dim_limit)


def _attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    out = _output_like(query, value)
    if out.numel() == 0:
        return out, _lse_like(query).fill_(float("inf"))
    # Without a head dim every score is the mask alone (a softmax of it, not nothing): the reference,
    # since the kernels tile the head dim.
    run = _FORWARD.select(query.device, query.dtype, query, key, value).run if query.shape[-1] else _reference_forward
    return out, run(query, key, value, attn_mask, dropout_p, is_causal, scale, _seed_value(seed), out)


@torch.library.custom_op("fastdl::attention_forward", mutates_args=())
def _forward_op(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                is_causal: bool, scale: float, seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Canonical attention: query (B, Hq, Nq, D), key (B, Hk, Nk, D), value (B, Hk, Nk, Dv) with Hq a
    multiple of Hk, attn_mask None or an additive (B, Hq, Nq, Nk) mask (broadcast views welcome).
    ``seed`` is the dropout seed, a 0-d int64 tensor (None without dropout).
    Returns the output (see _output_like: fp32 for fp16/bf16 inputs, laid out like the query) and the
    natural-log lse (B, Hq, Nq) in fp32 (fp64 for fp64 inputs)."""
    return _attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)


@_forward_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, seed):
    return _output_like(query, value), _lse_like(query)


@torch.library.custom_op("fastdl::attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                 out: Tensor, lse: Tensor, dropout_p: float, is_causal: bool, scale: float, seed: Optional[Tensor],
                 mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of query, key, value and (when ``mask_grad``, else an empty tensor) of the mask."""
    if grad_out.numel() == 0 or key.shape[2] == 0:
        grad_mask = query.new_zeros(query.shape[:3] + key.shape[2:3]) if mask_grad else query.new_empty(0)
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value), grad_mask
    run = _BACKWARD.select(query.device, query.dtype, query, key, value).run if query.shape[-1] else _reference_backward
    return run(grad_out, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, _seed_value(seed),
                      mask_grad)


@_backward_op.register_fake
def _(grad_out, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    grad_mask = query.new_empty(query.shape[:3] + key.shape[2:3]) if mask_grad else query.new_empty(0)
    return (torch.empty_like(query, memory_format=torch.contiguous_format),
            torch.empty_like(key, memory_format=torch.contiguous_format),
            torch.empty_like(value, memory_format=torch.contiguous_format), grad_mask)


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # an output for backward's use, not part of the functional's result
    # Backward recomputes the scores tile by tile from q, k, v (and the mask); lse turns them into
    # probabilities without a second softmax pass, and out gives δ_i = g_i · o_i in one row reduction.
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, seed)  # seed: backward redraws the same mask
    ctx.hyperparameters = (dropout_p, is_causal, scale)
    ctx.mask_grad = attn_mask is not None and ctx.needs_input_grad[3]


def _composite_gradients(grad_out: Tensor, forward, inputs: tuple, needs_grad: tuple) -> tuple:
    """The gradients of ``forward(*inputs)`` (the composite attention) for the inputs flagged in
    ``needs_grad``, for a backward that must itself be differentiable (fastdl/_autograd.py): the forward is
    recomputed in differentiable PyTorch ops and differentiated, with its graph kept when autograd records
    this backward (create_graph). The saved lse cannot serve: it carries no graph."""
    wanted = [t for t, need in zip(inputs, needs_grad) if need]
    record = torch.is_grad_enabled()
    with torch.enable_grad():
        out = forward(*inputs)
    grads = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=record))
    return tuple(next(grads) if need else None for need in needs_grad)


def _backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
    query, key, value, attn_mask, out, lse, seed = ctx.saved_tensors
    dropout_p, is_causal, scale = ctx.hyperparameters
    if differentiable_backward_required():
        forward = lambda *inputs: _reference_attention(*inputs, dropout_p, is_causal, scale, _seed_value(seed))[0]  # noqa: E731
        grads = _composite_gradients(grad_out, forward, (query, key, value, attn_mask), ctx.needs_input_grad[:4])
        return *grads, None, None, None, None
    # The output was kept unrounded (fp32 for fp16/bf16), so its gradient arrives in fp32: the kernels take
    # it in the inputs' dtype (it was that dtype's gradient of the rounded output, so this is exact).
    grad_q, grad_k, grad_v, grad_mask = _backward_op(
        grad_out.to(query.dtype), query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, seed,
        ctx.mask_grad
    )
    return grad_q, grad_k, grad_v, grad_mask if ctx.mask_grad else None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# Self-attention with q, k and v read out of one packed projection. Through the op above, autograd would
# rebuild the packed gradient from three separate ones (unbind's backward: one stacking copy of 3·B·N·E
# elements); this op's backward writes ∂L/∂q, ∂L/∂k and ∂L/∂v straight into one tensor laid out as the
# projection is, which the in-projection's backward then reads as is.


@torch.library.custom_op("fastdl::attention_packed_forward", mutates_args=())
def _packed_forward_op(qkv: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
                       seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """fastdl::attention_forward of (query, key, value) = qkv.unbind(1), qkv (B, 3, H, N, D) of any strides
    (typically a view of a (B, N, 3·H·D) projection)."""
    return _attention_forward(*qkv.unbind(1), attn_mask, dropout_p, is_causal, scale, seed)


@_packed_forward_op.register_fake
def _(qkv, attn_mask, dropout_p, is_causal, scale, seed):
    return _output_like(qkv[:, 0], qkv[:, 2]), _lse_like(qkv[:, 0])


@torch.library.custom_op("fastdl::attention_packed_backward", mutates_args=())
def _packed_backward_op(grad_out: Tensor, qkv: Tensor, attn_mask: Optional[Tensor], out: Tensor, lse: Tensor,
                        dropout_p: float, is_causal: bool, scale: float, seed: Optional[Tensor],
                        mask_grad: bool) -> tuple[Tensor, Tensor]:
    """The gradient of qkv, laid out as qkv is (``empty_like``), and that of the mask (as in
    fastdl::attention_backward)."""
    grad_qkv = torch.empty_like(qkv)
    query, key, value = qkv.unbind(1)
    kernel = _BACKWARD.select(query.device, query.dtype, query, key, value)
    arguments = (grad_out, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale, _seed_value(seed),
                 mask_grad)
    if kernel.backend == "native" and qkv.device.type == "cpu" and query.numel() > 0 and value.shape[-1] > 0:
        return grad_qkv, torch.ops.fastdl.attention_backward_into_kernel(*arguments, *grad_qkv.unbind(1))
    # The other kernels return separate gradients: copied into place (what unbind's backward would do).
    *grads, grad_mask = _backward_op(grad_out, query, key, value, attn_mask, out, lse, dropout_p, is_causal, scale,
                                     seed, mask_grad)
    for target, grad in zip(grad_qkv.unbind(1), grads):
        target.copy_(grad)
    return grad_qkv, grad_mask


@_packed_backward_op.register_fake
def _(grad_out, qkv, attn_mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    grad_mask = qkv.new_empty(qkv.shape[:1] + qkv.shape[2:4] + qkv.shape[3:4]) if mask_grad else qkv.new_empty(0)
    return torch.empty_like(qkv), grad_mask


def _packed_setup_context(ctx, inputs, output) -> None:
    qkv, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, attn_mask, out, lse, seed)  # as for fastdl::attention_forward
    ctx.hyperparameters = (dropout_p, is_causal, scale)
    ctx.mask_grad = attn_mask is not None and ctx.needs_input_grad[1]


def _packed_backward(ctx, grad_out: Tensor, _grad_lse: Tensor):
    qkv, attn_mask, out, lse, seed = ctx.saved_tensors
    if differentiable_backward_required():
        dropout_p, is_causal, scale = ctx.hyperparameters
        forward = lambda qkv, mask: _reference_attention(  # noqa: E731
            *qkv.unbind(1), mask, dropout_p, is_causal, scale, _seed_value(seed))[0]
        return *_composite_gradients(grad_out, forward, (qkv, attn_mask), ctx.needs_input_grad[:2]), None, None, None, None
    grad_qkv, grad_mask = _packed_backward_op(grad_out.to(qkv.dtype), qkv, attn_mask, out, lse, *ctx.hyperparameters,
                                              seed, ctx.mask_grad)
    return grad_qkv, grad_mask if ctx.mask_grad else None, None, None, None, None


_packed_forward_op.register_autograd(_packed_backward, setup_context=_packed_setup_context)


# ----------------------------------------------------------------------------------------------------
# The functional: torch's argument checks and broadcasting, down to the canonical 4-D op.


def _check(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) -> None:
    # The exception types and wording follow F.scaled_dot_product_attention's for the same mistakes.
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor, got {type(tensor).__name__}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(
            "scaled_dot_product_attention: expected query, key and value of at least 2 dimensions, got "
            f"query.dim() {query.dim()}, key.dim() {key.dim()}, value.dim() {value.dim()}"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(
            "scaled_dot_product_attention: expected query, key and value of the same dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not query.is_floating_point():
        raise RuntimeError(f"scaled_dot_product_attention: expected floating-point query, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError(
            "scaled_dot_product_attention: expected query, key and value on the same device, got "
            f"{query.device}, {key.device}, {value.device}"
        )
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(
            f"scaled_dot_product_attention: query and key head dims differ ({query.shape[-1]} vs {key.shape[-1]})"
        )
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(
            f"scaled_dot_product_attention: key and value sequence lengths differ ({key.shape[-2]} vs {value.shape[-2]})"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"scaled_dot_product_attention: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise RuntimeError(
                f"scaled_dot_product_attention: expected attn_mask of dtype bool or {query.dtype} (the query's), "
                f"got {attn_mask.dtype}"
            )
        if is_causal:
            raise RuntimeError("scaled_dot_product_attention: attn_mask must be None when is_causal=True")
    if dropout_p > 1.0:  # a negative p is no dropout, as in torch
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if not enable_gqa or query.numel() == 0:  # torch answers an empty query before looking at its heads
        return
    if min(query.dim(), key.dim(), value.dim()) < 3:
        rank = min(query.dim(), key.dim(), value.dim())
        raise IndexError(f"Dimension out of range (expected to be in range of [-{rank}, {rank - 1}], but got -3)")
    if key.shape[-3] != value.shape[-3] or query.shape[-3] % key.shape[-3] != 0:
        raise RuntimeError(
            "scaled_dot_product_attention: with enable_gqa, key and value must have the same number of heads "
            f"(dim -3) and it must divide the query's; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )


def _canonical(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, enable_gqa: bool):
    """Brings inputs of any rank ≥ 2 to (B, Hq, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv) and an additive
    (B, Hq, Nq, Nk) mask (expanded, so broadcast dims cost nothing). Returns them and the output shape."""
    rank = max(query.dim(), key.dim(), value.dim(), 3)
    query, key, value = (t.reshape((1,) * (rank - t.dim()) + t.shape) for t in (query, key, value))
    try:
        batch = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
        if enable_gqa:
            heads_q, heads_kv = query.shape[-3], key.shape[-3]
        else:
            heads_q = torch.broadcast_shapes(query.shape[-3:-2], key.shape[-3:-2], value.shape[-3:-2])[0]
            # A single key/value head shared by every query head is grouped-query attention with one
            # group: no copy. Any other broadcast of heads is materialized.
            heads_kv = 1 if key.shape[-3] == value.shape[-3] == 1 else heads_q
    except RuntimeError as error:
        raise RuntimeError(f"scaled_dot_product_attention: batch dimensions do not broadcast: {error}") from None
    nq, nk = query.shape[-2], key.shape[-2]
    flat = math.prod(batch)
    query = query.expand(*batch, heads_q, nq, query.shape[-1]).reshape(flat, heads_q, nq, query.shape[-1])
    key = key.expand(*batch, heads_kv, nk, key.shape[-1]).reshape(flat, heads_kv, nk, key.shape[-1])
    value = value.expand(*batch, heads_kv, nk, value.shape[-1]).reshape(flat, heads_kv, nk, value.shape[-1])
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                ~attn_mask.to(query.device), float("-inf"))
        try:
            attn_mask = attn_mask.expand(*batch, heads_q, nq, nk)
        except RuntimeError:
            raise RuntimeError(
                f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                f"to the scores' shape {(*batch, heads_q, nq, nk)}"
            ) from None
        attn_mask = attn_mask.reshape(flat, heads_q, nq, nk)
    return query, key, value, attn_mask, (*batch, heads_q, nq, value.shape[-1])


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> Tensor:
    r"""Scaled dot-product attention, the same numbers as ``F.scaled_dot_product_attention``.

    .. math::
        \mathrm{out} = \mathrm{dropout}\Big(\mathrm{softmax}\big(\mathrm{scale}\cdot QK^\top + M\big)\Big)\, V

    ``scale`` defaults to 1/√D. ``attn_mask`` is boolean (True = attend) or additive in the query's dtype,
    broadcast against (…, Hq, Nq, Nk), or a ``torch.nn.attention.bias.CausalBias`` (upper-left or
    lower-right causal); ``is_causal`` masks key j > query i (top-left aligned when Nq ≠ Nk, as torch does)
    and excludes ``attn_mask``. ``enable_gqa`` lets Hk divide Hq. Rows with every
    key masked give 0. Dropout uses fastdl's counter-based mask (seeded from torch's generator), so it
    matches torch in distribution, not element by element. Differentiable in query, key, value and a
    float ``attn_mask`` to any order, in every autograd mode (``torch.func`` transforms and forward-mode
    AD run the composite; see ``fastdl/_autograd.py``). The output is laid out as the query is (a
    contiguous query gives a contiguous output), as torch's. fp16/bf16 results are rounded from fp32, and
    backward reads the unrounded output.
    """
    if isinstance(attn_mask, CausalBias):
        attn_mask, is_causal = _causal_bias_mask(attn_mask, query, key, value, dropout_p, is_causal, scale)
    _check(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    rank = max(query.dim(), key.dim(), value.dim())
    q4, k4, v4, mask4, shape = _canonical(query, key, value, attn_mask, enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] > 0 else 1.0
    seed = _draw_seed() if dropout_p > 0 else None
    if composite_required():
        out, _ = _reference_attention(q4, k4, v4, mask4, float(dropout_p), bool(is_causal), float(scale),
                                      _seed_value(seed))
    else:
        out, _ = _forward_op(q4, k4, v4, mask4, float(dropout_p), bool(is_causal), float(scale), seed)
    # Rank-2 inputs were given a head dim of 1 by _canonical; drop it again.
    return out.to(query.dtype).reshape(shape[3 - rank:] if rank < 3 else shape)


def _causal_bias_mask(bias: CausalBias, query, key, value, dropout_p, is_causal, scale) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for a ``torch.nn.attention.bias.CausalBias`` mask, as torch reads it: the
    upper-left variant (or equal lengths) is the kernels' causal mode; lower-right with Nq ≠ Nk, whose
    diagonal is shifted by Nk − Nq, is its boolean mask (after torch's own checks of that path, whose
    exception types differ from the functional's)."""
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")
    if bias.seq_len_q == bias.seq_len_kv or bias.variant == CausalVariant.UPPER_LEFT:
        return None, True
    if bias.variant == CausalVariant.LOWER_RIGHT:
        _validate_sdpa_input(query, key, value, None, dropout_p, is_causal, scale)
        return bias._materialize(query.device), False
    raise ValueError(f"CausalBias.variant must be a CausalVariant type, but found: {bias.variant}")


# ----------------------------------------------------------------------------------------------------
# The module.


def _dropped_weights(weights: Tensor, dropout_p: float, batch: int, heads: int) -> Tensor:
    """The attention weights after fastdl's dropout (the same elements the kernels drop for a seed)."""
    multiplier = dropout_multiplier(_draw_seed(), dropout_p, batch, heads, *weights.shape[-2:], weights.device, weights.dtype)
    return weights * multiplier.view(weights.shape)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention``: same constructor, parameters, state_dict and forward signature.

    The attention itself runs on fastdl's flash kernels, which read q, k and v as strided views of the
    projections in whatever layout they come (batch-first or sequence-first; for self-attention one packed
    projection, whose gradient the backward kernel writes in place), and write their output so that a
    batch-first result is a free view. On CPU in fp32 the projections are oneDNN GEMMs. With
    ``need_weights=True`` the weights must exist as an N×N tensor anyway, so that path computes them
    explicitly as torch does (with fastdl's dropout mask) and returns them.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        same_kv = key is value
        self_attention = same_kv and query is key
        # Batch-major inputs stay (B, L, E): no transposing copies in, and the output comes back as a view.
        batch_major = self.batch_first and is_batched
        seq_dim, batch_dim = (1, 0) if batch_major else (0, 1)
        if not is_batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        target_len, batch, embed = query.shape[seq_dim], query.shape[batch_dim], query.shape[2]
        source_len = key.shape[seq_dim]
        heads, head_dim = self.num_heads, self.head_dim
        # torch's checks, in torch's order and words (F.multi_head_attention_forward), on shapes stated
        # sequence-first as torch states them.
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        causal_kernel = is_causal and key_padding_mask is None and not need_weights
        if causal_kernel:
            attn_mask = None  # the kernel's causal mode replaces the given causal mask, skipping its tiles
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
        if embed != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed}")
        key_shape, value_shape = (torch.Size((t.shape[1], t.shape[0], t.shape[2])) if batch_major else t.shape
                                  for t in (key, value))
        if not self._qkv_same_embed_dim and key_shape[:2] != value_shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key_shape[:2]} do not match value's {value_shape[:2]}")
        if self._qkv_same_embed_dim and key_shape != value_shape:
            raise AssertionError(f"key shape {key_shape} does not match value shape {value_shape}")
        if not self._qkv_same_embed_dim:
            for name, weight, input in (("query", self.q_proj_weight, query), ("key", self.k_proj_weight, key),
                                        ("value", self.v_proj_weight, value)):
                if weight.shape != (embed, input.shape[-1]):
                    raise AssertionError(f"expecting {name} weights shape of {(embed, input.shape[-1])}, but got "
                                         f"{weight.shape}")
        if attn_mask is not None:
            expected = (target_len, source_len) if attn_mask.dim() == 2 else (batch * heads, target_len, source_len)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should be "
                                   f"{expected}.")
            attn_mask = attn_mask.view(1, 1, *expected) if attn_mask.dim() == 2 else attn_mask.view(batch, heads, *expected[1:])

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if (self_attention and self._qkv_same_embed_dim and self.bias_k is None and not self.add_zero_attn
                and not need_weights):
            out = self._packed_self_attention(query, attn_mask, key_padding_mask, dropout_p, causal_kernel,
                                              batch_major)
        else:
            q, k, v = self._project(query, key, value, self_attention, same_kv)  # (…, H, Dh) in the input's layout
            extra_keys = []
            extra_shape = (batch, 1, heads, head_dim) if batch_major else (1, batch, heads, head_dim)
            if self.bias_k is not None:
                extra_keys.append((self.bias_k.view(1, 1, heads, head_dim).expand(extra_shape),
                                   self.bias_v.view(1, 1, heads, head_dim).expand(extra_shape)))
            if self.add_zero_attn:
                zeros = k.new_zeros(extra_shape)
                extra_keys.append((zeros, zeros))
            for extra_k, extra_v in extra_keys:
                k, v = torch.cat([k, extra_k], dim=seq_dim), torch.cat([v, extra_v], dim=seq_dim)
                attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
                key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
            source_len = k.shape[seq_dim]
            if key_padding_mask is not None:
                F._check_key_padding_mask(key_padding_mask, source_len, batch)
                padding = key_padding_mask.view(batch, 1, 1, source_len)
                attn_mask = padding if attn_mask is None else attn_mask + padding
            # → (B, H, L, Dh): strided views, which the kernels read in place.
            order = (0, 2, 1, 3) if batch_major else (1, 2, 0, 3)
            q, k, v = (t.permute(order) for t in (q, k, v))
            if need_weights:
                scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
                if attn_mask is not None:
                    scores = scores + attn_mask
                weights = torch.softmax(scores, dim=-1)
                if dropout_p > 0:
                    weights = _dropped_weights(weights, dropout_p, batch, heads)
                out = torch.matmul(weights, v)
                weights = weights.mean(dim=1) if average_attn_weights else weights
                if not is_batched:
                    weights = weights.squeeze(0)
            else:
                out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, causal_kernel)
        # (B, H, L, Dh) → the input's layout. The kernels lay their output out as the query is, a view of
        # the (…, H·Dh) projection, so both cases are views. fp16/bf16 are rounded from fp32 here.
        out = out.to(query.dtype)
        if batch_major:
            out = out.transpose(1, 2).reshape(batch, target_len, embed)
        else:
            out = out.permute(2, 0, 1, 3).reshape(target_len, batch, embed)
        out = linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if is_batched else out.squeeze(1)), weights

    def __prepare_scriptable__(self) -> nn.Module:
        return scriptable_twin(self, nn.MultiheadAttention)  # torch.jit.script (fastdl/_scripting.py)

    def _packed_self_attention(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                               dropout_p: float, is_causal: bool, batch_major: bool) -> Tensor:
        """Self-attention from one in-projection GEMM: q, k and v stay views of its (…, 3·E) output, which
        fastdl::attention_packed_forward reads in place and whose gradient its backward writes in that
        same layout. Returns (B, H, L, Dh), laid out as the projection (and fp32 for fp16/bf16 inputs)."""
        heads, head_dim = self.num_heads, self.head_dim
        projection = linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, heads, head_dim))
        qkv = projection.permute((0, 2, 3, 1, 4) if batch_major else (1, 2, 3, 0, 4))  # (B, 3, H, L, Dh)
        batch, length = qkv.shape[0], qkv.shape[3]
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, length, batch)
            padding = key_padding_mask.view(batch, 1, 1, length)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        if attn_mask is not None:
            attn_mask = attn_mask.expand(batch, heads, length, length)
        seed = _draw_seed() if dropout_p > 0 else None
        if composite_required():
            out, _ = _reference_attention(*qkv.unbind(1), attn_mask, float(dropout_p), bool(is_causal),
                                          1.0 / math.sqrt(head_dim), _seed_value(seed))
        else:
            out, _ = _packed_forward_op(qkv, attn_mask, float(dropout_p), bool(is_causal), 1.0 / math.sqrt(head_dim),
                                        seed)
        return out

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, same_kv: bool):
        """The q, k, v projections as (…, H, Dh) views (packed weights: one matmul where inputs coincide)."""
        heads, head_dim, embed = self.num_heads, self.head_dim, self.embed_dim
        split = lambda t: t.unflatten(-1, (heads, head_dim))  # noqa: E731
        if self._qkv_same_embed_dim:
            weight, bias = self.in_proj_weight, self.in_proj_bias
            if self_attention:
                return linear(query, weight, bias).unflatten(-1, (3, heads, head_dim)).unbind(-3)
            weight_q, weight_kv = weight.split([embed, 2 * embed])
            bias_q, bias_kv = bias.split([embed, 2 * embed]) if bias is not None else (None, None)
            q = split(linear(query, weight_q, bias_q))
            if same_kv:
                return (q, *linear(key, weight_kv, bias_kv).unflatten(-1, (2, heads, head_dim)).unbind(-3))
            weight_k, weight_v = weight_kv.chunk(2)
            bias_k, bias_v = bias_kv.chunk(2) if bias_kv is not None else (None, None)
            return q, split(linear(key, weight_k, bias_k)), split(linear(value, weight_v, bias_v))
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return (split(linear(query, self.q_proj_weight, biases[0])),
                split(linear(key, self.k_proj_weight, biases[1])),
                split(linear(value, self.v_proj_weight, biases[2])))
