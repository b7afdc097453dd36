"""LocalResponseNorm / local_response_norm on every backend against F.local_response_norm in fp64."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import fastdl
from fastdl.ops import LocalResponseNorm, local_response_norm
from fastdl.testing import (AUTOGRAD_TRANSFORMS, FUZZ_LAYOUTS, assert_close, assert_function_matches_torch,
                            assert_like_torch, assert_module_matches_torch, assert_same_results,
                            assert_transform_matches, backend_device_cases, cpu_isa_cases, fuzz_backends, fuzz_test,
                            layout_leaf_shape, outputs_and_grads, torch_module_samples, torch_op_samples, with_layout)

CASES = backend_device_cases()

# (shape, size, alpha, beta, k): AlexNet's two LRN layers (small batch), odd sizes, windows wider than the
# channel count, every rank torch accepts. alpha is large in most cases so that the normalization (and so
# any error in it) is far from negligible.
SHAPES = [
    ((2, 96, 13, 13), 5, 1e-4, 0.75, 2.0),
    ((2, 256, 6, 6), 5, 1e-4, 0.75, 2.0),
    ((2, 96, 7, 9), 5, 0.5, 0.75, 2.0),
    ((3, 7, 5, 3), 1, 0.5, 0.75, 1.0),
    ((3, 7, 5, 3), 2, 0.5, 0.6, 1.0),
    ((3, 7, 5, 3), 4, 0.9, 1.3, 0.5),
    ((3, 7, 5, 3), 7, 0.5, 0.75, 1.0),
    ((2, 3, 4, 4), 7, 0.5, 0.75, 1.0),
    ((2, 5, 11), 3, 0.5, 0.75, 1.0),
    ((2, 6, 3, 4, 5), 3, 0.5, 0.75, 1.0),
    ((1, 1, 1), 5, 0.5, 0.75, 1.0),
]


def _layouts(x):
    """The input as given, channels_last (4-D), and a non-contiguous view with the same values."""
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "strided", x.transpose(-1, -2).contiguous().transpose(-1, -2)


def _check_against_oracle(backend, device, dtype, x, size, alpha, beta, k, use_backend):
    x = x.requires_grad_()
    grad = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    oracle = lambda t: F.local_response_norm(t, size, alpha, beta, k)  # noqa: E731
    (expected,), (expected_grad,) = outputs_and_grads(oracle, [x], [grad], dtype=torch.float64, device="cpu")
    with use_backend(backend, device):
        (actual,), (actual_grad,) = outputs_and_grads(
            lambda t: local_response_norm(t, size, alpha, beta, k), [x], [grad], dtype=dtype, device=device
        )
    eager, eager_grad = None, None
    if dtype in (torch.float16, torch.bfloat16):
        (eager,), (eager_grad,) = outputs_and_grads(oracle, [x], [grad], dtype=dtype, device=device)
    assert actual.dtype == dtype and actual.device.type == device
    assert_close(actual, expected, eager=eager, name="output")
    assert_close(actual_grad, expected_grad, eager=eager_grad, name="grad input")
    return actual


def _matrix():
    """Every case × every shape, except that Triton's CPU interpreter (seconds per channel walk) takes the
    wide AlexNet shapes only in slow runs; on a GPU the triton-cuda cases cover them."""
    for case in CASES:
        backend, device, _ = case.values
        for shape in SHAPES:
            wide = shape[0][1] >= 96
            marks = [*case.marks, *([pytest.mark.slow] if (backend, device) == ("triton", "cpu") and wide else [])]
            yield pytest.param(*case.values, *shape, marks=marks, id=f"{case.id}-{str(shape).replace(' ', '')}")


@pytest.mark.parametrize("backend,device,dtype,shape,size,alpha,beta,k", list(_matrix()))
def test_matches_torch(backend, device, dtype, shape, size, alpha, beta, k, use_backend):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _check_against_oracle(backend, device, dtype, x, size, alpha, beta, k, use_backend)


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[2] in (torch.float32, torch.bfloat16)])
def test_layouts_are_read_in_place_and_kept(backend, device, dtype, use_backend):
    base = torch.randn(2, 9, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for layout, x in _layouts(base):
        actual = _check_against_oracle(backend, device, dtype, x, 3, 0.5, 0.75, 1.0, use_backend)
        if layout == "channels_last":
            assert actual.is_contiguous(memory_format=torch.channels_last), "channels_last input must give channels_last output"


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[2] == torch.float32])
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3), (2, 3, 0, 5)])
def test_empty_input(backend, device, dtype, shape, use_backend):
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    with use_backend(backend, device):
        y = local_response_norm(x, 3)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[2] == torch.float32])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the interpreter
def test_nan_and_inf_propagate_like_torch(backend, device, dtype, use_backend):
    x = torch.randn(2, 8, 3, 3, dtype=dtype)
    x[0, 3, 1, 1] = float("nan")
    x[1, 5, 0, 2] = float("inf")
    expected = F.local_response_norm(x.double(), 3, 0.5, 0.75, 1.0)
    with use_backend(backend, device):
        actual = local_response_norm(x.to(device), 3, 0.5, 0.75, 1.0)
    assert_close(actual, expected, name="output with NaN/Inf")


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[2] == torch.float32])
def test_deterministic(backend, device, dtype, use_backend):
    x = torch.randn(2, 16, 9, 9, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    runs = []
    with use_backend(backend, device):
        for _ in range(2):
            y = local_response_norm(x, 5, 0.5, 0.75, 1.0)
            (dx,) = torch.autograd.grad(y, x, grad)
            runs.append((y, dx))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("isa", cpu_isa_cases())
def test_native_gradcheck_fp64(isa, use_backend):
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    with use_backend("native", "cpu"):
        assert torch.autograd.gradcheck(lambda t: local_response_norm(t, 3, 0.5, 0.75, 1.0), (x,))
        assert torch.autograd.gradcheck(lambda t: local_response_norm(t, 4, 0.9, 1.3, 0.5), (x,))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("transform", AUTOGRAD_TRANSFORMS)
def test_autograd_transforms_match_torch(transform, dtype, backend, use_backend):
    """torch.func transforms, forward-mode AD and double backward give torch's numbers."""
    x = torch.randn(2, 5, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with use_backend(backend, "cpu"):
        assert_transform_matches(transform, lambda t: local_response_norm(t, 3, 0.5, 0.75, 1.0),
                                 lambda t: F.local_response_norm(t, 3, 0.5, 0.75, 1.0), [x], dtype=dtype)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_pytorch_module_and_op_samples(backend, use_backend):
    """PyTorch's own sample inputs for nn.LocalResponseNorm (ModuleInfo) and F.local_response_norm (OpInfo)."""
    with use_backend(backend, "cpu"):
        for sample in torch_module_samples(torch.nn.LocalResponseNorm):
            assert_module_matches_torch(LocalResponseNorm, torch.nn.LocalResponseNorm, sample)
        for sample in torch_op_samples("nn.functional.local_response_norm"):
            assert_function_matches_torch(local_response_norm, F.local_response_norm, sample)


def test_native_gradgradcheck_fp64(use_backend):
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    with use_backend("native", "cpu"):
        assert torch.autograd.gradgradcheck(lambda t: local_response_norm(t, 3, 0.9, 1.3, 0.5), (x,))


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_opcheck(backend, use_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 7, 4, 5, device=device, requires_grad=True)
    grad = torch.randn(2, 7, 4, 5, device=device)
    with use_backend(backend, device):
        torch.library.opcheck(torch.ops.fastdl.local_response_norm.default, (x, 3, 0.5, 0.75, 1.0))
        torch.library.opcheck(torch.ops.fastdl.local_response_norm_backward.default, (grad, x.detach(), 3, 0.5, 0.75, 1.0))
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        torch.library.opcheck(torch.ops.fastdl.local_response_norm.default, (x_cl, 4, 0.5, 0.75, 1.0))


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(compiler):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), LocalResponseNorm(5, 0.5, 0.75, 2.0))
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    expected = torch.nn.Sequential(model[0], model[1], torch.nn.LocalResponseNorm(5, 0.5, 0.75, 2.0))(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_module_is_a_drop_in():
    ours, theirs = LocalResponseNorm(5, alpha=0.5, beta=0.6, k=1.5), torch.nn.LocalResponseNorm(5, alpha=0.5, beta=0.6, k=1.5)
    assert isinstance(ours, torch.nn.LocalResponseNorm)
    assert repr(ours).endswith(repr(theirs)[len("LocalResponseNorm"):])
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 10, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: local_response_norm(torch.randn(3, 4), 2), ValueError),
        (lambda: local_response_norm(torch.randn(3), 2), ValueError),
        (lambda: local_response_norm(torch.randn(2, 3, 4), 0), RuntimeError),
        (lambda: LocalResponseNorm(-1)(torch.randn(2, 3, 4)), RuntimeError),
        (lambda: local_response_norm(torch.randn(2, 3, 4), 2.5), TypeError),
    ],
    ids=["rank2", "rank1", "size0", "size-1", "size-float"],
)
def test_bad_input_raises_like_torch(call, error):
    with pytest.raises(error, match="local_response_norm"):
        call()


