"""scaled_dot_product_attention / MultiheadAttention on every backend against torch in fp64."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import fastdl
from fastdl.ops import MultiheadAttention, scaled_dot_product_attention
from fastdl.ops.attention import dropout_multiplier
from fastdl.testing import (AUTOGRAD_TRANSFORMS, assert_close, assert_function_matches_torch, assert_like_torch,
                            assert_module_matches_torch, assert_same_results, assert_transform_matches,
                            backend_device_cases, fuzz_backends, fuzz_test, layout_leaf_shape, outputs_and_grads,
                            raised_by, relative_error, torch_module_samples, torch_op_samples, with_layout)

CASES = backend_device_cases()
FP32_CASES = [c for c in CASES if c.values[2] == torch.float32]


def _generator(seed):
    return torch.Generator().manual_seed(seed)


# (batch, query heads, key/value heads, Nq, Nk, D, Dv, causal, mask): odd lengths, Nq ≠ Nk both ways
# under causality, GQA, boolean masks with fully masked rows, float masks that broadcast and need grad,
# and the head dims of the issue.
SHAPES = [
    (2, 3, 3, 17, 17, 16, 16, False, None),
    (1, 2, 2, 33, 33, 64, 64, True, None),
    (1, 2, 2, 5, 19, 16, 16, True, None),
    (1, 2, 2, 19, 5, 16, 32, True, None),
    (2, 4, 2, 9, 13, 32, 24, False, "bool"),
    (2, 2, 2, 9, 13, 16, 16, False, "float"),
    (2, 2, 1, 7, 70, 80, 80, False, "float-per-head"),
    (1, 1, 1, 1, 1, 16, 16, False, None),
    (1, 2, 2, 3, 40, 128, 128, True, None),
    (1, 1, 1, 5, 9, 256, 256, False, None),
]


def _mask(kind, batch, heads, nq, nk):
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(nq, nk, generator=_generator(3)) > 0.3
        mask[2] = False  # a fully masked row
        return mask
    shape = (batch, 1, nq, nk) if kind == "float" else (1, heads, nq, nk)
    mask = torch.randn(shape, dtype=torch.float64, generator=_generator(4))
    mask[..., 1, :] = float("-inf")  # a fully masked row
    return mask.requires_grad_()


def _inputs(batch, heads_q, heads_kv, nq, nk, d, dv, seed=0):
    g = _generator(seed)
    return [torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()
            for shape in ((batch, heads_q, nq, d), (batch, heads_kv, nk, d), (batch, heads_kv, nk, dv))]


def _compare(backend, device, dtype, inputs, use_backend, **kwargs):
    """Ours on (backend, device, dtype) against torch in fp64: output and the grad of every input."""
    gqa = inputs[0].dim() >= 3 and inputs[1].dim() >= 3 and inputs[0].shape[-3] != inputs[1].shape[-3]
    oracle = lambda *t: F.scaled_dot_product_attention(*t, enable_gqa=gqa, **kwargs)  # noqa: E731
    ours = lambda *t: scaled_dot_product_attention(*t, enable_gqa=gqa, **kwargs)  # noqa: E731
    out_shape = oracle(*[t.detach() for t in inputs]).shape
    grad = [torch.randn(out_shape, dtype=torch.float64, generator=_generator(1))]
    (expected,), expected_grads = outputs_and_grads(oracle, inputs, grad, dtype=torch.float64, device="cpu")
    with use_backend(backend, device):
        (actual,), actual_grads = outputs_and_grads(ours, inputs, grad, dtype=dtype, device=device)
    eager, eager_grads = None, [None] * len(inputs)
    if dtype in (torch.float16, torch.bfloat16):
        (eager,), eager_grads = outputs_and_grads(oracle, inputs, grad, dtype=dtype, device=device)
    assert actual.dtype == dtype and actual.device.type == device
    assert_close(actual, expected, eager=eager, name="output")
    for name, a, e, eg in zip(("query", "key", "value", "attn_mask"), actual_grads, expected_grads, eager_grads):
        assert_close(a, e, eager=eg, name=f"grad {name}")


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda v: "-".join(map(str, v)))
def test_matches_torch(backend, device, dtype, shape, use_backend):
    batch, heads_q, heads_kv, nq, nk, d, dv, causal, mask_kind = shape
    inputs = _inputs(batch, heads_q, heads_kv, nq, nk, d, dv)
    mask = _mask(mask_kind, batch, heads_q, nq, nk)
    if mask is not None and mask.requires_grad:
        inputs.append(mask)
        _compare(backend, device, dtype, inputs, use_backend, is_causal=causal)
    else:
        _compare(backend, device, dtype, inputs, use_backend, attn_mask=mask, is_causal=causal)


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[0] != "triton" or c.values[1] == "cuda"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_sequence(backend, device, dtype, causal, use_backend):
    """N = 1000: many tiles, a ragged last tile, and causal tiles skipped."""
    _compare(backend, device, dtype, _inputs(1, 2, 2, 1000, 1000, 64, 64), use_backend, is_causal=causal)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
@pytest.mark.parametrize(
    "shapes",
    [((7, 16), (9, 16), (9, 8)), ((3, 5, 16), (3, 9, 16), (3, 9, 16)), ((2, 1, 2, 5, 16), (1, 3, 1, 9, 16), (1, 3, 1, 9, 8)),
     ((2, 3, 5, 16), (2, 1, 9, 16), (2, 1, 9, 16))],
    ids=["rank2", "rank3", "rank5-broadcast", "one-kv-head"],
)
def test_any_rank_and_broadcast(backend, device, dtype, shapes, use_backend):
    g = _generator(5)
    inputs = [torch.randn(s, dtype=torch.float64, generator=g).requires_grad_() for s in shapes]
    _compare(backend, device, dtype, inputs, use_backend)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_scale_and_broadcast_masks(backend, device, dtype, use_backend):
    inputs = _inputs(2, 2, 2, 6, 11, 16, 16)
    mask = torch.rand(2, 1, 1, 11, generator=_generator(6)) > 0.5
    _compare(backend, device, dtype, inputs, use_backend, attn_mask=mask, scale=0.37)
    # A float mask broadcast along the keys (stride 0 in the kernels' last dim), with its gradient.
    per_query = torch.randn(1, 2, 6, 1, dtype=torch.float64, generator=_generator(10), requires_grad=True)
    _compare(backend, device, dtype, inputs + [per_query], use_backend, scale=0.37)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_dropout_statistics_and_same_mask_everywhere(backend, device, dtype, use_backend):
    """With q = k = 0 every probability is 1/Nk and v = I reads them out: out·Nk is the dropout multiplier.
    It must be fastdl's counter-based mask exactly, drop a fraction p, and scale the rest by 1/(1 − p)."""
    p, n = 0.3, 64
    q = torch.zeros(2, 3, n, 16, device=device, dtype=dtype)
    v = torch.eye(n, device=device, dtype=dtype).expand(2, 3, n, n)
    with use_backend(backend, device):
        torch.manual_seed(11)
        out = scaled_dot_product_attention(q, q, v, dropout_p=p)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, ()).item())
    expected = dropout_multiplier(seed, p, 2, 3, n, n, "cpu", torch.float64)
    torch.testing.assert_close((out * n).double().cpu(), expected, rtol=1e-5, atol=1e-5)
    dropped = (expected == 0).double().mean().item()
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / expected.numel()), dropped
    assert torch.all((expected == 0) | ((expected - 1 / (1 - p)).abs() < 1e-12))


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_dropout_backward_matches_reference_for_same_seed(backend, device, dtype, use_backend):
    inputs = _inputs(1, 4, 2, 13, 21, 16, 16)
    grad = torch.randn(1, 4, 13, 16, dtype=torch.float64, generator=_generator(7))

    def run(name, dtype):
        def fn(q, k, v):
            torch.manual_seed(3)
            return scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True, enable_gqa=True)
        with fastdl.backend(name):
            return outputs_and_grads(fn, inputs, [grad], dtype=dtype, device=device if name != "reference" else "cpu")

    (expected,), expected_grads = run("reference", torch.float64)
    with use_backend(backend, device):
        (actual,), actual_grads = run(backend, dtype)
    assert_close(actual, expected, name="dropout output")
    for name, a, e in zip("qkv", actual_grads, expected_grads):
        assert_close(a, e, name=f"dropout grad {name}")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradcheck_fp64_with_dropout_and_float_mask(backend, use_backend):
    """gradcheck differentiates forward numerically, so with a fixed seed it proves that backward
    recomputes exactly the forward's dropout mask."""
    q, k, v = _inputs(1, 2, 1, 3, 5, 4, 3, seed=8)
    mask = torch.randn(1, 1, 3, 5, dtype=torch.float64, generator=_generator(9), requires_grad=True)

    def fn(q, k, v, mask):
        torch.manual_seed(5)
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3, enable_gqa=True)

    with use_backend(backend, "cpu"):
        assert torch.autograd.gradcheck(fn, (q, k, v, mask))
        assert torch.autograd.gradcheck(
            lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v))


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_deterministic(backend, device, dtype, use_backend):
    q, k, v = (t.detach().to(device, dtype).requires_grad_() for t in _inputs(2, 2, 2, 40, 40, 16, 16))
    grad = torch.randn(2, 2, 40, 16, device=device, dtype=dtype)
    runs = []
    with use_backend(backend, device):
        for _ in range(2):
            torch.manual_seed(0)
            out = scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)
            runs.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_opcheck(backend, use_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.detach().float().to(device).requires_grad_() for t in _inputs(1, 2, 1, 5, 7, 16, 16))
    mask = torch.randn(1, 1, 5, 7, device=device).expand(1, 2, 5, 7)
    out = torch.randn(1, 2, 5, 16, device=device)
    lse = torch.randn(1, 2, 5, device=device)
    with use_backend(backend, device):
        seed = torch.tensor(7)
        torch.library.opcheck(torch.ops.fastdl.attention_forward.default, (q, k, v, None, 0.0, True, 0.25, None))
        torch.library.opcheck(torch.ops.fastdl.attention_forward.default, (q, k, v, mask, 0.2, False, 0.25, seed))
        torch.library.opcheck(torch.ops.fastdl.attention_backward.default,
                              (out, q.detach(), k.detach(), v.detach(), mask, out, lse, 0.2, False, 0.25, seed, True))


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_packed_opcheck(backend, use_backend):
    """The packed self-attention ops on a (B, 3, H, N, D) view of a (B, N, 3·H·D) projection."""
    qkv = torch.randn(2, 5, 3, 2, 8).permute(0, 2, 3, 1, 4).requires_grad_()
    mask = torch.randn(2, 1, 5, 5).expand(2, 2, 5, 5)
    out = torch.randn(2, 5, 2, 8).transpose(1, 2)
    lse = torch.randn(2, 2, 5)
    seed = torch.tensor(3)
    with use_backend(backend, "cpu"):
        torch.library.opcheck(torch.ops.fastdl.attention_packed_forward.default, (qkv, None, 0.0, True, 0.3, None))
        torch.library.opcheck(torch.ops.fastdl.attention_packed_forward.default, (qkv, mask, 0.2, False, 0.3, seed))
        torch.library.opcheck(torch.ops.fastdl.attention_packed_backward.default,
                              (out, qkv.detach(), mask, out, lse, 0.2, False, 0.3, seed, True))
        grad_qkv, _ = torch.ops.fastdl.attention_packed_backward(out, qkv.detach(), None, out, lse, 0.0, True, 0.3,
                                                                 None, False)
    assert grad_qkv.stride() == qkv.stride()  # written in the projection's layout: no stacking copy


