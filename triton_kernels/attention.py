"""Flash attention in Triton, forward and backward (math in ``fastdl/ops/attention.py``).

Forward: one program per (block of BLOCK_M queries, batch × query head). It walks the key blocks with an
online softmax in base 2 (log2 e folded into the scale, so each probability is one exp2), keeps the
BLOCK_M × D output accumulator in registers, and writes the output and the row log-sum-exp. Causal
programs stop at the last key their last query sees, so masked tiles are never loaded.

Backward (FlashAttention-2's split, no atomics, so run-to-run deterministic):
* δ_i = g_i · o_i, one row reduction (torch, before the kernels), from the unrounded output (fp32 for
  fp16/bf16 inputs: the forward stores it so, and the Python op rounds it for the caller);
* dK/dV: one program per (block of BLOCK_N keys, batch × key/value head); it loops over the query heads
  of its group and the query blocks that see its keys, recomputes P from the saved lse, and accumulates
  dV += (P∘Z)ᵀ·dO and dK += scale·dSᵀ·Q in registers;
* dQ (and dmask): one program per (block of queries, batch × query head), recomputing the same tiles and
  accumulating dQ += scale·dS·K.

Dropout bits come from the counter hash of ``_dropout_bits`` in fastdl/ops/attention.py, reproduced on
uint32 lanes, so forward and both backward kernels agree on the mask without storing it.

Head dims are padded to a power of two ≥ 16 (masked loads). fp32 products use IEEE fp32 (not TF32) so
fp32 results meet fp32 tolerances; fp16/bf16 tiles feed the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backends import triton_interpreted

_LOG2E = 1.4426950408889634


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _keep_multiplier(rows, cols, seed_lo, seed_hi, threshold, keep_scale):
    """z = keep / (1 − p) for global rows (int64 vector) × columns (int vector)."""
    row_lo = (rows & 0xFFFFFFFF).to(tl.uint32)
    row_hi = (rows >> 32).to(tl.uint32)
    key = _mix32(_mix32(row_lo ^ seed_lo.to(tl.uint32)) ^ row_hi ^ seed_hi.to(tl.uint32))
    bits = _mix32(key[:, None] ^ cols.to(tl.uint32)[None, :])
    return tl.where(bits.to(tl.int64) >= threshold, keep_scale, 0.0)


@triton.jit
def _scores(q, k_ptrs, mask_ptrs, offs_m, offs_n, nq, nk, qk_scale,
            HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """S·log2 e for one tile, with the mask added and hidden entries at −∞. k_ptrs address Kᵀ (D × N)."""
    k_t = tl.load(k_ptrs, mask=offs_n[None, :] < nk, other=0.0)
    s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
    visible = (offs_n[None, :] < nk) & (offs_m[:, None] < nq)
    if HAS_MASK:
        s += tl.load(mask_ptrs, mask=visible, other=0.0).to(tl.float32) * 1.4426950408889634
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _query_block(nq, heads_q, heads_kv, BLOCK_M: tl.constexpr):
    """The program's (batch, query head, key/value head, first query row). One flat grid axis over query
    blocks × batch × heads: no 65535 limit on batch × heads."""
    tiles = tl.cdiv(nq, BLOCK_M)
    bh = tl.program_id(0) // tiles
    h = bh % heads_q
    return bh // heads_q, h, h // (heads_q // heads_kv), (tl.program_id(0) % tiles) * BLOCK_M


@triton.jit
def _attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_m, sm_n, so_b, so_h, so_n,
    heads_q, heads_kv, nq, nk, head_dim, value_dim, qk_scale,
    seed_lo, seed_hi, threshold, keep_scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, start_m = _query_block(nq, heads_q, heads_kv, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_base = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    m_base = mask_ptr + b.to(tl.int64) * sm_b + h.to(tl.int64) * sm_h
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sq_n + offs_d[None, :],
                mask=(offs_m[:, None] < nq) & (offs_d[None, :] < head_dim), other=0.0)
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    rows = (b * heads_q + h).to(tl.int64) * nq + offs_m.to(tl.int64)
    keys = nk
    if CAUSAL:
        keys = tl.minimum(nk, start_m + BLOCK_M)  # tiles past the block's last query are all masked
    for start_n in range(0, keys, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[None, :].to(tl.int64) * sk_n + offs_d[:, None]
        k_ptrs = tl.where(offs_d[:, None] < head_dim, k_ptrs, k_base)  # padded head dims read a valid address
        mask_ptrs = m_base + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n
        s = _scores(q, k_ptrs, mask_ptrs, offs_m, offs_n, nq, nk, qk_scale, HAS_MASK, CAUSAL, PRECISION)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row masked so far keeps weight 0
        p = tl.exp2(s - shift[:, None])
        rescale = tl.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        row_max = new_max
        acc = acc * rescale[:, None]
        if DROPOUT:
            p = p * _keep_multiplier(rows, offs_n, seed_lo, seed_hi, threshold, keep_scale)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * sv_n + offs_dv[None, :],
                    mask=(offs_n[:, None] < nk) & (offs_dv[None, :] < value_dim), other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    # A fully masked row (sum 0) gives 0, as torch does, and lse = +inf so backward's P is 0 there.
    safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out = acc * tl.where(row_sum > 0, 1.0 / safe_sum, 0.0)[:, None]
    tl.store(out_ptr + b.to(tl.int64) * so_b + h.to(tl.int64) * so_h + offs_m[:, None].to(tl.int64) * so_n
             + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < nq) & (offs_dv[None, :] < value_dim))
    lse = tl.where(row_sum > 0, (row_max + tl.log2(safe_sum)) * 0.6931471805599453, float("inf"))
    tl.store(lse_ptr + rows, lse, mask=offs_m < nq)


@triton.jit
def _backward_tile(q, do, k_ptrs, v_t_ptrs, mask_ptrs, lse2, delta, rows, offs_m, offs_n, nq, nk, qk_scale,
                   seed_lo, seed_hi, threshold, keep_scale,
                   HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputes one tile: returns (P∘Z, dS) for queries offs_m × keys offs_n."""
    s = _scores(q, k_ptrs, mask_ptrs, offs_m, offs_n, nq, nk, qk_scale, HAS_MASK, CAUSAL, PRECISION)
    p = tl.exp2(s - lse2[:, None])  # lse = +inf (a fully masked row) gives 0
    v_t = tl.load(v_t_ptrs, mask=offs_n[None, :] < nk, other=0.0)
    dp = tl.dot(do, v_t, input_precision=PRECISION)
    if DROPOUT:
        z = _keep_multiplier(rows, offs_n, seed_lo, seed_hi, threshold, keep_scale)
        return p * z, p * (dp * z - delta[:, None])
    return p, p * (dp - delta[:, None])


