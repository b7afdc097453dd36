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
def _offsets(base, c, stride_c):
    """Element offsets of channel c at the program's positions, in int64 (tensors may pass 2^31 elements).
    The channel is broadcast to a vector first: Triton's interpreter rejects masks mixing scalars and
    vectors, and the vector is also what makes the product 64-bit."""
    channel = tl.zeros_like(base) + c
    return channel, base + channel * stride_c


@triton.jit
def _channel(ptr, base, c, stride_c, channels, mask):
    """Channel c of the program's positions as fp32, zero outside 0 … channels−1."""
    channel, offsets = _offsets(base, c, stride_c)
    inside = mask & (channel >= 0) & (channel < channels)
    return tl.load(ptr + offsets, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _add(total, nans, infs, value, sign):
    """Adds sign·value to a window sum kept as (finite total in fp64, count of NaN, count of ±Inf)."""
    value = value.to(tl.float64)
    is_nan = value != value
    is_inf = (value == float("inf")) | (value == -float("inf"))
    total += tl.where(is_nan | is_inf, 0.0, value) * sign
    return total, nans + is_nan.to(tl.int32) * sign, infs + is_inf.to(tl.int32) * sign


@triton.jit
def _value(total, nans, infs):
    return tl.where(nans > 0, float("nan"), tl.where(infs > 0, float("inf"), total))


@triton.jit
def _slide(total, nans, infs, x_ptr, base, idx, stride_c, channels, mask, BEFORE: tl.constexpr, AFTER: tl.constexpr):
    """The window sum of x² for channel idx, from the one for idx − 1."""
    entering = _channel(x_ptr, base, idx + AFTER, stride_c, channels, mask).to(tl.float64)
    leaving = _channel(x_ptr, base, idx - BEFORE - 1, stride_c, channels, mask).to(tl.float64)
    total, nans, infs = _add(total, nans, infs, entering * entering, 1)
    return _add(total, nans, infs, leaving * leaving, -1)


@triton.jit
def _pow(base, exponent):
    # x⁰ = 1 for every x, inf and 0 included (where 0 · log2 x would be NaN), as torch's pow.
    return tl.where(exponent == 0.0, 1.0, tl.exp2(exponent * tl.log2(base)))


@triton.jit
def _scale(total, nans, infs, alpha_over_size, k):
    return (k + alpha_over_size * _value(total, nans, infs)).to(tl.float32)


@triton.jit
def _mirror_term(scale, x_ptr, g_ptr, base, j, stride_c, channels, mask, beta):
    """t_j = g_j · x_j · scale_j^(−β−1), zero outside the channels."""
    x = _channel(x_ptr, base, j, stride_c, channels, mask)
    g = _channel(g_ptr, base, j, stride_c, channels, mask)
    channel = tl.zeros_like(base) + j
    inside = (channel >= 0) & (channel < channels)
    return tl.where(inside, g * x * _pow(scale, -beta - 1.0), 0.0)


@triton.jit
def _program_positions(positions, tiles, stride_n, stride_s, BLOCK: tl.constexpr):
    """The program's BLOCK positions (tile of one image): their mask and int64 offsets of channel 0."""
    image = tl.program_id(0) // tiles
    offsets = (tl.program_id(0) % tiles) * BLOCK + tl.arange(0, BLOCK)
    return offsets < positions, image.to(tl.int64) * stride_n + offsets.to(tl.int64) * stride_s


@triton.jit
def _lrn_forward_kernel(x_ptr, y_ptr, channels, positions, tiles, stride_n, stride_c, stride_s,
                        alpha_over_size, beta, k,
                        BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK: tl.constexpr):
    mask, base = _program_positions(positions, tiles, stride_n, stride_s, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float64)
    nans = tl.zeros([BLOCK], dtype=tl.int32)
    infs = tl.zeros([BLOCK], dtype=tl.int32)
    # The walk starts AFTER channels early so that the window starts empty.
    for step in range(0, channels + AFTER):
        c = step - AFTER
        total, nans, infs = _slide(total, nans, infs, x_ptr, base, c, stride_c, channels, mask, BEFORE, AFTER)
        if c >= 0:
            x = _channel(x_ptr, base, c, stride_c, channels, mask)
            y = x * _pow(_scale(total, nans, infs, alpha_over_size, k), -beta)
            tl.store(y_ptr + _offsets(base, c, stride_c)[1], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lrn_backward_kernel(g_ptr, x_ptr, dx_ptr, channels, positions, tiles, stride_n, stride_c, stride_s,
                         alpha_over_size, beta, k,
                         BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK: tl.constexpr):
    mask, base = _program_positions(positions, tiles, stride_n, stride_s, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float64)
    none = tl.zeros([BLOCK], dtype=tl.int32)
    lead, lead_nans, lead_infs = zero, none, none
    trail, trail_nans, trail_infs = zero, none, none
    center, center_nans, center_infs = zero, none, none
    mirrored, mirrored_nans, mirrored_infs = zero, none, none
    coef = 2.0 * alpha_over_size * beta
    # The walk starts BEFORE + AFTER channels early so that every window starts empty.
    for step in range(0, channels + BEFORE + AFTER):
        c = step - (BEFORE + AFTER)
        j = c + BEFORE
        lead, lead_nans, lead_infs = _slide(lead, lead_nans, lead_infs, x_ptr, base, j, stride_c, channels, mask,
                                            BEFORE, AFTER)
        term = _mirror_term(_scale(lead, lead_nans, lead_infs, alpha_over_size, k), x_ptr, g_ptr, base, j, stride_c,
                            channels, mask, beta)
        mirrored, mirrored_nans, mirrored_infs = _add(mirrored, mirrored_nans, mirrored_infs, term, 1)
        i = c - AFTER - 1
        trail, trail_nans, trail_infs = _slide(trail, trail_nans, trail_infs, x_ptr, base, i, stride_c, channels,
                                               mask, BEFORE, AFTER)
        term = _mirror_term(_scale(trail, trail_nans, trail_infs, alpha_over_size, k), x_ptr, g_ptr, base, i,
                            stride_c, channels, mask, beta)
        mirrored, mirrored_nans, mirrored_infs = _add(mirrored, mirrored_nans, mirrored_infs, term, -1)
        center, center_nans, center_infs = _slide(center, center_nans, center_infs, x_ptr, base, c, stride_c,
                                                  channels, mask, BEFORE, AFTER)
        if c >= 0:
            x = _channel(x_ptr, base, c, stride_c, channels, mask)
            g = _channel(g_ptr, base, c, stride_c, channels, mask)
            scale = _scale(center, center_nans, center_infs, alpha_over_size, k)
            # β = 0: the window term is exactly 0, as torch's pow backward for a zero exponent (0 · NaN is not)
            mirror = tl.where(beta == 0.0, 0.0, coef * x * _value(mirrored, mirrored_nans, mirrored_infs).to(tl.float32))
            dx = g * _pow(scale, -beta) - mirror
            tl.store(dx_ptr + _offsets(base, c, stride_c)[1], dx.to(dx_ptr.dtype.element_ty), mask=mask)


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
