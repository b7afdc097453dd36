"""CausalConv1d / causal_conv1d / streaming step on every backend, against
F.conv1d(F.pad(x, (d·(k−1), 0)), w, b, dilation=d, groups=g) in fp64."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.utils.parametrizations import weight_norm
from hypothesis import assume
from hypothesis import strategies as st

import fastdl
from fastdl.ops import CausalConv1d, causal_conv1d, causal_conv1d_step
from fastdl.testing import (AUTOGRAD_TRANSFORMS, FUZZ_LAYOUTS, assert_close, assert_like_torch, assert_same_results,
                            assert_transform_matches, backend_device_cases, cpu_isa_cases, fuzz_backends, fuzz_test,
                            layout_leaf_shape, outputs_and_grads, with_layout)

CASES = backend_device_cases()
FP32_CASES = [c for c in CASES if c.values[2] == torch.float32]


def oracle(x, w, b, dilation, groups):
    return F.conv1d(F.pad(x, (dilation * (w.shape[-1] - 1), 0)), w, b, dilation=dilation, groups=groups)


# (batch, in_channels, out_channels, length, kernel_size, dilation, groups)
SHAPES = [
    (2, 4, 6, 19, 3, 2, 1),     # dense, k=3
    (2, 4, 4, 17, 2, 8, 2),     # groups 2, k=2
    (1, 6, 6, 23, 7, 3, 6),     # depthwise, k=7, batch 1
    (2, 4, 8, 16, 2, 1, 4),     # depthwise with 2 outputs per channel
    (2, 4, 4, 9, 3, 1, 4),      # depthwise k=3
    (2, 3, 5, 7, 5, 4, 1),      # sequence (7) shorter than the receptive field (17)
    (2, 4, 4, 1, 3, 2, 1),      # length 1
    (1, 4, 4, 12, 1, 1, 1),     # k=1: a pointwise conv
    (2, 8, 8, 40, 2, 512, 1),   # dilation 512 past the whole sequence
    (1, 4, 4, 600, 2, 512, 4),  # dilation 512 inside the sequence, depthwise
    (2, 4, 6, 11, 4, 3, 2),     # k=4, groups 2
    (2, 6, 3, 13, 6, 2, 3),     # k=6, groups 3, fewer outputs than inputs
    (1, 80, 72, 9, 2, 3, 1),    # more channels than one Triton tile (64): several channel blocks
]


def _check(backend, device, dtype, x, w, b, dilation, groups, use_backend):
    inputs = [t for t in (x, w, b) if t is not None]
    grad = torch.randn(x.shape[0], w.shape[0], x.shape[-1], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))
    def call(fn):
        return lambda *t: fn(t[0], t[1], t[2] if b is not None else None, dilation, groups)
    expected, expected_grads = outputs_and_grads(call(oracle), inputs, [grad], dtype=torch.float64, device="cpu")
    with use_backend(backend, device):
        actual, actual_grads = outputs_and_grads(call(causal_conv1d), inputs, [grad], dtype=dtype, device=device)
    eager, eager_grads = (None,), (None,) * len(inputs)
    if dtype in (torch.float16, torch.bfloat16):
        eager, eager_grads = outputs_and_grads(call(oracle), inputs, [grad], dtype=dtype, device=device)
    assert actual[0].dtype == dtype and actual[0].device.type == device
    assert_close(actual[0], expected[0], eager=eager[0], name="output")
    for name, a, e, eg in zip(("grad input", "grad weight", "grad bias"), actual_grads, expected_grads, eager_grads):
        assert_close(a, e, eager=eg, name=name)


def _operands(batch, cin, cout, length, k, groups, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, length, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.randn(cout, cin // groups, k, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(cout, dtype=torch.float64, generator=gen).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("batch,cin,cout,length,k,dilation,groups", SHAPES, ids=lambda v: str(v))
def test_matches_torch(backend, device, dtype, batch, cin, cout, length, k, dilation, groups, use_backend):
    x, w, b = _operands(batch, cin, cout, length, k, groups)
    _check(backend, device, dtype, x, w, b, dilation, groups, use_backend)


# Long enough for the native CPU dense kernels' structure and its edges: several register-tile row blocks
# with a partial last one, whole and cut-short tiles, sources reaching before 0 (forward) and past T (∂x),
# more than one 1024-step time chunk, on every instruction set's tile. Native only: the Triton interpreter
# would take minutes here.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("batch,cin,cout,length,k,dilation,groups",
                         [(2, 20, 13, 1100, 3, 5, 1), (1, 12, 18, 300, 2, 64, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("isa", cpu_isa_cases())
def test_native_long_sequences(isa, dtype, batch, cin, cout, length, k, dilation, groups, use_backend):
    x, w, b = _operands(batch, cin, cout, length, k, groups, seed=12)
    _check("native", "cpu", dtype, x, w, b, dilation, groups, use_backend)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_without_bias_and_non_contiguous_input(backend, device, dtype, use_backend):
    x, w, _ = _operands(2, 6, 4, 15, 3, 2, seed=3, bias=False)
    strided = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # (N, T, C) memory
    _check(backend, device, dtype, strided, w, None, 2, 2, use_backend)
    every_other = x.detach().repeat(1, 1, 2)[..., ::2].requires_grad_()
    _check(backend, device, dtype, every_other, w, None, 3, 2, use_backend)


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_unbatched_input(backend, device, dtype, use_backend):
    x, w, b = _operands(1, 4, 5, 10, 3, 1, seed=4)
    with use_backend(backend, device):
        y = causal_conv1d(x[0].to(device, dtype), w.to(device, dtype), b.to(device, dtype), 2)
    assert_close(y, oracle(x, w, b, 2, 1)[0], name="unbatched output")


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
@pytest.mark.parametrize("shape", [(0, 4, 7), (2, 4, 0)])
def test_empty_input(backend, device, dtype, shape, use_backend):
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 2, 3, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    with use_backend(backend, device):
        y = causal_conv1d(x, w, b, 2, 2)
        y.sum().backward()
    assert y.shape == (shape[0], 6, shape[2]) and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
def test_nan_and_inf_propagate_like_torch(backend, device, dtype, use_backend):
    x, w, b = _operands(2, 4, 4, 20, 3, 1, seed=11)
    x = x.detach().clone()
    x[0, 1, 5] = float("nan")
    x[1, 2, 9] = float("inf")
    expected = oracle(x, w, b, 3, 1)
    with use_backend(backend, device):
        actual = causal_conv1d(x.to(device, dtype), w.to(device, dtype), b.to(device, dtype), 3)
    assert_close(actual, expected, name="output with NaN/Inf")


# (in_channels, out_channels, kernel_size, dilation, groups, batch, steps)
STREAMS = [(4, 6, 2, 3, 1, 3, 14), (4, 4, 3, 2, 4, 2, 12), (6, 3, 4, 1, 3, 1, 9), (4, 4, 1, 1, 1, 2, 5),
           (4, 8, 2, 16, 2, 1, 20), (80, 72, 2, 2, 1, 1, 6)]


@pytest.mark.parametrize("backend,device,dtype", CASES)
@pytest.mark.parametrize("cin,cout,k,dilation,groups,batch,steps", STREAMS, ids=lambda v: str(v))
def test_streaming_steps_reproduce_forward(backend, device, dtype, cin, cout, k, dilation, groups, batch, steps,
                                           use_backend):
    torch.manual_seed(5)
    conv = CausalConv1d(cin, cout, k, dilation=dilation, groups=groups).double()
    x = torch.randn(batch, cin, steps, dtype=torch.float64)
    expected = oracle(x, conv.weight, conv.bias, dilation, groups).detach()
    conv = conv.to(device, dtype)
    with use_backend(backend, device):
        state = conv.init_state(batch)
        outputs = []
        for t in range(steps):
            y, state = conv.step(x[:, :, t].to(device, dtype), state)
            outputs.append(y)
    assert state.position == steps
    actual = torch.stack(outputs, dim=-1)
    eager = oracle(x.to(device, dtype), conv.weight, conv.bias, dilation, groups).detach() \
        if dtype in (torch.float16, torch.bfloat16) else None
    assert_close(actual, expected, eager=eager, name="streamed output")


def _stack(module_type, channels, kernel_size, dilations):
    return torch.nn.ModuleList(module_type(channels, channels, kernel_size, dilation=d) for d in dilations)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_dilated_stack_equals_conv1d_twin(backend, use_backend):
    """A 10-layer WaveNet-style stack (dilations 1 … 512, receptive field 1024) against nn.Conv1d layers
    holding the same state_dict, fed the left-padded input; natively also streamed step by step (every
    backend's step is checked against its forward in test_streaming_steps_reproduce_forward)."""
    dilations = [2 ** i for i in range(10)]
    torch.manual_seed(6)
    ours = torch.nn.ModuleList(CausalConv1d(4, 4, 2, dilation=d) for d in dilations).double()
    twin = torch.nn.ModuleList(torch.nn.Conv1d(4, 4, 2, dilation=d) for d in dilations).double()
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 1100, dtype=torch.float64)
    expected = x
    for layer in twin:
        expected = torch.tanh(layer(F.pad(expected, (layer.dilation[0], 0))))
    with use_backend(backend, "cpu"):
        actual = x
        for layer in ours:
            actual = torch.tanh(layer(actual))
    assert_close(actual, expected, name="stack output")
    if backend != "native":
        return
    with use_backend(backend, "cpu"):
        state = [layer.init_state(2) for layer in ours]
        last = None
        for t in range(1100):
            value = x[:, :, t]
            for i, layer in enumerate(ours):
                value, state[i] = layer.step(value, state[i])
                value = torch.tanh(value)
            last = value
    assert_close(last, expected[:, :, -1], name="stack streamed last step")


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_deterministic(backend, device, dtype, use_backend):
    x, w, b = (t.detach().to(device, dtype).requires_grad_() for t in _operands(3, 8, 8, 70, 3, 2, seed=7))
    grad = torch.randn(3, 8, 70, device=device, dtype=dtype)
    runs = []
    with use_backend(backend, device):
        for _ in range(2):
            y = causal_conv1d(x, w, b, 5, 2)
            runs.append((y, *torch.autograd.grad(y, (x, w, b), grad)))
    assert all(torch.equal(a, c) for a, c in zip(*runs))