@triton.jit
def _attention_backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_m, sm_n, sdo_b, sdo_h, sdo_n,
    heads_q, heads_kv, nq, nk, head_dim, value_dim, qk_scale, scale,
    seed_lo, seed_hi, threshold, keep_scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    tiles = tl.cdiv(nk, BLOCK_N)
    start_n = (tl.program_id(0) % tiles) * BLOCK_N
    bhk = tl.program_id(0) // tiles
    b = bhk // heads_kv
    hk = bhk % heads_kv
    group = heads_q // heads_kv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    k_ptrs = tl.where(offs_d[:, None] < head_dim, k_base + offs_n[None, :].to(tl.int64) * sk_n + offs_d[:, None], k_base)
    v_t_ptrs = tl.where(offs_dv[:, None] < value_dim, v_base + offs_n[None, :].to(tl.int64) * sv_n + offs_dv[:, None],
                        v_base)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    first_m = 0
    if CAUSAL:
        first_m = (start_n // BLOCK_M) * BLOCK_M  # queries before start_n see none of these keys
    for g in range(0, group):
        h = hk * group + g
        q_base = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h
        do_base = do_ptr + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h
        m_base = mask_ptr + b.to(tl.int64) * sm_b + h.to(tl.int64) * sm_h
        for start_m in range(first_m, nq, BLOCK_M):
            offs_m = start_m + offs_m0
            rows = (b * heads_q + h).to(tl.int64) * nq + offs_m.to(tl.int64)
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sq_n + offs_d[None, :],
                        mask=(offs_m[:, None] < nq) & (offs_d[None, :] < head_dim), other=0.0)
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sdo_n + offs_dv[None, :],
                         mask=(offs_m[:, None] < nq) & (offs_dv[None, :] < value_dim), other=0.0)
            lse2 = tl.load(lse_ptr + rows, mask=offs_m < nq, other=float("inf")) * 1.4426950408889634
            delta = tl.load(delta_ptr + rows, mask=offs_m < nq, other=0.0)
            mask_ptrs = m_base + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n
            p, ds = _backward_tile(q, do, k_ptrs, v_t_ptrs, mask_ptrs, lse2, delta, rows, offs_m, offs_n, nq, nk,
                                   qk_scale, seed_lo, seed_hi, threshold, keep_scale,
                                   HAS_MASK, CAUSAL, DROPOUT, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    kv_rows = (b * heads_kv + hk).to(tl.int64) * nk + offs_n.to(tl.int64)
    tl.store(dk_ptr + kv_rows[:, None] * head_dim + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < nk) & (offs_d[None, :] < head_dim))
    tl.store(dv_ptr + kv_rows[:, None] * value_dim + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < nk) & (offs_dv[None, :] < value_dim))


