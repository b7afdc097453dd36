"""Conv2d + ReLU + max-pool in Triton (math in ``fastdl/ops/conv_relu_pool.py``).

Forward: an implicit-GEMM convolution whose epilogue applies the pooling window, the bias and the ReLU,
so the convolution output z never exists in memory, not even once. One program owns BLOCK_P pooled
positions (flattened over image, row, column) × BLOCK_C output channels of one group. For each position
(i, j) of the pooling window (unrolled: a compile-time constant) it computes the conv outputs under that
window position as a [BLOCK_P, K] × [K, BLOCK_C] product (K = C_in/groups · KH · KW, walked BLOCK_K at a
time; the input patch is gathered on the fly from x with the conv's stride, padding and dilation, zeros
outside), and folds it into a running max and its window offset. Then y = max(0, max + bias), offset = −1
where y ≤ 0, stored as int8/int16/int32. For non-overlapping pooling (2/2: VGG, LeNet) every conv output is
computed exactly once; for overlapping pooling (3/2: AlexNet, ZFNet) the outputs shared by neighbouring
windows are recomputed (≈ 9·27²/55² ≈ 2.2× the conv's flops for AlexNet conv1) in exchange for never
writing or re-reading z. Accumulation is fp32; fp32 inputs use IEEE products (not TF32) so that fp32
results match PyTorch's. Block sizes are fixed, not autotuned.

Backward: the pooling's part is a Triton kernel that rebuilds ∂L/∂z from the argmax; the convolution's
part is ATen's ``convolution_backward`` (cuDNN on GPU). The kernel gathers rather than scatters, so there
are no atomics and the result is deterministic: each program owns a tile of full-resolution positions ×
channels; position h receives, for every window row i with (h + pad − i·dil) divisible by the stride, the
gradient of pooled row oh = (h + pad − i·dil)/stride when that window's argmax is this offset (likewise for
columns). Windows overlap at most ⌈kernel·dil / stride⌉ times per axis, and the unrolled loop visits each
candidate once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _blocks(channels: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of the backward kernel. The interpreter (CPU tensors, tests) runs each program's
    block as numpy arrays: there, few large programs are much faster than many small ones."""
    block_c = min(64, triton.next_power_of_2(channels))
    return (256 if device.type == "cpu" else 32), block_c


@triton.jit
def _conv_relu_pool_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, a_ptr,
                           in_per_group, out_per_group, height, width, conv_height, conv_width,
                           out_height, out_width, positions,
                           x_sn, x_sc, x_sh, x_sw, w_so, w_si, w_sh, w_sw, y_sn, y_sc, y_sh, y_sw,
                           KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                           PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                           POOL_KH: tl.constexpr, POOL_KW: tl.constexpr, POOL_SH: tl.constexpr, POOL_SW: tl.constexpr,
                           POOL_PH: tl.constexpr, POOL_PW: tl.constexpr, POOL_DH: tl.constexpr, POOL_DW: tl.constexpr,
                           HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    group = tl.program_id(2)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c_in_group = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c = group * out_per_group + c_in_group
    p_ok = p < positions
    c_ok = c_in_group < out_per_group
    ow = p % out_width
    oh = (p // out_width) % out_height
    n = (p // (out_width * out_height)).to(tl.int64)
    reduction = in_per_group * KH * KW
    x_image = x_ptr + n * x_sn + (group * in_per_group).to(tl.int64) * x_sc
    w_rows = w_ptr + c.to(tl.int64) * w_so
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    offset = tl.zeros([BLOCK_P, BLOCK_C], tl.int32)
    for i in tl.static_range(POOL_KH):
        zh = oh * POOL_SH - POOL_PH + i * POOL_DH
        for j in tl.static_range(POOL_KW):
            zw = ow * POOL_SW - POOL_PW + j * POOL_DW
            z_ok = p_ok & (zh >= 0) & (zh < conv_height) & (zw >= 0) & (zw < conv_width)
            acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
            for k0 in range(0, reduction, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < reduction
                ci = k // (KH * KW)
                kh = (k // KW) % KH
                kw = k % KW
                ih = zh[:, None] * STRIDE_H - PAD_H + kh[None, :] * DIL_H
                iw = zw[:, None] * STRIDE_W - PAD_W + kw[None, :] * DIL_W
                x_ok = z_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
                patch = tl.load(x_image[:, None] + ci[None, :].to(tl.int64) * x_sc + ih.to(tl.int64) * x_sh
                                + iw.to(tl.int64) * x_sw, mask=x_ok, other=0.0)
                taps = tl.load(w_rows[None, :] + (ci * w_si + kh * w_sh + kw * w_sw).to(tl.int64)[:, None],
                               mask=k_ok[:, None] & c_ok[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(patch, taps, input_precision="ieee")
                else:
                    acc += tl.dot(patch, taps)
            v = tl.where(z_ok[:, None], acc, float("-inf"))  # window positions in the pool padding never win
            take = (v > best) | (v != v)  # a NaN wins, as in max_pool2d
            best = tl.where(take, v, best)
            offset = tl.where(take, i * POOL_KW + j, offset)
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


def conv_relu_pool(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                   groups: int, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode: bool,
                   argmax_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, argmax): y = maxpool(relu(conv2d(input, weight) + bias)), argmax = window offset of the max or
    −1 where y ≤ 0. Outputs keep the input's layout (channels-last or contiguous)."""
    from ..ops.conv_relu_pool import pooled_size

    x = input.contiguous(memory_format=_format(input))
    batch, in_channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    conv_h = (height + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    conv_w = (width + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    out_h = pooled_size(conv_h, pool_kernel[0], pool_stride[0], pool_padding[0], pool_dilation[0], ceil_mode)
    out_w = pooled_size(conv_w, pool_kernel[1], pool_stride[1], pool_padding[1], pool_dilation[1], ceil_mode)
    y = torch.empty((batch, out_channels, out_h, out_w), device=x.device, dtype=x.dtype, memory_format=_format(x))
    a = torch.empty_like(y, dtype=argmax_dtype)
    positions = batch * out_h * out_w
    if y.numel() == 0:
        return y, a
    # The interpreter (CPU tensors, tests) pays per program and per loop step, so it gets bigger blocks.
    block_p, block_c, block_k = (64, 64, 64) if x.device.type == "cpu" else (64, 64, 32)
    out_per_group = out_channels // groups
    grid = (triton.cdiv(positions, block_p), triton.cdiv(out_per_group, block_c), groups)
    _conv_relu_pool_kernel[grid](
        x, weight, bias if bias is not None else x, y, a, in_channels // groups, out_per_group, height, width,
        conv_h, conv_w, out_h, out_w, positions, *x.stride(), *weight.stride(), *y.stride(),
        KH=kernel_h, KW=kernel_w, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], POOL_KH=pool_kernel[0], POOL_KW=pool_kernel[1],
        POOL_SH=pool_stride[0], POOL_SW=pool_stride[1], POOL_PH=pool_padding[0], POOL_PW=pool_padding[1],
        POOL_DH=pool_dilation[0], POOL_DW=pool_dilation[1], HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k,
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