@pytest.mark.parametrize("isa", cpu_isa_cases())
def test_native_gradcheck_fp64(isa, use_backend):
    with use_backend("native", "cpu"):
        for groups, k, dilation in ((1, 3, 2), (4, 2, 3)):
            x, w, b = _operands(2, 4, 4, 7, k, groups, seed=8)
            assert torch.autograd.gradcheck(lambda *t: causal_conv1d(*t, dilation, groups), (x, w, b))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("transform", AUTOGRAD_TRANSFORMS)
def test_autograd_transforms_match_torch(transform, dtype, backend, use_backend):
    """torch.func transforms (over functional_call of the module), forward-mode AD and double backward give
    the numbers of the same transform over torch's padded Conv1d."""
    module = CausalConv1d(4, 6, 3, dilation=2, groups=2).to(dtype)
    x, w, b = _operands(2, 4, 6, 5, 3, 2, seed=11)
    ours = lambda x, w, b: functional_call(module, {"weight": w, "bias": b}, (x,))  # noqa: E731
    with use_backend(backend, "cpu"):
        assert_transform_matches(transform, ours, lambda x, w, b: oracle(x, w, b, 2, 2), [x, w, b], dtype=dtype)


def test_native_gradgradcheck_fp64(use_backend):
    x, w, b = _operands(2, 4, 4, 6, 3, 2, seed=12)
    with use_backend("native", "cpu"):
        assert torch.autograd.gradgradcheck(lambda *t: causal_conv1d(*t, 2, 2), (x, w, b))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_step_carries_forward_mode_tangents(backend, use_backend):
    """The step under torch.autograd.forward_ad: the tangent of each output step is the causal conv of the
    input's tangent (the op is linear in its input), never a silently dropped zero."""
    from torch.autograd import forward_ad

    torch.manual_seed(14)
    module = CausalConv1d(3, 4, 2, dilation=2)
    x, tangent = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    with use_backend(backend, "cpu"), torch.no_grad(), forward_ad.dual_level():
        state, tangents = module.init_state(2), []
        for t in range(6):
            y, state = module.step(forward_ad.make_dual(x[:, :, t], tangent[:, :, t]), state)
            tangents.append(forward_ad.unpack_dual(y).tangent)
    assert all(t is not None for t in tangents)
    expected = oracle(tangent, module.weight, None, 2, 1)
    torch.testing.assert_close(torch.stack(tangents, dim=-1), expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_step_under_weight_norm(backend, use_backend):
    """WaveNet/TCN code puts weight norm on every conv: step reads the parametrized weight."""
    torch.manual_seed(13)
    module = weight_norm(CausalConv1d(3, 5, 3, dilation=2))
    x = torch.randn(2, 3, 9)
    with use_backend(backend, "cpu"), torch.no_grad():
        expected = oracle(x, module.weight, module.bias, 2, 1)
        state, outputs = module.init_state(2), []
        for t in range(x.shape[-1]):
            y, state = module.step(x[:, :, t], state)
            outputs.append(y)
    torch.testing.assert_close(torch.stack(outputs, dim=-1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_opcheck(backend, use_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b = (t.detach().float().to(device).requires_grad_() for t in _operands(2, 4, 6, 9, 3, 2, seed=9))
    with use_backend(backend, device):
        torch.library.opcheck(torch.ops.fastdl.causal_conv1d.default, (x, w, b, 2, 2))
        torch.library.opcheck(torch.ops.fastdl.causal_conv1d.default, (x, w, None, 1, 2))
        grad = torch.randn(2, 6, 9, device=device)
        torch.library.opcheck(torch.ops.fastdl.causal_conv1d_backward.default, (grad, x.detach(), w.detach(), 2, 2))
        buffer = torch.randn(2, 5, 4, device=device)
        torch.library.opcheck(torch.ops.fastdl.causal_conv1d_step.default,
                              (x.detach()[:, :, 0], buffer, 7, w.detach(), b.detach(), 2, 2))


def test_torch_compile_fullgraph():
    torch.manual_seed(10)
    model = torch.nn.Sequential(CausalConv1d(3, 8, 2, dilation=1), torch.nn.Tanh(), CausalConv1d(8, 8, 3, dilation=4, groups=8))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 30, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    expected = oracle(torch.tanh(oracle(x, model[0].weight, model[0].bias, 1, 1)), model[2].weight, model[2].bias, 4, 8)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-6)
    # The streaming step (an op that updates the state buffer in place) compiles whole as well.
    step = torch.compile(model[2].step, fullgraph=True, backend="aot_eager", dynamic=True)
    hidden = torch.tanh(oracle(x, model[0].weight, model[0].bias, 1, 1)).detach()
    state, outputs = model[2].init_state(2), []
    for t in range(hidden.shape[-1]):
        y, state = step(hidden[:, :, t], state)
        outputs.append(y)
    torch.testing.assert_close(torch.stack(outputs, dim=-1), expected.detach(), rtol=1e-5, atol=1e-6)


def test_module_is_a_drop_in():
    ours, theirs = CausalConv1d(4, 6, 3, dilation=2, groups=2), torch.nn.Conv1d(4, 6, 3, dilation=2, groups=2)
    assert isinstance(ours, torch.nn.Conv1d)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 10)
    torch.testing.assert_close(ours(x), theirs(F.pad(x, (4, 0))), rtol=1e-5, atol=1e-6)
    no_bias = CausalConv1d(4, 4, 2, bias=False)
    assert no_bias.bias is None and set(no_bias.state_dict()) == {"weight"}
    assert ours.receptive_field == 5


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: causal_conv1d(torch.randn(3), torch.randn(2, 3, 2)), RuntimeError),
        (lambda: causal_conv1d(torch.randn(2, 4, 5), torch.randn(2, 3, 2)), RuntimeError),
        (lambda: causal_conv1d(torch.randn(2, 4, 5), torch.randn(2, 4, 2), dilation=0), RuntimeError),
        (lambda: causal_conv1d(torch.randn(2, 4, 5), torch.randn(2, 4, 2), dilation=1.5), TypeError),
        (lambda: causal_conv1d(torch.randn(2, 4, 5), torch.randn(3, 2, 2), groups=2), RuntimeError),
        (lambda: causal_conv1d(torch.randn(2, 4, 5), torch.randn(2, 4, 2), torch.randn(3)), RuntimeError),
        (lambda: causal_conv1d(torch.randn(2, 4, 5), torch.randn(2, 4, 2).double()), RuntimeError),
        (lambda: CausalConv1d(4, 4, 2).step(torch.randn(2, 4), CausalConv1d(4, 4, 3).init_state(2)), RuntimeError),
        (lambda: CausalConv1d(4, 4, 2).step(torch.randn(2, 4, 1), CausalConv1d(4, 4, 2).init_state(2)), RuntimeError),
    ],
    ids=["rank1", "channels", "dilation0", "dilation-float", "groups", "bias-shape", "dtype", "state", "step-rank"],
)
def test_bad_input_raises_like_torch(call, error):
    with pytest.raises(error, match="causal_conv1d"):
        call()