def test_torch_compile_fullgraph_with_dropout():
    """The dropout seed is a tensor drawn inside the graph (no .item() graph break)."""
    module = MultiheadAttention(32, 4, dropout=0.3, batch_first=True)
    compiled = torch.compile(lambda x: module(x, x, x, need_weights=False)[0], fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 9, 32, requires_grad=True)
    torch.manual_seed(1)
    y = compiled(x)
    y.sum().backward()
    torch.manual_seed(1)
    torch.testing.assert_close(y, module(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(compiler):
    module = MultiheadAttention(32, 4, batch_first=True)
    compiled = torch.compile(lambda x: module(x, x, x, need_weights=False)[0], fullgraph=True, backend=compiler)
    x = torch.randn(2, 9, 32, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    reference = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    reference.load_state_dict(module.state_dict())
    torch.testing.assert_close(y, reference(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# MultiheadAttention against nn.MultiheadAttention with the same weights, over its whole signature.

# (constructor kwargs, forward kwargs, attention kind): every argument of both signatures at least once.
MHA_CASES = [
    (dict(), dict(need_weights=False), "self"),
    (dict(), dict(need_weights=True), "self"),
    (dict(batch_first=True), dict(need_weights=True, average_attn_weights=False), "cross"),
    (dict(kdim=12, vdim=20), dict(need_weights=False, key_padding_mask="bool"), "cross"),
    (dict(add_bias_kv=True), dict(need_weights=True, key_padding_mask="float", attn_mask="float"), "cross"),
    (dict(add_zero_attn=True), dict(need_weights=False, attn_mask="bool"), "self"),
    (dict(add_bias_kv=True, add_zero_attn=True, batch_first=True), dict(need_weights=False, attn_mask="bool3d"), "cross"),
    (dict(bias=False), dict(need_weights=False, attn_mask="causal", is_causal=True), "self"),
    (dict(), dict(need_weights=True, attn_mask="causal", is_causal=True), "self"),
    (dict(batch_first=True), dict(need_weights=False, attn_mask="causal", is_causal=True, key_padding_mask="bool"), "self"),
    (dict(), dict(need_weights=False), "unbatched"),
    (dict(batch_first=True), dict(need_weights=True, key_padding_mask="bool"), "unbatched"),
    (dict(kdim=12, vdim=20), dict(need_weights=False, attn_mask="bool3d"), "unbatched"),
    (dict(dropout=0.5), dict(need_weights=False, attn_mask="float"), "eval"),
]


def _mha_inputs(kwargs, embed, heads, batch_first, self_attention, unbatched):
    g = _generator(12)
    target, source, batch = 6, 6 if self_attention else 8, 3
    def make(length, dim):
        shape = (length, dim) if unbatched else ((batch, length, dim) if batch_first else (length, batch, dim))
        return torch.randn(shape, dtype=torch.float64, generator=g)
    query = make(target, embed)
    if self_attention:
        key = value = query
    else:
        key, value = make(source, kwargs.get("kdim") or embed), make(source, kwargs.get("vdim") or embed)
    return query, key, value, target, source, batch


def _forward_args(spec, target, source, batch, heads, unbatched):
    g = _generator(13)
    args = dict(spec)
    padding = args.get("key_padding_mask")
    if padding is not None:
        shape = (source,) if unbatched else (batch, source)
        keep = torch.rand(shape, generator=g) > 0.3
        keep[..., 0] = True
        args["key_padding_mask"] = ~keep if padding == "bool" else torch.zeros(shape, dtype=torch.float64).masked_fill(~keep, -1e4)
    mask = args.get("attn_mask")
    if mask == "bool":
        masked = torch.rand(target, source, generator=g) > 0.7
        masked[:, 0] = False
        args["attn_mask"] = masked
    elif mask == "bool3d":
        masked = torch.rand((1 if unbatched else batch) * heads, target, source, generator=g) > 0.7
        masked[..., 0] = False
        args["attn_mask"] = masked
    elif mask == "float":
        args["attn_mask"] = torch.randn(target, source, dtype=torch.float64, generator=g)
    elif mask == "causal":
        args["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(target, dtype=torch.float64)
    return args


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("construct,call,attention", MHA_CASES,
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "-")
def test_multihead_attention_matches_torch(backend, construct, call, attention, use_backend):
    embed, heads = 16, 4
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(embed, heads, dtype=torch.float64, **construct)
    ours = MultiheadAttention(embed, heads, dtype=torch.float64, **construct)
    ours.load_state_dict(theirs.state_dict())
    if attention == "eval":
        ours.eval(), theirs.eval()
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    batch_first = construct.get("batch_first", False)
    unbatched = attention == "unbatched"
    query, key, value, target, source, batch = _mha_inputs(construct, embed, heads, batch_first, attention in ("self", "eval"), unbatched)
    args = _forward_args(call, target, source, batch, heads, unbatched)
    grad = None
    with use_backend(backend, "cpu"):
        results = []
        for module in (ours, theirs):
            module.zero_grad()
            out, weights = module(query, key, value, **args)
            grad = torch.randn(out.shape, dtype=torch.float64, generator=_generator(14)) if grad is None else grad
            out.backward(grad)
            results.append((out.detach(), weights, [p.grad.clone() for p in module.parameters()]))
    (out, weights, grads), (out_t, weights_t, grads_t) = results
    assert_close(out, out_t, name="output")
    assert (weights is None) == (weights_t is None)
    if weights is not None:
        assert_close(weights.detach(), weights_t.detach(), name="weights")
    for (name, _), a, e in zip(ours.named_parameters(), grads, grads_t):
        assert_close(a, e, name=f"grad {name}")


# fp32 on CPU: the projections run on oneDNN (fastdl::linear); compared with torch in fp64.
FP32_MHA_CASES = [
    (dict(batch_first=True), "self"),
    (dict(), "self"),
    (dict(batch_first=True), "cross"),
    (dict(kdim=12, vdim=20, bias=False), "cross"),
]


@pytest.mark.parametrize("construct,attention", FP32_MHA_CASES,
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()) or "-")
def test_multihead_attention_fp32_onednn_projections(construct, attention):
    embed, heads = 16, 4
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(embed, heads, dtype=torch.float64, **construct)
    ours = MultiheadAttention(embed, heads, dtype=torch.float32, **construct)
    ours.load_state_dict(theirs.state_dict())
    inputs = _mha_inputs(construct, embed, heads, construct.get("batch_first", False), attention == "self", False)[:3]
    grad = torch.randn(theirs(*inputs, need_weights=False)[0].shape, dtype=torch.float64, generator=_generator(14))
    results = []
    for module, dtype in ((ours, torch.float32), (theirs, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        if attention == "self":
            leaves = [leaves[0]] * 3
        out, _ = module(*leaves, need_weights=False)
        if module is ours:
            assert "fastdl_linear" in type(out.grad_fn).__name__, "the out-projection did not run on oneDNN"
        grads = torch.autograd.grad(out, list(dict.fromkeys(leaves)) + list(module.parameters()), grad.to(dtype))
        results.append((out, grads))
    (out, grads), (out_t, grads_t) = results
    assert out.dtype == torch.float32
    assert_close(out, out_t, name="output")
    for i, (a, e) in enumerate(zip(grads, grads_t)):
        assert a.dtype == torch.float32
        assert_close(a, e, name=f"grad {i}")


@pytest.mark.parametrize("shape", [(0, 3, 16), (4, 0, 16)], ids=["empty-sequence", "empty-batch"])
def test_multihead_attention_fp32_empty(shape):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(16, 4)
    ours = MultiheadAttention(16, 4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(shape, requires_grad=True)
    out, _ = ours(x, x, x, need_weights=False)
    assert out.shape == theirs(x, x, x, need_weights=False)[0].shape
    out.sum().backward()
    assert torch.equal(ours.in_proj_weight.grad, torch.zeros_like(ours.in_proj_weight))


def _torch_math(fn):
    """``fn`` under torch's math SDPA backend: its flash CPU kernel has no forward-mode AD and no double
    backward, its decomposition supports every transform (and forms δ from fp32 in low precision)."""
    def run(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args, **kwargs)
    return run


# ----------------------------------------------------------------------------------------------------
# Autograd beyond first order: torch.func transforms, forward-mode AD, double backward.

TRANSFORM_CALLS = {
    "full": dict(),
    "causal-gqa": dict(is_causal=True, enable_gqa=True),
    "float-mask": dict(),
}


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("call", list(TRANSFORM_CALLS))
@pytest.mark.parametrize("transform", AUTOGRAD_TRANSFORMS)
def test_autograd_transforms_match_torch(transform, call, dtype, backend, use_backend):
    heads_kv = 1 if call == "causal-gqa" else 2
    inputs = [t.detach() for t in _inputs(1, 2, heads_kv, 3, 4, 4, 3, seed=20)]
    if call == "float-mask":  # the mask is differentiated too
        inputs.append(torch.randn(1, 1, 3, 4, dtype=torch.float64, generator=_generator(21)))
    kwargs = TRANSFORM_CALLS[call]
    with use_backend(backend, "cpu"):
        assert_transform_matches(transform, lambda *t: scaled_dot_product_attention(*t, **kwargs),
                                 _torch_math(lambda *t: F.scaled_dot_product_attention(*t, **kwargs)), inputs, dtype=dtype)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("attention", ["self", "cross"])
@pytest.mark.parametrize("transform", AUTOGRAD_TRANSFORMS)
def test_multihead_attention_autograd_transforms_match_torch(transform, attention, backend, use_backend):
    """functional_call over the module's parameters (the packed self-attention path and the cross-attention
    one), side by side with nn.MultiheadAttention."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours = MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    names = [name for name, _ in theirs.named_parameters()]
    g = _generator(22)
    x, memory = torch.randn(2, 3, 8, dtype=torch.float64, generator=g), torch.randn(2, 4, 8, dtype=torch.float64, generator=g)

    def call(module):
        def run(x, memory, *params):
            source = x if attention == "self" else memory
            return functional_call(module, dict(zip(names, params)), (x, source, source),
                                   dict(need_weights=False))[0]
        return run

    with use_backend(backend, "cpu"):
        assert_transform_matches(transform, call(ours), _torch_math(call(theirs)),
                                 [x, memory, *[p.detach() for p in theirs.parameters()]])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_pytorch_module_and_op_samples(backend, use_backend):
    """PyTorch's own sample inputs for nn.MultiheadAttention (ModuleInfo; eval mode, as dropout draws
    differ) and F.scaled_dot_product_attention (OpInfo, the samples without dropout)."""
    with use_backend(backend, "cpu"):
        for sample in torch_module_samples(torch.nn.MultiheadAttention):
            assert_module_matches_torch(MultiheadAttention, torch.nn.MultiheadAttention, sample, eval_mode=True)
        for sample in torch_op_samples("nn.functional.scaled_dot_product_attention"):
            if sample.kwargs.get("dropout_p", 0.0) == 0.0:
                assert_function_matches_torch(scaled_dot_product_attention, F.scaled_dot_product_attention, sample)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_gradgradcheck_fp64(backend, use_backend):
    q, k, v = _inputs(1, 2, 1, 3, 5, 4, 3, seed=23)
    mask = torch.randn(1, 1, 3, 5, dtype=torch.float64, generator=_generator(24), requires_grad=True)
    module = MultiheadAttention(4, 2, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=_generator(25), requires_grad=True)
    with use_backend(backend, "cpu"):
        assert torch.autograd.gradgradcheck(
            lambda *t: scaled_dot_product_attention(*t, enable_gqa=True), (q, k, v, mask))
        assert torch.autograd.gradgradcheck(
            lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v))
        assert torch.autograd.gradgradcheck(lambda x: module(x, x, x, need_weights=False)[0], (x,))


# ----------------------------------------------------------------------------------------------------
# CausalBias masks, low-precision gradients, output layout.


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")  # torch's, for its fully masked rows
@pytest.mark.parametrize("variant", ["upper-left", "lower-right"])
@pytest.mark.parametrize("nq,nk", [(5, 5), (3, 7), (7, 3)], ids=["square", "wide", "tall"])
def test_causal_bias_mask(backend, device, dtype, variant, nq, nk, use_backend):
    """torch.nn.attention.bias.CausalBias as attn_mask: the causal alignment it names, as torch computes it."""
    make = causal_upper_left if variant == "upper-left" else causal_lower_right
    _compare(backend, device, dtype, _inputs(2, 2, 2, nq, nk, 8, 8, seed=26), use_backend, attn_mask=make(nq, nk))


def test_causal_bias_with_is_causal_raises_like_torch():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError) as theirs:
        F.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(3, 3), is_causal=True)
    with pytest.raises(ValueError) as ours:
        scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(3, 3), is_causal=True)
    assert str(ours.value) == str(theirs.value)


LOW_PRECISION_CASES = [c for c in CASES if c.values[2] in (torch.float16, torch.bfloat16)] + [
    pytest.param("reference", "cpu", dtype, id=f"reference-cpu-{str(dtype)[6:]}") for dtype in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("backend,device,dtype", LOW_PRECISION_CASES)
def test_low_precision_gradients_form_delta_from_the_unrounded_output(backend, device, dtype, use_backend):
    """Values with a large common offset make the output large next to the gradient: δ formed from the
    output rounded to fp16/bf16 then costs most of dQ's accuracy (34× torch's error in bf16). The yardstick
    is torch's math backend in the same dtype, whose softmax backward forms δ in fp32."""
    g = _generator(27)
    q, k = (0.3 * torch.randn(2, 4, 64, 32, dtype=torch.float64, generator=g) for _ in range(2))
    v = 50 + torch.randn(2, 4, 64, 32, dtype=torch.float64, generator=g)
    # Inputs exactly representable in the low precision, so that only the computation's error is measured.
    inputs = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    grad = [torch.randn(2, 4, 64, 32, dtype=torch.float64, generator=g).to(dtype).double()]
    (expected,), expected_grads = outputs_and_grads(F.scaled_dot_product_attention, inputs, grad, dtype=torch.float64)
    (eager,), eager_grads = outputs_and_grads(_torch_math(F.scaled_dot_product_attention), inputs, grad, dtype=dtype,
                                              device=device)
    with use_backend(backend, device):
        (actual,), actual_grads = outputs_and_grads(scaled_dot_product_attention, inputs, grad, dtype=dtype,
                                                    device=device)
    assert_close(actual, expected, eager=eager, name="output")
    for name, a, e, eg in zip("qkv", actual_grads, expected_grads, eager_grads):
        assert_close(a, e, eager=eg, name=f"grad {name}")


def test_triton_forms_delta_from_the_unrounded_output_in_its_interpreter():
    """The Triton kernels in fp16 (Triton's CPU interpreter runs fp16, not bf16) on the data above: the
    forward writes the fp32 output the op gives it, and backward's δ from it keeps dQ several times more
    accurate than δ from the rounded output; the results meet the 2× rule against torch's eager fp16."""
    if fastdl._backends.why_unavailable("triton", "cpu") is not None:
        pytest.skip(fastdl._backends.why_unavailable("triton", "cpu"))
    from fastdl.ops.attention import _output_like, _reference_attention
    from fastdl.triton_kernels.attention import attention_backward, attention_forward

    g = _generator(28)
    q, k = (0.3 * torch.randn(1, 2, 32, 16, dtype=torch.float64, generator=g) for _ in range(2))
    v = 50 + torch.randn(1, 2, 32, 16, dtype=torch.float64, generator=g)
    grad = torch.randn(1, 2, 32, 16, dtype=torch.float64, generator=g)
    q, k, v, grad = (t.half() for t in (q, k, v, grad))
    out = _output_like(q, v)
    lse = attention_forward(q, k, v, None, 0.0, False, 0.25, 0, out)
    assert out.dtype == torch.float32
    # Finer than fp16 can hold (its P·V products take fp16 probabilities, so not fp32-exact either).
    assert relative_error(out, _reference_attention(q, k, v, None, 0.0, False, 0.25, 0)[0]) < torch.finfo(torch.float16).eps / 4
    grads = attention_backward(grad, q, k, v, None, out, lse, 0.0, False, 0.25, 0, False)[:3]
    grad_q_from_rounded = attention_backward(grad, q, k, v, None, out.half().float(), lse, 0.0, False, 0.25, 0, False)[0]
    inputs = [t.double().requires_grad_() for t in (q, k, v)]
    sdpa = lambda *t: F.scaled_dot_product_attention(*t, scale=0.25)  # noqa: E731
    (expected,), expected_grads = outputs_and_grads(sdpa, inputs, [grad.double()])
    (eager,), eager_grads = outputs_and_grads(sdpa, inputs, [grad.double()], dtype=torch.float16)
    assert 4 * relative_error(grads[0], expected_grads[0]) < relative_error(grad_q_from_rounded, expected_grads[0])
    assert_close(out.half(), expected, eager=eager, name="output")
    for name, a, e, eg in zip("qkv", grads, expected_grads, eager_grads):
        assert_close(a, e, eager=eg, name=f"grad {name}")


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_output_is_laid_out_like_torch(backend, device, dtype, use_backend):
    """A contiguous query gives a contiguous output (``.view`` works, as with torch 2.13); a query laid out
    (B, N, H, D) gives an output laid out so too, as torch's."""
    contiguous = torch.randn(2, 3, 5, 8, device=device, dtype=dtype)
    sequence_major = torch.randn(2, 5, 3, 8, device=device, dtype=dtype).transpose(1, 2)
    with use_backend(backend, device):
        for q in (contiguous, sequence_major):
            out = scaled_dot_product_attention(q, q, q)
            assert out.stride() == F.scaled_dot_product_attention(q, q, q).stride()
        scaled_dot_product_attention(contiguous, contiguous, contiguous).view(6, 5, 8)
        rank3 = contiguous[0]
        assert scaled_dot_product_attention(rank3, rank3, rank3).is_contiguous()


# ----------------------------------------------------------------------------------------------------
# MultiheadAttention inside torch's Transformer layers, and torch's errors.


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_layer_in_eval_under_no_grad(batch_first, monkeypatch):
    """nn.TransformerEncoderLayer's fused inference fast path bypasses its self_attn module when its
    conditions hold: with batch_first=False they do not and fastdl's MultiheadAttention runs; with
    batch_first=True (torch 2.13) torch's fused layer runs instead — the same numbers, torch's kernels.
    The fast path's conditions change between releases: this pins down which one runs today."""
    calls = []
    forward = MultiheadAttention.forward
    monkeypatch.setattr(MultiheadAttention, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=batch_first).eval()
    ours = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=batch_first).eval()
    ours.self_attn = MultiheadAttention(16, 4, batch_first=batch_first)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == (0 if batch_first else 1)


MHA_ERRORS = [
    ("is-causal-without-mask", dict(), lambda m, x: m(x, x, x, is_causal=True)),
    ("embed-dim", dict(), lambda m, x: m(x[..., :6], x[..., :6], x[..., :6])),
    ("mask-2d-shape", dict(), lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 2))),
    ("mask-3d-shape", dict(), lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 4, 4))),
    ("key-value-shapes", dict(), lambda m, x: m(x, x, x[:3])),
    ("key-value-batch", dict(kdim=5, vdim=6), lambda m, x: m(x, torch.randn(4, 2, 5), torch.randn(3, 2, 6))),
]


@pytest.mark.parametrize("construct,call", [case[1:] for case in MHA_ERRORS], ids=[case[0] for case in MHA_ERRORS])
def test_multihead_attention_errors_match_torch(construct, call):
    """The exception type and message torch raises (PyTorch's own tests match messages with regexes)."""
    torch.manual_seed(0)
    theirs, ours = torch.nn.MultiheadAttention(8, 2, **construct), MultiheadAttention(8, 2, **construct)
    x = torch.randn(4, 2, 8)
    expected, actual = raised_by(lambda: call(theirs, x)), raised_by(lambda: call(ours, x))
    assert type(actual) is type(expected) and str(actual) == str(expected)


# ----------------------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize(
    "call",
    [
        lambda f: f(torch.randn(4), torch.randn(2, 4), torch.randn(2, 4)),
        lambda f: f(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4).double()),
        lambda f: f(torch.randn(2, 4), torch.randn(2, 5), torch.randn(2, 4)),
        lambda f: f(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4)),
        lambda f: f(torch.randn(1, 6, 2, 4), torch.randn(1, 4, 2, 4), torch.randn(1, 4, 2, 4), enable_gqa=True),
        lambda f: f(torch.randn(1, 6, 2, 4), torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)),
        lambda f: f(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), attn_mask=torch.ones(2, 2, dtype=torch.bool),
                    is_causal=True),
        lambda f: f(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), attn_mask=torch.ones(3, 2)),
        lambda f: f(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), attn_mask=torch.ones(2, 2, dtype=torch.int64)),
        lambda f: f(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), dropout_p=1.5),
        lambda f: f(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4), enable_gqa=True),
        lambda f: f([1.0], torch.randn(2, 4), torch.randn(2, 4)),
    ],
    ids=["rank1", "dtypes", "head-dims", "lengths", "gqa-heads", "heads-no-gqa", "mask-and-causal", "mask-shape",
         "mask-dtype", "dropout", "gqa-rank2", "not-tensor"],
)
def test_bad_input_raises_like_torch(call):
    with pytest.raises(Exception) as theirs:
        call(F.scaled_dot_product_attention)
    with pytest.raises(type(theirs.value)):
        call(scaled_dot_product_attention)


