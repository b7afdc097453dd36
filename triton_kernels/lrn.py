"""Local response normalization in Triton (math in ``fastdl/ops/lrn.py``).

One program owns BLOCK spatial positions of one image and walks the channels in order, so each load
is contiguous across the program (for NC… layouts; channels-last inputs take the same path with
strided loads). Window sums slide: the channel entering is added, the one leaving subtracted, both
squared in fp32 and accumulated in fp64 so that every subtraction cancels its addition exactly — the
sum never drifts, whatever the magnitudes. (fp64 adds are cheap against the memory traffic here.)

Backward needs, at channel c, the mirrored sum T_c = Σ_{j = c−after … c+before} t_j with
t_j = g_j · x_j · scale_j^(−β−1). Registers cannot hold a queue of past t_j, so the walk keeps three
sliding scale windows: a lead one at j = c + before (its t_j enters T), a trail one at
i = c − after − 1 (its t_i leaves T: recomputed bit-identically, since both windows see the same
sequence of updates) and one at c itself (for g_c · scale_c^(−β)). The walk starts size−1 channels
early so that every window starts empty. Nothing is saved from forward: x is read again instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import channel_view, in_format

_BLOCK = 256


@triton.jit
def _channel(ptr, base, c, stride_c, channels, mask):
    """Channel c of the program's positions as fp32, zero outside 0 … channels−1."""
    # The channel test is made on a vector: Triton's interpreter rejects masks mixing scalar and vector.
    channel = tl.zeros_like(base) + c
    inside = mask & (channel >= 0) & (channel < channels)
    return tl.load(ptr + base + c * stride_c, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _slide(window, x_ptr, base, idx, stride_c, channels, mask, BEFORE: tl.constexpr, AFTER: tl.constexpr):
    """The window sum of x² for channel idx, from the one for idx − 1."""
    entering = _channel(x_ptr, base, idx + AFTER, stride_c, channels, mask)
    leaving = _channel(x_ptr, base, idx - BEFORE - 1, stride_c, channels, mask)
    return window + (entering * entering).to(tl.float64) - (leaving * leaving).to(tl.float64)


@triton.jit
def _pow(base, exponent):
    return tl.exp2(exponent * tl.log2(base))


@triton.jit
def _mirror_term(window, x_ptr, g_ptr, base, j, stride_c, channels, mask, alpha_over_size, beta, k):
    """t_j = g_j · x_j · scale_j^(−β−1), zero outside the channels."""
    scale = (k + alpha_over_size * window).to(tl.float32)
    x = _channel(x_ptr, base, j, stride_c, channels, mask)
    g = _channel(g_ptr, base, j, stride_c, channels, mask)
    channel = tl.zeros_like(base) + j
    inside = (channel >= 0) & (channel < channels)
    return tl.where(inside, g * x * _pow(scale, -beta - 1.0), 0.0).to(tl.float64)


@triton.jit
def _lrn_forward_kernel(x_ptr, y_ptr, channels, positions, tiles, stride_n, stride_c, stride_s,
                        alpha_over_size, beta, k,
                        BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK: tl.constexpr):
    image = tl.program_id(0) // tiles
    offsets = (tl.program_id(0) % tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < positions
    base = image.to(tl.int64) * stride_n + offsets.to(tl.int64) * stride_s
    window = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(0, AFTER):
        v = _channel(x_ptr, base, j, stride_c, channels, mask)
        window += (v * v).to(tl.float64)
    for c in range(0, channels):
        window = _slide(window, x_ptr, base, c, stride_c, channels, mask, BEFORE, AFTER)
        scale = (k + alpha_over_size * window).to(tl.float32)
        x = _channel(x_ptr, base, c, stride_c, channels, mask)
        y = x * _pow(scale, -beta)
        tl.store(y_ptr + base + c * stride_c, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrn_backward_kernel(g_ptr, x_ptr, dx_ptr, channels, positions, tiles, stride_n, stride_c, stride_s,
                         alpha_over_size, beta, k,
                         BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK: tl.constexpr):
    image = tl.program_id(0) // tiles
    offsets = (tl.program_id(0) % tiles) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < positions
    base = image.to(tl.int64) * stride_n + offsets.to(tl.int64) * stride_s
    lead = tl.zeros([BLOCK], dtype=tl.float64)
    trail = tl.zeros([BLOCK], dtype=tl.float64)
    center = tl.zeros([BLOCK], dtype=tl.float64)
    mirrored = tl.zeros([BLOCK], dtype=tl.float64)
    coef = 2.0 * alpha_over_size * beta
    for c in range(-(BEFORE + AFTER), channels):
        j = c + BEFORE
        lead = _slide(lead, x_ptr, base, j, stride_c, channels, mask, BEFORE, AFTER)
        mirrored += _mirror_term(lead, x_ptr, g_ptr, base, j, stride_c, channels, mask, alpha_over_size, beta, k)
        i = c - AFTER - 1
        trail = _slide(trail, x_ptr, base, i, stride_c, channels, mask, BEFORE, AFTER)
        mirrored -= _mirror_term(trail, x_ptr, g_ptr, base, i, stride_c, channels, mask, alpha_over_size, beta, k)
        center = _slide(center, x_ptr, base, c, stride_c, channels, mask, BEFORE, AFTER)
        if c >= 0:
            scale = (k + alpha_over_size * center).to(tl.float32)
            x = _channel(x_ptr, base, c, stride_c, channels, mask)
            g = _channel(g_ptr, base, c, stride_c, channels, mask)
            dx = g * _pow(scale, -beta) - coef * x * mirrored.to(tl.float32)
            tl.store(dx_ptr + base + c * stride_c, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def lrn_forward(input: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    x, strides, positions = channel_view(input)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    tiles = triton.cdiv(positions, _BLOCK)
    _lrn_forward_kernel[(x.shape[0] * tiles,)](
        x, y, x.shape[1], positions, tiles, *strides, alpha / size, beta, k,
        BEFORE=size // 2, AFTER=(size - 1) // 2, BLOCK=_BLOCK,
    )
    return y


def lrn_backward(grad_output: torch.Tensor, input: torch.Tensor, size: int, alpha: float, beta: float,
                 k: float) -> torch.Tensor:
    x, strides, positions = channel_view(input)
    g = in_format(grad_output, x)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    tiles = triton.cdiv(positions, _BLOCK)
    _lrn_backward_kernel[(x.shape[0] * tiles,)](
        g, x, dx, x.shape[1], positions, tiles, *strides, alpha / size, beta, k,
        BEFORE=size // 2, AFTER=(size - 1) // 2, BLOCK=_BLOCK,
    )
    return dx