def test_explicit_backend_that_cannot_run_says_why():
    x, w = torch.randn(2, 3, 4, dtype=torch.float16), torch.randn(2, 3, 2, dtype=torch.float16)
    with fastdl.backend("native"), pytest.raises(NotImplementedError) as info:
        causal_conv1d(x, w)
    message = str(info.value)
    assert "dtype float16 is not supported on cpu" in message
    assert "reference: can run it" in message and "triton:" in message


# ----------------------------------------------------------------------------------------------------
# Differential fuzzing: random shapes (0, 1, odd sizes; ranks 1–4), layouts, kernel sizes, dilations and
# groups (the invalid ones included), with and without bias, on every backend against torch's
# Conv1d(padding=d·(k−1)) + chomp (the TCN form, which accepts every length the causal conv does; a
# sequence of length 0 gives an empty output, where torch's convolution refuses it); valid batched calls
# are also streamed step by step.

FUZZ_CALLS = dict(
    rank=st.integers(1, 4), batch=st.integers(0, 3), groups=st.integers(0, 3), per_group=st.integers(1, 3),
    outputs_per_group=st.integers(1, 3), length=st.integers(0, 9), kernel_size=st.integers(1, 4),
    dilation=st.integers(0, 4), bias=st.sampled_from(["yes", "no", "wrong-shape"]),
    channel_error=st.integers(-1, 1), layout=st.sampled_from(FUZZ_LAYOUTS), seed=st.integers(0, 2**31 - 1),
)


