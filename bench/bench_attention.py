"""Attention: torch's F.scaled_dot_product_attention (its default backend: the baseline), eager math
attention, torch.compile, and fastdl's backends, forward and forward+backward; then the multi-head
attention module against nn.MultiheadAttention.

FLOPs are counted as FlashAttention counts them: forward 4·B·H·N²·D (two N×N×D products), halved when
causal; backward 2.5× forward, so forward+backward is 3.5× forward.

Shapes: on a GPU the issue's grid (B=8, H=16, D ∈ {64, 128}, N = 512 … 8192) and the Transformer-base
and -large modules; on CPU the issue's CPU targets (B=4, H=8, N=1024, D=64 fp32; MHA embed 512, 8 heads,
batch 4, N=512). torch.compile runs on the GPU only: on CPU, Inductor lowers SDPA to the same ATen
flash kernel that is the baseline, and compiling it costs minutes on a 2-core machine.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdl
from conftest import fastdl_impls
from fastdl.ops import MultiheadAttention, scaled_dot_product_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
FASTDL = fastdl_impls(DEVICE)
IMPLS = ["eager", "math"] + (["compile"] if ON_GPU else []) + FASTDL
if ON_GPU:
    SDPA_SHAPES = [(8, 16, n, d) for d in (64, 128) for n in (512, 1024, 2048, 4096, 8192)]
    DTYPES = [torch.bfloat16, torch.float16]
    MHA_SHAPES = {"transformer-base": (512, 8, 8, 512), "transformer-large": (1024, 16, 8, 512)}
else:
    SDPA_SHAPES = [(4, 8, 1024, 64)]
    DTYPES = [torch.float32]
    MHA_SHAPES = {"issue-cpu-target": (512, 8, 4, 512)}


def _math_attention(q, k, v, is_causal):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _scoped(fn, backend):
    if backend is None:
        return fn

    def scoped():
        with fastdl.backend(backend):
            return fn()

    return scoped


def _sdpa_runner(impl, q, k, v, grad, causal, training):
    if impl == "eager":
        attend = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    elif impl == "math":
        attend = lambda: _math_attention(q, k, v, causal)  # noqa: E731
    elif impl == "compile":
        compiled = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        attend = lambda: compiled(q, k, v)  # noqa: E731
    else:
        attend = lambda: scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    if training:
        fn = lambda: torch.autograd.grad(attend(), (q, k, v), grad)  # noqa: E731
    else:
        def fn():
            with torch.no_grad():
                return attend()
    return _scoped(fn, impl if impl in FASTDL else None)


# impl varies fastest (the top decorator), so every implementation of a case is timed right after the
# eager baseline: on a shared machine, load drifts between cases far apart in time.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("training", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SDPA_SHAPES, ids=lambda s: "B{}-H{}-N{}-D{}".format(*s))
def bench_scaled_dot_product_attention(bench, impl, shape, causal, training, dtype):
    batch, heads, n, d = shape
    if impl == "math" and batch * heads * n * n * 4 > 4 * 2**30:
        pytest.skip("the math path's N×N scores would not fit in memory")
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=dtype, generator=generator).requires_grad_(training)
               for _ in range(3))
    grad = torch.randn(shape, device=DEVICE, dtype=dtype, generator=generator)
    forward_flops = 4 * batch * heads * n * n * d / (2 if causal else 1)
    bench(
        _sdpa_runner(impl, q, k, v, grad, causal, training),
        op="attention",
        case=f"sdpa B{batch} H{heads} N{n} D{d} {'causal' if causal else 'full'} {str(dtype)[6:]} "
             f"{'fwd+bwd' if training else 'fwd'}",
        impl=impl,
        device=DEVICE,
        flops=forward_flops * (3.5 if training else 1.0),
        dtype=dtype,
        baseline=_sdpa_runner("eager", q, k, v, grad, causal, training),
    )


def _mha_runner(impl, embed, heads, x, grad, training):
    torch.manual_seed(0)
    module = torch.nn.MultiheadAttention(embed, heads, batch_first=True, device=DEVICE, dtype=x.dtype)
    if impl in FASTDL:
        ours = MultiheadAttention(embed, heads, batch_first=True, device=DEVICE, dtype=x.dtype)
        ours.load_state_dict(module.state_dict())
        module = ours
    elif impl == "compile":
        module = torch.compile(module)
    # need_weights=False: the N×N weights are not wanted in training code, and with them torch itself
    # leaves its SDPA kernel for explicit matmuls.
    attend = lambda: module(x, x, x, need_weights=False)[0]  # noqa: E731
    if training:
        parameters = [x] + list(module.parameters())
        fn = lambda: torch.autograd.grad(attend(), parameters, grad)  # noqa: E731
    else:
        def fn():
            with torch.no_grad():
                return attend()
    return _scoped(fn, impl if impl in FASTDL else None)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "math"])
@pytest.mark.parametrize("dtype", DTYPES[:1], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("training", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", list(MHA_SHAPES))
def bench_multihead_attention(bench, impl, name, training, dtype):
    embed, heads, batch, n = MHA_SHAPES[name]
    x = torch.randn(batch, n, embed, device=DEVICE, dtype=dtype, requires_grad=training)
    grad = torch.randn_like(x)
    attention_flops = 4 * batch * n * n * embed
    projection_flops = 2 * batch * n * embed * embed * 4
    bench(
        _mha_runner(impl, embed, heads, x, grad, training),
        op="attention",
        case=f"MultiheadAttention {name} (E{embed} H{heads} B{batch} N{n}) {str(dtype)[6:]} "
             f"{'fwd+bwd' if training else 'fwd'}",
        impl=impl,
        device=DEVICE,
        flops=attention_flops * (3.5 if training else 1.0) + projection_flops * (3.0 if training else 1.0),
        dtype=dtype,
        baseline=_mha_runner("eager", embed, heads, x, grad, training),
    )
