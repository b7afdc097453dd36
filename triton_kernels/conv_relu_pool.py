"""Bias + ReLU + max-pool after a convolution, in Triton (math in ``fastdl/ops/conv_relu_pool.py``).

What is here: the fused EPILOGUE, run after a torch convolution (cuDNN on GPU) of the bias-free conv
output z, plus its backward; not an implicit-GEMM convolution with the epilogue inside it. So z is
written once at full resolution by the convolution and read once here; the full-resolution ReLU output
is never written, and the only thing kept for backward is the int8 window offset of each max.

Forward: one program owns a tile of BLOCK_P pooled positions (flattened over image, row, column) ×
BLOCK_C channels, and walks the pooling window (unrolled: its size is a compile-time constant) keeping a
running max and its offset; then y = max(0, max + bias), offset = −1 where y ≤ 0. For channels-last z,
the channel axis of the tile is the contiguous one, so every load is coalesced.

Backward: a gather instead of a scatter, so there are no atomics and the result is deterministic. Each
program owns a tile of full-resolution positions × channels; position h receives, for every window row i
with (h + pad − i·dil) divisible by the stride, the gradient of pooled row oh = (h + pad − i·dil)/stride
when that window's argmax is this offset (likewise for columns). Windows overlap at most
⌈kernel·dil / stride⌉ times per axis, and the unrolled loop visits each candidate once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl



def _blocks(channels: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C). The interpreter (CPU tensors, tests) runs each program's block as numpy arrays:
    there, few large programs are much faster than many small ones."""
    block_c = min(64, triton.next_power_of_2(channels))
    return (256 if device.type == "cpu" else 32), block_c