def _fuzz_causal_conv(rank, batch, groups, per_group, outputs_per_group, length, kernel_size, dilation, bias,
                      channel_error, layout, seed):
    # torch's convolution skips its checks of dilation and groups for an empty batch; fastdl checks always.
    assume(batch > 0 or (dilation > 0 and groups > 0))
    g = torch.Generator().manual_seed(seed)
    in_channels, out_channels = max(groups, 1) * per_group, max(groups, 1) * outputs_per_group
    shape = [batch, in_channels + channel_error, length][3 - rank:] if rank <= 3 else [1, batch, in_channels, length]
    leaves = [torch.randn(layout_leaf_shape(layout, shape), dtype=torch.float64, generator=g),
              torch.randn(out_channels, per_group, kernel_size, dtype=torch.float64, generator=g)]
    if bias != "no":
        leaves.append(torch.randn(out_channels + (bias == "wrong-shape"), dtype=torch.float64, generator=g))
    leaves = [t.requires_grad_() for t in leaves]

    def tcn(x, w, b=None):
        return F.conv1d(x, w, b, padding=dilation * (kernel_size - 1), dilation=dilation, groups=groups)[..., :length]

    def run(function):
        return lambda x, *parameters: function(with_layout(x, layout, shape), *parameters, dilation=dilation, groups=groups)

    def oracle(*tensors):
        x = with_layout(tensors[0], layout, shape)
        if length == 0 and rank in (2, 3):  # checked by torch first, then answered with an empty output
            tcn(torch.zeros(x.shape[:-1] + (1,), dtype=x.dtype), *tensors[1:])
            return x.new_zeros(x.shape[:-2] + (out_channels, 0)) + 0 * sum(t.sum() for t in tensors)
        return tcn(x, *tensors[1:])

    for backend, dtype in fuzz_backends():
        def ours():
            with fastdl.backend(backend):
                return outputs_and_grads(run(causal_conv1d), leaves, dtype=dtype)
        valid = assert_like_torch(lambda: outputs_and_grads(oracle, leaves), ours, assert_same_results)
        if valid and rank == 3 and batch > 0 and length > 0:
            module = CausalConv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups,
                                  bias=bias == "yes", dtype=dtype)
            with torch.no_grad(), fastdl.backend(backend):
                module.weight.copy_(leaves[1])
                if bias == "yes":
                    module.bias.copy_(leaves[2])
                x = with_layout(leaves[0].detach(), layout, shape).to(dtype)
                state, steps = module.init_state(batch), []
                for t in range(length):
                    y, state = module.step(x[:, :, t], state)
                    steps.append(y)
            assert_close(torch.stack(steps, dim=-1), tcn(*[t.detach() for t in leaves]), name="streamed steps")


test_fuzz_matches_torch = fuzz_test(_fuzz_causal_conv, FUZZ_CALLS, examples=25)
test_fuzz_matches_torch_long = fuzz_test(_fuzz_causal_conv, FUZZ_CALLS, examples=25, long=True)
