"""Dilated causal 1-D convolution in Triton (math in ``fastdl/ops/causal_conv.py``).

The causal window is read in place: tap j of output column t reads input column t − s_j, s_j = d·(k−1−j),
and the load mask zeroes columns before 0, so there is no padded copy of x and no chomped output.

* Dense layers: one program owns a (BLOCK_O output channels × BLOCK_T steps) tile of one image and group
  and accumulates, per tap and per BLOCK_I input channels, one ``tl.dot`` of the weight tile with the
  shifted input tile, accumulated in fp32; fp32 inputs multiply in full fp32 (``input_precision="ieee"``,
  not TF32), fp16/bf16 ones on the tensor cores.
  ∂x is the same walk with wᵀ and forward shifts (t + s_j).
* Depthwise layers (one input channel per group): k multiply-adds per output, no matrix unit needed.
* ∂w and ∂b: each program sums its tile over a fixed slice of (image, time) and writes a partial; the
  partials are then summed in slice order. The slicing depends only on the shape, so the result is
  bit-identical run to run (no atomics).
* Streaming step: one program per (image, BLOCK_O outputs) reads the k history slots of the ring buffer
  (N, R+1, C_in) and the program of the first output block writes x_t into its own slot — never a slot any
  program reads in this step (shifts are 1 … R), so one launch needs no ordering.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_T = 64
_BLOCK_C = 16  # channels per tile (tl.dot wants ≥ 16 on each side)
_SLICES = 128  # ∂w/∂b partials: the (image, time) work is cut into at most this many slices


@triton.jit
def _dense_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, cin, cout, length, dilation, groups,
                          HAS_BIAS: tl.constexpr, TAPS: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    cig, cog = cin // groups, cout // groups
    o_blocks = tl.cdiv(cog, BLOCK_O)
    n = tl.program_id(0) // (groups * o_blocks)
    group = (tl.program_id(0) // o_blocks) % groups
    o = (tl.program_id(0) % o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_mask = o < cog
    x_base = x_ptr + (n.to(tl.int64) * cin + group * cig) * length
    acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.float32)
    for j in range(TAPS):
        source = t - dilation * (TAPS - 1 - j)
        t_mask = (source >= 0) & (t < length)
        for i0 in range(0, cig, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            i_mask = i < cig
            w = tl.load(w_ptr + ((group * cog + o[:, None]) * cig + i[None, :]) * TAPS + j,
                        mask=o_mask[:, None] & i_mask[None, :], other=0.0)
            x = tl.load(x_base + i[:, None].to(tl.int64) * length + source[None, :],
                        mask=i_mask[:, None] & t_mask[None, :], other=0.0)
            acc += tl.dot(w, x, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + group * cog + o, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    y_base = y_ptr + (n.to(tl.int64) * cout + group * cog) * length
    tl.store(y_base + o[:, None].to(tl.int64) * length + t[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=o_mask[:, None] & (t[None, :] < length))


@triton.jit
def _depthwise_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, cin, cout, length, dilation,
                              HAS_BIAS: tl.constexpr, TAPS: tl.constexpr, BLOCK_O: tl.constexpr,
                              BLOCK_T: tl.constexpr):
    o_blocks = tl.cdiv(cout, BLOCK_O)
    n = tl.program_id(0) // o_blocks
    o = (tl.program_id(0) % o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_mask = o < cout
    channel = o // (cout // cin)
    x_rows = x_ptr + (n.to(tl.int64) * cin + channel[:, None]) * length
    acc = tl.zeros([BLOCK_O, BLOCK_T], dtype=tl.float32)
    for j in range(TAPS):
        source = t - dilation * (TAPS - 1 - j)
        w = tl.load(w_ptr + o * TAPS + j, mask=o_mask, other=0.0).to(tl.float32)
        x = tl.load(x_rows + source[None, :], mask=o_mask[:, None] & ((source >= 0) & (t < length))[None, :], other=0.0)
        acc += w[:, None] * x.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + (n.to(tl.int64) * cout + o[:, None]) * length + t[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=o_mask[:, None] & (t[None, :] < length))


@triton.jit
def _dense_grad_input_kernel(g_ptr, w_ptr, dx_ptr, cin, cout, length, dilation, groups,
                             TAPS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                             BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    cig, cog = cin // groups, cout // groups
    i_blocks = tl.cdiv(cig, BLOCK_I)
    n = tl.program_id(0) // (groups * i_blocks)
    group = (tl.program_id(0) // i_blocks) % groups
    i = (tl.program_id(0) % i_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    i_mask = i < cig
    g_base = g_ptr + (n.to(tl.int64) * cout + group * cog) * length
    acc = tl.zeros([BLOCK_I, BLOCK_T], dtype=tl.float32)
    for j in range(TAPS):
        target = t + dilation * (TAPS - 1 - j)
        t_mask = target < length
        for o0 in range(0, cog, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            o_mask = o < cog
            w_t = tl.load(w_ptr + ((group * cog + o[None, :]) * cig + i[:, None]) * TAPS + j,
                          mask=i_mask[:, None] & o_mask[None, :], other=0.0)
            g = tl.load(g_base + o[:, None].to(tl.int64) * length + target[None, :],
                        mask=o_mask[:, None] & t_mask[None, :], other=0.0)
            acc += tl.dot(w_t, g, input_precision=PRECISION)
    dx_base = dx_ptr + (n.to(tl.int64) * cin + group * cig) * length
    tl.store(dx_base + i[:, None].to(tl.int64) * length + t[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=i_mask[:, None] & (t[None, :] < length))


@triton.jit
def _depthwise_grad_input_kernel(g_ptr, w_ptr, dx_ptr, cin, cout, length, dilation,
                                 TAPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    c_blocks = tl.cdiv(cin, BLOCK_C)
    n = tl.program_id(0) // c_blocks
    c = (tl.program_id(0) % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c_mask = c < cin
    multiplier = cout // cin
    acc = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
    for m in range(0, multiplier):
        o = c * multiplier + m
        g_rows = g_ptr + (n.to(tl.int64) * cout + o[:, None]) * length
        for j in range(TAPS):
            target = t + dilation * (TAPS - 1 - j)
            w = tl.load(w_ptr + o * TAPS + j, mask=c_mask, other=0.0).to(tl.float32)
            g = tl.load(g_rows + target[None, :], mask=c_mask[:, None] & (target < length)[None, :], other=0.0)
            acc += w[:, None] * g.to(tl.float32)
    tl.store(dx_ptr + (n.to(tl.int64) * cin + c[:, None]) * length + t[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=c_mask[:, None] & (t[None, :] < length))


@triton.jit
def _grad_weight_bias_kernel(g_ptr, x_ptr, dw_ptr, db_ptr, batch, cin, cout, length, dilation, groups,
                             t_chunks, chunks_per_slice,
                             TAPS: tl.constexpr, DEPTHWISE: tl.constexpr, BLOCK_O: tl.constexpr,
                             BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """Partial ∂w[o, i, j] (and ∂b[o] for tap k−1, input block 0) of one slice of the (image, time chunk)
    work: partials of shape (slices, C_out, C_in/g, k) and (slices, C_out), slice = program_id(2)."""
    cig, cog = cin // groups, cout // groups
    o_blocks = tl.cdiv(cog, BLOCK_O)
    i_blocks = tl.cdiv(cig, BLOCK_I)
    group = tl.program_id(0) // (o_blocks * i_blocks)
    o = ((tl.program_id(0) // i_blocks) % o_blocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (tl.program_id(0) % i_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(1)
    piece = tl.program_id(2)
    shift = dilation * (TAPS - 1 - j)
    o_mask = o < cog
    i_mask = i < cig
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    # Tap k−1 (shift 0) and the first input block sum each g element once: those programs write ∂b. The
    # test is made on a vector: Triton's interpreter rejects masks mixing scalar and vector.
    with_bias = (o * 0 + j == TAPS - 1) & (o * 0 + tl.program_id(0) % i_blocks == 0)
    for chunk in range(piece * chunks_per_slice, tl.minimum((piece + 1) * chunks_per_slice, batch * t_chunks)):
        n = chunk // t_chunks
        t = (chunk % t_chunks) * BLOCK_T + tl.arange(0, BLOCK_T)
        source = t - shift
        g = tl.load(g_ptr + (n.to(tl.int64) * cout + group * cog + o[:, None]) * length + t[None, :],
                    mask=o_mask[:, None] & (t < length)[None, :], other=0.0)
        if DEPTHWISE:
            # One input channel per group (BLOCK_I = 1): the product is an elementwise one.
            x = tl.load(x_ptr + (n.to(tl.int64) * cin + group * cig) * length + source,
                        mask=(source >= 0) & (t < length), other=0.0)
            acc += tl.sum(g.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)[:, None]
        else:
            x_t = tl.load(x_ptr + (n.to(tl.int64) * cin + group * cig + i[None, :]) * length + source[:, None],
                          mask=i_mask[None, :] & ((source >= 0) & (t < length))[:, None], other=0.0)
            acc += tl.dot(g, x_t, input_precision=PRECISION)
        bias_acc += tl.sum(g.to(tl.float32), axis=1)
    rows = group * cog + o
    tl.store(dw_ptr + ((piece * cout + rows[:, None]) * cig + i[None, :]) * TAPS + j, acc,
             mask=o_mask[:, None] & i_mask[None, :])
    tl.store(db_ptr + piece * cout + rows, bias_acc, mask=o_mask & with_bias)


@triton.jit
def _step_kernel(x_ptr, ring_ptr, w_ptr, b_ptr, y_ptr, cin, cout, groups, slots, slot_now, dilation,
                 HAS_BIAS: tl.constexpr, TAPS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    n = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o < cout
    cig, cog = cin // groups, cout // groups
    first_in = (o // cog) * cig
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for j in range(TAPS):
        shift = dilation * (TAPS - 1 - j)
        slot = (slot_now - shift + slots) % slots
        for i0 in range(0, cig, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            mask = o_mask[:, None] & (i < cig)[None, :]
            channel = first_in[:, None] + i[None, :]
            if shift == 0:
                h = tl.load(x_ptr + n * cin + channel, mask=mask, other=0.0)
            else:
                h = tl.load(ring_ptr + (n.to(tl.int64) * slots + slot) * cin + channel, mask=mask, other=0.0)
            w = tl.load(w_ptr + (o[:, None] * cig + i[None, :]) * TAPS + j, mask=mask, other=0.0)
            acc += tl.sum(w.to(tl.float32) * h.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n * cout + o, acc.to(y_ptr.dtype.element_ty), mask=o_mask)
    if tl.program_id(1) == 0:
        for c0 in range(0, cin, BLOCK_I):
            c = c0 + tl.arange(0, BLOCK_I)
            value = tl.load(x_ptr + n * cin + c, mask=c < cin, other=0.0)
            tl.store(ring_ptr + (n.to(tl.int64) * slots + slot_now) * cin + c, value, mask=c < cin)


def _precision(dtype: torch.dtype) -> str:
    """fp32 products in full fp32 (TF32 would miss fp32 accuracy); fp16/bf16 take the default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _channel_block(channels: int) -> int:
    return max(_BLOCK_C, min(64, triton.next_power_of_2(channels)))