def test_explicit_backend_that_cannot_run_says_why():
    q = torch.randn(1, 1, 2, 4, dtype=torch.float16)
    with fastdl.backend("native"), pytest.raises(NotImplementedError) as info:
        scaled_dot_product_attention(q, q, q)
    message = str(info.value)
    assert "dtype float16 is not supported on cpu" in message
    assert "reference: can run it" in message and "triton:" in message


def test_cpu_kernel_takes_head_dims_above_256(use_backend):
    """Only the GPU kernels stop at 256 (shared memory); the CPU kernel takes any head dim."""
    _compare("native", "cpu", torch.float32, _inputs(1, 2, 1, 5, 9, 320, 300), use_backend, is_causal=True)


# ----------------------------------------------------------------------------------------------------
# Differential fuzzing: random ranks (1–5), broadcast batch dims, head counts (GQA or not), lengths and
# head dims (0 and 1 included), boolean/float/CausalBias masks of every broadcast shape (and shapes that
# do not broadcast, and wrong dtypes), causality, scales, invalid dropout and mixed dtypes, non-contiguous
# queries; on every backend against torch's math SDPA (its decomposition: every shape torch accepts).

FUZZ_CALLS = dict(
    rank=st.integers(1, 5), batch=st.lists(st.integers(1, 2), min_size=2, max_size=2),
    broadcast=st.lists(st.booleans(), min_size=3, max_size=3), heads=st.integers(1, 4), kv_heads=st.integers(1, 4),
    gqa=st.booleans(), nq=st.integers(0, 6), nk=st.integers(0, 6), head_dim=st.integers(0, 6),
    value_dim=st.integers(1, 6), mask=st.sampled_from([None, "bool", "float", "wrong-dtype", "causal-bias"]),
    mask_dims=st.lists(st.booleans(), min_size=4, max_size=4), mask_rank=st.integers(1, 5), is_causal=st.booleans(),
    scale=st.sampled_from([None, 0.3, 2.0]), dropout_p=st.sampled_from([0.0, 0.0, -0.2, 1.5]),
    key_dtype=st.sampled_from(["same", "same", "other"]), layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**31 - 1),
)


