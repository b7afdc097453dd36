"""Spectral normalization in Triton (math in ``fastdl/ops/spectral_norm.py``).

W is the row-major matrix view (``dim`` first, made contiguous when it is not already). A power
iteration is two launches, with the same fused math as the CPU kernels:

1. ``_row_block_pass``: program b owns BLOCK_R rows; it forms s = W_b v for them, then, while the
   rows are still hot in L2, its partial W_bᵀ s_b. One read of W per iteration for W v and Wᵀ(W v).
2. ``_normalize``: one program adds the partials in block order (deterministic, no atomics), sets
   u = s / max(‖s‖, ε), v = Wᵀu / max(‖Wᵀu‖, ε) and σ = ‖Wᵀu‖² / max(‖Wᵀu‖, ε), the value uᵀWv takes
   after the iteration, so σ needs no third matrix-vector product. In eval mode it forms σ = uᵀ(W v).

``_scale`` then writes W / σ over W's own storage. Backward (u, v constants): ``_dot_partials`` gives
per-block ⟨G, W⟩, and ``_gradient`` has every program add those partials in the same order and write
G / σ − (⟨G, W⟩ / σ²) u_h v_col. Everything accumulates in fp32 (fp64 for fp64 weights).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import in_format

_BLOCK_R = 16
_BLOCK_C = 128
_BLOCK = 1024


@triton.jit
def _row_block_pass(w_ptr, v_ptr, s_ptr, partial_ptr, rows, cols,
                    WITH_TRANSPOSE: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    block = tl.program_id(0)
    r = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = r < rows
    row_offsets = r.to(tl.int64) * cols
    s = tl.zeros([BLOCK_R], dtype=ACC)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        col_mask = c < cols
        w = tl.load(w_ptr + row_offsets[:, None] + c[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        v = tl.load(v_ptr + c, mask=col_mask, other=0.0)
        s += tl.sum(w.to(ACC) * v.to(ACC)[None, :], axis=1)
    tl.store(s_ptr + r, s, mask=row_mask)
    if WITH_TRANSPOSE:
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            col_mask = c < cols
            w = tl.load(w_ptr + row_offsets[:, None] + c[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            t = tl.sum(w.to(ACC) * s[:, None], axis=0)
            tl.store(partial_ptr + block.to(tl.int64) * cols + c, t, mask=col_mask)


@triton.jit
def _normalize(s_ptr, partial_ptr, u_ptr, v_ptr, sigma_ptr, rows, cols, blocks, eps,
               TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    acc_type = sigma_ptr.dtype.element_ty
    offsets = tl.arange(0, BLOCK)
    if TRAINING:
        squares = tl.zeros([BLOCK], dtype=acc_type)
        for r0 in range(0, rows, BLOCK):
            s = tl.load(s_ptr + r0 + offsets, mask=r0 + offsets < rows, other=0.0)
            squares += s * s
        s_denominator = tl.maximum(tl.sqrt(tl.sum(squares, axis=0)), eps)
        for r0 in range(0, rows, BLOCK):
            mask = r0 + offsets < rows
            s = tl.load(s_ptr + r0 + offsets, mask=mask, other=0.0)
            tl.store(u_ptr + r0 + offsets, (s / s_denominator).to(u_ptr.dtype.element_ty), mask=mask)
        # Wᵀu = Σ_b partial_b / max(‖s‖, ε), kept in fp32 in the partial buffer's first row, then v.
        squares = tl.zeros([BLOCK], dtype=acc_type)
        for c0 in range(0, cols, BLOCK):
            mask = c0 + offsets < cols
            t = tl.zeros([BLOCK], dtype=acc_type)
            for b in range(0, blocks):
                t += tl.load(partial_ptr + b * cols + c0 + offsets, mask=mask, other=0.0)
            t = t / s_denominator
            tl.store(partial_ptr + c0 + offsets, t, mask=mask)
            squares += t * t
        t_norm = tl.sqrt(tl.sum(squares, axis=0))
        t_denominator = tl.maximum(t_norm, eps)
        for c0 in range(0, cols, BLOCK):
            # Each lane reads back only what it stored itself above: no barrier needed.
            mask = c0 + offsets < cols
            t = tl.load(partial_ptr + c0 + offsets, mask=mask, other=0.0)
            tl.store(v_ptr + c0 + offsets, (t / t_denominator).to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(sigma_ptr, t_norm * t_norm / t_denominator)
    else:
        products = tl.zeros([BLOCK], dtype=acc_type)
        for r0 in range(0, rows, BLOCK):
            mask = r0 + offsets < rows
            s = tl.load(s_ptr + r0 + offsets, mask=mask, other=0.0)
            u = tl.load(u_ptr + r0 + offsets, mask=mask, other=0.0).to(acc_type)
            products += u * s
        tl.store(sigma_ptr, tl.sum(products, axis=0))


@triton.jit
def _scale(w_ptr, out_ptr, sigma_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    # σ rounded to the weight's dtype first, as torch's σ is a tensor of that dtype.
    sigma = tl.load(sigma_ptr).to(w_ptr.dtype.element_ty).to(ACC)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offsets, (w / sigma).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_partials(g_ptr, w_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    acc_type = partial_ptr.dtype.element_ty
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc_type)
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(acc_type)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(g * w, axis=0))


@triton.jit
def _gradient(g_ptr, u_ptr, v_ptr, partial_ptr, parts, sigma_ptr, out_ptr, rows, after, n,
              BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    acc_type = partial_ptr.dtype.element_ty
    # Every program adds the partials in the same order: the same ⟨G, W⟩ everywhere, run to run.
    lanes = tl.zeros([BLOCK_P], dtype=acc_type)
    for p0 in range(0, parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        lanes += tl.load(partial_ptr + p, mask=p < parts, other=0.0)
    sigma = tl.load(sigma_ptr).to(acc_type)
    coefficient = tl.sum(lanes, axis=0) / (sigma * sigma)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    # W as (A, H, B): element (a, h, b) has row h and column a·B + b of the matrix view.
    h = (offsets // after) % rows
    column = (offsets // (rows * after)) * after + offsets % after
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(acc_type)
    u = tl.load(u_ptr + h, mask=mask, other=0.0).to(acc_type)
    v = tl.load(v_ptr + column, mask=mask, other=0.0).to(acc_type)
    tl.store(out_ptr + offsets, (g / sigma - coefficient * u * v).to(out_ptr.dtype.element_ty), mask=mask)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_accumulation(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def spectral_norm_forward(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int, n_power_iterations: int,
                          eps: float, training: bool):
    matrix = weight.movedim(dim, 0).contiguous()
    rows = weight.shape[dim]
    cols = weight.numel() // rows if rows else 0
    acc = _accumulation_dtype(weight.dtype)
    u_out, v_out = u.contiguous().clone(), v.contiguous().clone()
    sigma = torch.empty((), device=weight.device, dtype=acc)
    blocks = max(1, triton.cdiv(rows, _BLOCK_R))
    s = torch.empty(rows, device=weight.device, dtype=acc)
    partial = torch.empty(blocks, max(cols, 1), device=weight.device, dtype=acc)
    for _ in range(n_power_iterations if training else 1):
        _row_block_pass[(blocks,)](matrix, v_out, s, partial, rows, cols,
                                   WITH_TRANSPOSE=training, ACC=_triton_accumulation(weight.dtype),
                                   BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C)
        _normalize[(1,)](s, partial, u_out, v_out, sigma, rows, cols, blocks, eps, TRAINING=training, BLOCK=_BLOCK)
    # W / σ elementwise over storage: channels_last weights stay channels_last, as with torch's W / σ.
    source = in_format(weight, weight)
    weight_sn = torch.empty_like(source)
    if weight.numel():
        _scale[(triton.cdiv(weight.numel(), _BLOCK),)](source, weight_sn, sigma, weight.numel(),
                                                       ACC=_triton_accumulation(weight.dtype), BLOCK=_BLOCK)
    return weight_sn, u_out, v_out, sigma


def spectral_norm_backward(grad_output: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                           sigma: torch.Tensor, dim: int) -> torch.Tensor:
    g, w = grad_output.contiguous(), weight.contiguous()
    n = w.numel()
    grad_weight = torch.empty_like(w)
    if n == 0:
        return grad_weight
    rows = weight.shape[dim]
    after = n // (rows * weight.shape[:dim].numel())
    parts = triton.cdiv(n, _BLOCK)
    partial = torch.empty(parts, device=w.device, dtype=_accumulation_dtype(w.dtype))
    _dot_partials[(parts,)](g, w, partial, n, BLOCK=_BLOCK)
    _gradient[(parts,)](g, u.contiguous(), v.contiguous(), partial, parts, sigma.to(partial.dtype), grad_weight,
                        rows, after, n, BLOCK=_BLOCK, BLOCK_P=256)
    return grad_weight