@triton.jit
def _attention_backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dmask_ptr,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_m, sm_n, sdo_b, sdo_h, sdo_n,
    heads_q, heads_kv, nq, nk, head_dim, value_dim, qk_scale, scale,
    seed_lo, seed_hi, threshold, keep_scale,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, start_m = _query_block(nq, heads_q, heads_kv, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = (b * heads_q + h).to(tl.int64) * nq + offs_m.to(tl.int64)
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + offs_m[:, None].to(tl.int64) * sq_n
                + offs_d[None, :], mask=(offs_m[:, None] < nq) & (offs_d[None, :] < head_dim), other=0.0)
    do = tl.load(do_ptr + b.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h + offs_m[:, None].to(tl.int64) * sdo_n
                 + offs_dv[None, :], mask=(offs_m[:, None] < nq) & (offs_dv[None, :] < value_dim), other=0.0)
    lse2 = tl.load(lse_ptr + rows, mask=offs_m < nq, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + rows, mask=offs_m < nq, other=0.0)
    k_base = k_ptr + b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h
    m_base = mask_ptr + b.to(tl.int64) * sm_b + h.to(tl.int64) * sm_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    keys = nk
    if CAUSAL:
        keys = tl.minimum(nk, start_m + BLOCK_M)
    for start_n in range(0, keys, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = tl.where(offs_d[:, None] < head_dim, k_base + offs_n[None, :].to(tl.int64) * sk_n + offs_d[:, None],
                          k_base)
        v_t_ptrs = tl.where(offs_dv[:, None] < value_dim,
                            v_base + offs_n[None, :].to(tl.int64) * sv_n + offs_dv[:, None], v_base)
        mask_ptrs = m_base + offs_m[:, None].to(tl.int64) * sm_m + offs_n[None, :].to(tl.int64) * sm_n
        ds = _backward_tile(q, do, k_ptrs, v_t_ptrs, mask_ptrs, lse2, delta, rows, offs_m, offs_n, nq, nk,
                            qk_scale, seed_lo, seed_hi, threshold, keep_scale,
                            HAS_MASK, CAUSAL, DROPOUT, PRECISION)[1]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * sk_n + offs_d[None, :],
                    mask=(offs_n[:, None] < nk) & (offs_d[None, :] < head_dim), other=0.0)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if MASK_GRAD:
            tl.store(dmask_ptr + rows[:, None] * nk + offs_n[None, :], ds.to(dmask_ptr.dtype.element_ty),
                     mask=(offs_m[:, None] < nq) & (offs_n[None, :] < nk))
    tl.store(dq_ptr + rows[:, None] * head_dim + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < nq) & (offs_d[None, :] < head_dim))


def _padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim class, for fp16/bf16 on Hopper. The
# dK/dV kernel keeps two BLOCK_N × D fp32 accumulators in registers, hence its narrower tiles at D = 128.
_CONFIGS = {
    "forward": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
    "dkdv": {64: (32, 128, 4, 3), 128: (32, 64, 8, 3), 256: (16, 32, 8, 2)},
    "dq": {64: (128, 32, 4, 3), 128: (64, 32, 8, 3), 256: (32, 16, 8, 2)},
}