def _fuzz_attention(rank, batch, broadcast, heads, kv_heads, gqa, nq, nk, head_dim, value_dim, mask, mask_dims,
                    mask_rank, is_causal, scale, dropout_p, key_dtype, layout, seed):
    # With no query or no key rows torch returns zeros shaped like the query before it broadcasts or checks
    # anything else; fastdl checks and broadcasts always, so those calls are compared where both agree.
    assume((nq > 0 and nk > 0) or (not any(broadcast) and heads == kv_heads and not gqa and key_dtype == "same"
                                   and mask is None))
    g = torch.Generator().manual_seed(seed)
    lead = batch[:max(rank - 3, 0)]
    shapes = [(*lead, heads, nq, head_dim), (*lead, kv_heads, nk, head_dim), (*lead, kv_heads, nk, value_dim)]
    shapes = [shape[len(shape) - rank:] if rank < len(shape) else shape for shape in shapes]
    shapes = [tuple(1 if b and i < len(shape) - 2 else n for i, n in enumerate(shape)) if keep else shape
              for shape, keep, b in zip(shapes, broadcast, (True, True, True))]
    leaves = [torch.randn(layout_leaf_shape(layout, shape) if i == 0 else shape, dtype=torch.float64, generator=g)
              for i, shape in enumerate(shapes)]
    scores = shapes[0][:-1] + (nk,)
    attn_mask = None
    if mask == "causal-bias":
        attn_mask = (causal_upper_left if seed % 2 else causal_lower_right)(nq, nk)
    elif mask is not None:
        mask_shape = tuple(n if keep else 1 for n, keep in zip(scores[-mask_rank:], mask_dims))
        attn_mask = torch.rand(mask_shape, generator=g) > 0.3 if mask == "bool" else torch.randn(
            mask_shape, dtype=torch.float64 if mask == "float" else torch.float16, generator=g)
    float_mask = isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.float64
    if float_mask:
        leaves.append(attn_mask)
    leaves = [t.requires_grad_() for t in leaves]
    kwargs = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa)

    def call(function):
        def run(q, k, v, *float_masks):
            q = with_layout(q, layout, shapes[0])
            if key_dtype == "other":
                k = k.to(torch.float32 if k.dtype == torch.float64 else torch.float64)
            return function(q, k, v, attn_mask=float_masks[0] if float_masks else attn_mask, **kwargs)
        return run

    for backend, dtype in fuzz_backends():
        def ours():
            with fastdl.backend(backend):
                return outputs_and_grads(call(scaled_dot_product_attention), leaves, dtype=dtype)
        assert_like_torch(lambda: outputs_and_grads(_torch_math(call(F.scaled_dot_product_attention)), leaves),
                          ours, assert_same_results)