@triton.jit
def _bias_relu_pool_kernel(z_ptr, bias_ptr, y_ptr, a_ptr, channels, height, width, out_height, out_width,
                           positions, z_sn, z_sc, z_sh, z_sw, y_sn, y_sc, y_sh, y_sw,
                           STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
                           DIL_H: tl.constexpr, DIL_W: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < positions
    c_ok = c < channels
    ow = p % out_width
    oh = (p // out_width) % out_height
    n = (p // (out_width * out_height)).to(tl.int64)
    z_base = n[:, None] * z_sn + c[None, :].to(tl.int64) * z_sc
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    offset = tl.zeros([BLOCK_P, BLOCK_C], tl.int32)
    for i in tl.static_range(KERNEL_H):
        h = oh * STRIDE_H - PAD_H + i * DIL_H
        for j in tl.static_range(KERNEL_W):
            w = ow * STRIDE_W - PAD_W + j * DIL_W
            inside = p_ok & (h >= 0) & (h < height) & (w >= 0) & (w < width)
            mask = inside[:, None] & c_ok[None, :]
            v = tl.load(z_ptr + z_base + (h.to(tl.int64) * z_sh + w.to(tl.int64) * z_sw)[:, None], mask=mask,
                        other=float("-inf")).to(tl.float32)
            take = (v > best) | (v != v)  # a NaN wins, as in max_pool2d
            best = tl.where(take, v, best)
            offset = tl.where(take, i * KERNEL_W + j, offset)
    if HAS_BIAS:
        best += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    clipped = best <= 0  # false for NaN, which passes through ReLU
    out = (n * y_sn + oh.to(tl.int64) * y_sh + ow.to(tl.int64) * y_sw)[:, None] + c[None, :].to(tl.int64) * y_sc
    mask = p_ok[:, None] & c_ok[None, :]
    tl.store(y_ptr + out, tl.where(clipped, 0.0, best).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + out, tl.where(clipped, -1, offset).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpool_grad_kernel(g_ptr, a_ptr, dz_ptr, channels, height, width, out_height, out_width, positions,
                        g_sn, g_sc, g_sh, g_sw, z_sn, z_sc, z_sh, z_sw,
                        STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
                        DIL_H: tl.constexpr, DIL_W: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < positions
    c_ok = c < channels
    w = p % width
    h = (p // width) % height
    n = (p // (width * height)).to(tl.int64)
    g_base = n[:, None] * g_sn + c[None, :].to(tl.int64) * g_sc
    total = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for i in tl.static_range(KERNEL_H):
        row = h + PAD_H - i * DIL_H  # = oh · STRIDE_H when window row oh covers h at its row i
        oh = row // STRIDE_H
        row_ok = (row >= 0) & (row % STRIDE_H == 0) & (oh < out_height)
        for j in tl.static_range(KERNEL_W):
            col = w + PAD_W - j * DIL_W
            ow = col // STRIDE_W
            ok = p_ok & row_ok & (col >= 0) & (col % STRIDE_W == 0) & (ow < out_width)
            mask = ok[:, None] & c_ok[None, :]
            at = g_base + (oh.to(tl.int64) * g_sh + ow.to(tl.int64) * g_sw)[:, None]
            a = tl.load(a_ptr + at, mask=mask, other=-1).to(tl.int32)
            g = tl.load(g_ptr + at, mask=mask & (a == i * KERNEL_W + j), other=0.0).to(tl.float32)
            total += g
    out = (n * z_sn + h.to(tl.int64) * z_sh + w.to(tl.int64) * z_sw)[:, None] + c[None, :].to(tl.int64) * z_sc
    tl.store(dz_ptr + out, total.to(dz_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


def _format(z: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def bias_relu_pool(z: torch.Tensor, bias: torch.Tensor | None, kernel, stride, padding, dilation, ceil_mode: bool,
                   argmax_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, argmax) from the bias-free conv output z: y = maxpool(relu(z + bias)), argmax = window offset
    of the max or −1 where y ≤ 0. Outputs keep z's layout (channels-last or contiguous)."""
    from ..ops.conv_relu_pool import pooled_size

    z = z.contiguous(memory_format=_format(z))
    batch, channels, height, width = z.shape
    out_h = pooled_size(height, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    out_w = pooled_size(width, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    y = torch.empty((batch, channels, out_h, out_w), device=z.device, dtype=z.dtype, memory_format=_format(z))
    a = torch.empty_like(y, dtype=argmax_dtype)
    positions = batch * out_h * out_w
    if y.numel() == 0:
        return y, a
    block_p, block_c = _blocks(channels, z.device)
    grid = (triton.cdiv(positions, block_p), triton.cdiv(channels, block_c))
    _bias_relu_pool_kernel[grid](
        z, bias if bias is not None else z, y, a, channels, height, width, out_h, out_w, positions,
        *z.stride(), *y.stride(), STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], KERNEL_H=kernel[0], KERNEL_W=kernel[1], HAS_BIAS=bias is not None,
        BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return y, a


def unpool_grad(grad_output: torch.Tensor, argmax: torch.Tensor, conv_shape, kernel, stride, padding,
                dilation) -> torch.Tensor:
    """∂L/∂z of shape (N, C, *conv_shape): each window's gradient at its argmax, summed over windows."""
    format = _format(argmax)
    g = grad_output.contiguous(memory_format=format)
    a = argmax.contiguous(memory_format=format)
    batch, channels, out_h, out_w = a.shape
    dz = torch.empty((batch, channels, *conv_shape), device=g.device, dtype=g.dtype, memory_format=format)
    positions = batch * conv_shape[0] * conv_shape[1]
    if dz.numel() == 0:
        return dz
    block_p, block_c = _blocks(channels, g.device)
    grid = (triton.cdiv(positions, block_p), triton.cdiv(channels, block_c))
    _unpool_grad_kernel[grid](
        g, a, dz, channels, conv_shape[0], conv_shape[1], out_h, out_w, positions, *g.stride(), *dz.stride(),
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1], DIL_H=dilation[0],
        DIL_W=dilation[1], KERNEL_H=kernel[0], KERNEL_W=kernel[1], BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return dz