def causal_conv_forward(input, weight, bias, dilation: int, groups: int) -> torch.Tensor:
    x, w = input.contiguous(), weight.contiguous()
    batch, cin, length = x.shape
    cout, taps = w.shape[0], w.shape[2]
    y = torch.empty(batch, cout, length, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    b = bias.contiguous() if bias is not None else w
    t_blocks = triton.cdiv(length, _BLOCK_T)
    if cin == groups:
        block_o = _channel_block(cout)
        _depthwise_forward_kernel[(batch * triton.cdiv(cout, block_o), t_blocks)](
            x, w, b, y, cin, cout, length, dilation,
            HAS_BIAS=bias is not None, TAPS=taps, BLOCK_O=block_o, BLOCK_T=_BLOCK_T,
        )
        return y
    cig, cog = cin // groups, cout // groups
    block_o = _channel_block(cog)
    _dense_forward_kernel[(batch * groups * triton.cdiv(cog, block_o), t_blocks)](
        x, w, b, y, cin, cout, length, dilation, groups,
        HAS_BIAS=bias is not None, TAPS=taps, BLOCK_O=block_o, BLOCK_I=_channel_block(cig), BLOCK_T=_BLOCK_T,
        PRECISION=_precision(x.dtype),
    )
    return y


def causal_conv_backward(grad_output, input, weight, dilation: int, groups: int):
    g, x, w = grad_output.contiguous(), input.contiguous(), weight.contiguous()
    batch, cin, length = x.shape
    cout, taps = w.shape[0], w.shape[2]
    cig, cog = cin // groups, cout // groups
    dx = torch.empty_like(x)
    if g.numel() == 0 or x.numel() == 0:
        return dx.zero_(), torch.zeros_like(w), w.new_zeros(cout)
    depthwise = cin == groups
    t_blocks = triton.cdiv(length, _BLOCK_T)
    if depthwise:
        block_c = _channel_block(cin)
        _depthwise_grad_input_kernel[(batch * triton.cdiv(cin, block_c), t_blocks)](
            g, w, dx, cin, cout, length, dilation, TAPS=taps, BLOCK_C=block_c, BLOCK_T=_BLOCK_T,
        )
    else:
        block_i = _channel_block(cig)
        _dense_grad_input_kernel[(batch * groups * triton.cdiv(cig, block_i), t_blocks)](
            g, w, dx, cin, cout, length, dilation, groups,
            TAPS=taps, BLOCK_O=_channel_block(cog), BLOCK_I=block_i, BLOCK_T=_BLOCK_T, PRECISION=_precision(x.dtype),
        )
    # The (image, time chunk) work is cut into a number of slices fixed by the shape: deterministic sums.
    chunks = batch * t_blocks
    chunks_per_slice = triton.cdiv(chunks, min(_SLICES, chunks))
    slices = triton.cdiv(chunks, chunks_per_slice)
    dw_partial = torch.empty(slices, cout, cig, taps, device=x.device, dtype=torch.float32)
    db_partial = torch.empty(slices, cout, device=x.device, dtype=torch.float32)
    block_o = _channel_block(cog)
    block_i = 1 if depthwise else _channel_block(cig)
    grid = (groups * triton.cdiv(cog, block_o) * triton.cdiv(cig, block_i), taps, slices)
    _grad_weight_bias_kernel[grid](
        g, x, dw_partial, db_partial, batch, cin, cout, length, dilation, groups, t_blocks, chunks_per_slice,
        TAPS=taps, DEPTHWISE=depthwise, BLOCK_O=block_o, BLOCK_I=block_i, BLOCK_T=_BLOCK_T,
        PRECISION=_precision(x.dtype),
    )
    return dx, dw_partial.sum(0).to(w.dtype), db_partial.sum(0).to(w.dtype)


def causal_conv_step(input, buffer, position: int, weight, bias, dilation: int, groups: int) -> torch.Tensor:
    x, w = input.contiguous(), weight.contiguous()
    batch, cin = x.shape
    cout, taps = w.shape[0], w.shape[2]
    y = torch.empty(batch, cout, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    slots = buffer.shape[1]
    block_o = _channel_block(cout)
    _step_kernel[(batch, triton.cdiv(cout, block_o))](
        x, buffer, w, bias.contiguous() if bias is not None else w, y, cin, cout, groups, slots, position % slots,
        dilation, HAS_BIAS=bias is not None, TAPS=taps, BLOCK_O=block_o, BLOCK_I=_channel_block(cin // groups),
    )
    return y