def test_explicit_backend_that_cannot_run_says_why():
    x = torch.randn(2, 3, 4, dtype=torch.float16)
    with fastdl.backend("native"), pytest.raises(NotImplementedError) as info:
        local_response_norm(x, 2)
    message = str(info.value)
    assert "dtype float16 is not supported on cpu" in message
    assert "reference: can run it" in message and "triton:" in message


# ----------------------------------------------------------------------------------------------------
# Differential fuzzing: random shapes (0, 1, odd sizes; ranks 1–5, the invalid ones included), layouts,
# windows (≤ 0, wider than the channels, non-int), absurd hyper-parameters and NaN/Inf, on every backend
# against torch: the same exception type where torch raises, torch's numbers where it does not.

FUZZ_CALLS = dict(
    rank=st.integers(1, 5), dims=st.lists(st.integers(0, 5), min_size=5, max_size=5),
    layout=st.sampled_from(FUZZ_LAYOUTS), size=st.one_of(st.integers(-1, 9), st.just(2.5)),
    alpha=st.sampled_from([1e-4, 0.5, 3.0, 1e12]), beta=st.sampled_from([0.0, 0.75, 1.3, -0.5]),
    k=st.sampled_from([0.5, 1.0, 2.0]), special=st.sampled_from([None, "nan", "inf"]), seed=st.integers(0, 2**31 - 1),
)


def _fuzz_local_response_norm(rank, dims, layout, size, alpha, beta, k, special, seed):
    shape = dims[:rank]
    leaf = torch.randn(layout_leaf_shape(layout, shape), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))
    if special and leaf.numel():
        leaf.view(-1)[seed % leaf.numel()] = float(special)
    leaf.requires_grad_()

    def ours(t):
        return local_response_norm(with_layout(t, layout, shape), size, alpha, beta, k)

    def oracle(t):  # contiguous: torch's own fails on non-contiguous 5-D input (a .view in its code)
        return F.local_response_norm(with_layout(t, layout, shape).contiguous(), size, alpha, beta, k)

    for backend, dtype in fuzz_backends():
        def run():
            with fastdl.backend(backend):
                return outputs_and_grads(ours, [leaf], dtype=dtype)
        assert_like_torch(lambda: outputs_and_grads(oracle, [leaf]), run, assert_same_results)


test_fuzz_matches_torch = fuzz_test(_fuzz_local_response_norm, FUZZ_CALLS, examples=25)
test_fuzz_matches_torch_long = fuzz_test(_fuzz_local_response_norm, FUZZ_CALLS, examples=25, long=True)