def _config(kind: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile shapes, warps and pipeline stages (tuned for Hopper, separately for forward, dK/dV and dQ).
    fp32 tiles take twice the shared memory, so they are halved. The interpreter (CPU tests) takes the
    smallest tiles: it runs every lane in Python."""
    if triton_interpreted():
        return dict(BLOCK_M=16, BLOCK_N=16)
    dims = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    block_m, block_n, warps, stages = _CONFIGS[kind][dims]
    if dtype == torch.float32:
        block_m, block_n, stages = max(16, block_m // 2), max(16, block_n // 2), min(stages, 2)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def _dropout_args(dropout_p: float, seed: int):
    from ..ops.attention import dropout_scale, dropout_threshold

    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, dropout_threshold(dropout_p), dropout_scale(dropout_p)


def _common(query, key, value, mask):
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    mask_arg = mask if mask is not None else query
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    strides = (*query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *mask_strides)
    return precision, mask_arg, strides


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def attention_forward(query, key, value, mask, dropout_p, is_causal, scale, seed, out):
    """Writes the output into ``out`` (any strides, unit stride along the head dim; the kernel stores in
    its dtype: fp32 for fp16/bf16 inputs, see fastdl/ops/attention.py) and returns the row log-sum-exp."""
    query, key, value = (_unit_stride(t) for t in (query, key, value))
    batch, heads_q, nq, head_dim = query.shape
    heads_kv, nk, value_dim = key.shape[1], key.shape[2], value.shape[3]
    lse = torch.empty(batch, heads_q, nq, device=query.device, dtype=torch.float32)
    precision, mask_arg, strides = _common(query, key, value, mask)
    config = _config("forward", max(head_dim, value_dim), query.dtype)
    grid = (triton.cdiv(nq, config["BLOCK_M"]) * batch * heads_q,)
    _attention_forward_kernel[grid](
        query, key, value, mask_arg, out, lse, *strides, *out.stride()[:3],
        heads_q, heads_kv, nq, nk, head_dim, value_dim, scale * _LOG2E, *_dropout_args(dropout_p, seed),
        HAS_MASK=mask is not None, CAUSAL=is_causal, DROPOUT=dropout_p > 0, PRECISION=precision,
        BLOCK_D=_padded(head_dim), BLOCK_DV=_padded(value_dim), **config,
    )
    return lse


def attention_backward(grad_out, query, key, value, mask, out, lse, dropout_p, is_causal, scale, seed, mask_grad):
    query, key, value, grad_out = (_unit_stride(t) for t in (query, key, value, grad_out))
    batch, heads_q, nq, head_dim = query.shape
    heads_kv, nk, value_dim = key.shape[1], key.shape[2], value.shape[3]
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.float().contiguous()
    dq = torch.empty(query.shape, device=query.device, dtype=query.dtype)
    dk = torch.empty(key.shape, device=key.device, dtype=key.dtype)
    dv = torch.empty(value.shape, device=value.device, dtype=value.dtype)
    dmask = (torch.zeros(batch, heads_q, nq, nk, device=query.device, dtype=query.dtype) if mask_grad
             else query.new_empty(0))
    precision, mask_arg, strides = _common(query, key, value, mask)
    common = (heads_q, heads_kv, nq, nk, head_dim, value_dim, scale * _LOG2E, scale, *_dropout_args(dropout_p, seed))
    flags = dict(HAS_MASK=mask is not None, CAUSAL=is_causal, DROPOUT=dropout_p > 0, PRECISION=precision,
                 BLOCK_D=_padded(head_dim), BLOCK_DV=_padded(value_dim))
    config = _config("dkdv", max(head_dim, value_dim), query.dtype)
    _attention_backward_dkdv_kernel[(triton.cdiv(nk, config["BLOCK_N"]) * batch * heads_kv,)](
        query, key, value, mask_arg, grad_out, lse, delta, dk, dv, *strides, *grad_out.stride()[:3], *common,
        **flags, **config,
    )
    config = _config("dq", max(head_dim, value_dim), query.dtype)
    _attention_backward_dq_kernel[(triton.cdiv(nq, config["BLOCK_M"]) * batch * heads_q,)](
        query, key, value, mask_arg, grad_out, lse, delta, dq, dmask if mask_grad else dq, *strides,
        *grad_out.stride()[:3], *common, MASK_GRAD=mask_grad, **flags, **config,
    )
    return dq, dk, dv, dmask