test_fuzz_matches_torch = fuzz_test(_fuzz_attention, FUZZ_CALLS, examples=25)
test_fuzz_matches_torch_long = fuzz_test(_fuzz_attention, FUZZ_CALLS, examples=25, long=True)


MHA_FUZZ_CALLS = dict(
    heads=st.integers(1, 3), head_dim=st.integers(1, 3), embed_error=st.sampled_from([0, 0, 0, 1]),
    kdim=st.sampled_from([None, 2, 5]), vdim=st.sampled_from([None, 3]), bias=st.booleans(),
    add_bias_kv=st.booleans(), add_zero_attn=st.booleans(), batch_first=st.booleans(),
    attention=st.sampled_from(["self", "cross"]), batched=st.booleans(), target=st.integers(1, 4),
    source=st.integers(1, 4), batch=st.integers(1, 3),
    key_padding_mask=st.sampled_from([None, "bool", "float", "wrong-shape"]),
    attn_mask=st.sampled_from([None, "bool", "float", "3d", "causal", "wrong-shape"]), is_causal=st.booleans(),
    need_weights=st.booleans(), average_attn_weights=st.booleans(), seed=st.integers(0, 2**31 - 1),
)


def _fuzz_multihead_attention(heads, head_dim, embed_error, kdim, vdim, bias, add_bias_kv, add_zero_attn, batch_first,
                              attention, batched, target, source, batch, key_padding_mask, attn_mask, is_causal,
                              need_weights, average_attn_weights, seed):
    embed = heads * head_dim + embed_error
    kwargs = dict(bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim,
                  batch_first=batch_first)
    try:
        torch.manual_seed(seed % 1000)
        theirs = torch.nn.MultiheadAttention(embed, heads, dtype=torch.float64, **kwargs).eval()
    except AssertionError:  # torch's constructor refused it (embed_dim not divisible); ours is that constructor
        return
    ours = MultiheadAttention(embed, heads, dtype=torch.float64, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(seed)
    source = target if attention == "self" else source

    def sequence(length, dim):
        shape = ((batch, length, dim) if batch_first else (length, batch, dim)) if batched else (length, dim)
        return torch.randn(shape, dtype=torch.float64, generator=g)

    query = sequence(target, embed)
    leaves = [query] if attention == "self" else [query, sequence(source, kdim or embed), sequence(source, vdim or embed)]
    forward = dict(need_weights=need_weights, average_attn_weights=average_attn_weights, is_causal=is_causal)
    if key_padding_mask is not None:
        shape = ((batch,) if batched else ()) + (source + (key_padding_mask == "wrong-shape"),)
        keep = torch.rand(shape, generator=g) > 0.3
        keep[..., 0] = True
        forward["key_padding_mask"] = ~keep if key_padding_mask != "float" else torch.zeros(
            shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    if attn_mask == "causal":
        forward["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(target, dtype=torch.float64)[:, :source]
    elif attn_mask is not None:
        shape = {"3d": ((batch if batched else 1) * heads, target, source), "wrong-shape": (target + 1, source)}.get(
            attn_mask, (target, source))
        forward["attn_mask"] = (torch.rand(shape, generator=g) > 0.7 if attn_mask != "float"
                                else torch.randn(shape, dtype=torch.float64, generator=g))
    names = [name for name, _ in theirs.named_parameters()]
    count = len(leaves)
    leaves = [t.requires_grad_() for t in leaves + [p.detach().clone() for p in theirs.parameters()]]

    def call(module):
        def run(*tensors):
            inputs = tensors[:count] * 3 if count == 1 else tensors[:count]
            masks = {k: v.to(tensors[0].dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                     for k, v in forward.items()}
            out, weights = functional_call(module, dict(zip(names, tensors[count:])), inputs, masks)
            return (out,) if weights is None else (out, weights)
        return run

    for backend, dtype in fuzz_backends():
        if dtype != torch.float64:  # the module's parameters have its dtype (as in torch)
            continue
        def run():
            with fastdl.backend(backend):
                return outputs_and_grads(call(ours), leaves, dtype=dtype)
        assert_like_torch(lambda: outputs_and_grads(call(theirs), leaves), run, assert_same_results)


test_fuzz_multihead_attention_matches_torch = fuzz_test(_fuzz_multihead_attention, MHA_FUZZ_CALLS, examples=25)
test_fuzz_multihead_attention_matches_torch_long = fuzz_test(_fuzz_multihead_attention, MHA_FUZZ_CALLS, examples=25,
                                                             long=True)
