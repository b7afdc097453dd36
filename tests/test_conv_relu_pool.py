"""ConvReLUPool2d / conv_relu_pool2d / fuse_conv_relu_pool on every backend against
nn.Sequential(nn.Conv2d, nn.ReLU, nn.MaxPool2d) in fp64."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm
from torch.nn.utils.parametrizations import weight_norm

import fastdl
from fastdl.ops import ConvReLUPool2d, conv_relu_pool2d, fuse_conv_relu_pool, spectral_norm
from fastdl.ops.conv_relu_pool import pooled_size
from fastdl.testing import (AUTOGRAD_TRANSFORMS, assert_close, assert_like_torch, assert_same_results,
                            assert_transform_matches, backend_device_cases, cpu_isa_cases, fuzz_backends, fuzz_test,
                            layout_leaf_shape, outputs_and_grads, with_layout)

CASES = backend_device_cases()
FP32_CASES = [c for c in CASES if c.values[2] == torch.float32]

# (name, input shape, conv kwargs, pool kwargs): the blocks that end in a pool in LeNet-5, AlexNet
# (grouped conv2 as in the original two-GPU model), ZFNet and VGG16, spatially shrunk where the full size
# would only slow the test down; then odd sizes, ceil_mode, pool padding and dilation, conv dilation, a
# window too big for int8 offsets, a 1x1 output.
LAYERS = [
    ("lenet5-c1", (1, 1, 32, 32), dict(out_channels=6, kernel_size=5), dict(kernel_size=2)),
    ("lenet5-c3", (2, 6, 14, 14), dict(out_channels=16, kernel_size=5), dict(kernel_size=2)),
    ("alexnet-conv1", (2, 3, 67, 67), dict(out_channels=96, kernel_size=11, stride=4, padding=2), dict(kernel_size=3, stride=2)),
    ("alexnet-conv2-groups2", (1, 96, 13, 13), dict(out_channels=128, kernel_size=5, padding=2, groups=2), dict(kernel_size=3, stride=2)),
    ("alexnet-conv5", (1, 192, 13, 13), dict(out_channels=128, kernel_size=3, padding=1), dict(kernel_size=3, stride=2)),
    ("zfnet-conv1", (1, 3, 59, 59), dict(out_channels=96, kernel_size=7, stride=2, padding=1), dict(kernel_size=3, stride=2, padding=1)),
    ("vgg16-block1", (1, 64, 16, 16), dict(out_channels=64, kernel_size=3, padding=1), dict(kernel_size=2, stride=2)),
    ("vgg16-block5", (1, 512, 6, 6), dict(out_channels=512, kernel_size=3, padding=1), dict(kernel_size=2, stride=2)),
    ("odd-ceil-poolpad", (2, 5, 13, 11), dict(out_channels=7, kernel_size=3, padding=1, dilation=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ("odd-ceil-2x2", (3, 4, 9, 7), dict(out_channels=5, kernel_size=(2, 3), stride=(1, 2)), dict(kernel_size=2, ceil_mode=True)),
    ("pool-dilation", (2, 4, 15, 14), dict(out_channels=6, kernel_size=3, bias=False), dict(kernel_size=3, stride=2, dilation=2)),
    ("int16-window", (1, 2, 18, 17), dict(out_channels=3, kernel_size=3), dict(kernel_size=(12, 11), stride=3, padding=5)),
    ("one-output", (2, 3, 5, 5), dict(out_channels=4, kernel_size=3), dict(kernel_size=3)),
]


def _torch_block(in_channels, conv_kwargs, pool_kwargs, dtype=torch.float64):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, dtype=dtype, **conv_kwargs)
    with torch.no_grad():  # bias spread like the activations so the ReLU clips a real fraction
        if conv.bias is not None:
            conv.bias.normal_(0, 0.3)
    return nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(**pool_kwargs))


def _fused_args(block):
    conv, _, pool = block
    pool_stride = pool.stride if pool.stride is not None else pool.kernel_size
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                pool_kernel_size=pool.kernel_size, pool_stride=pool_stride, pool_padding=pool.padding,
                ceil_mode=pool.ceil_mode, pool_dilation=pool.dilation)


def _check(backend, device, dtype, block, x, use_backend, grad_seed=1):
    conv = block[0]
    params = [x.requires_grad_(), conv.weight] + ([conv.bias] if conv.bias is not None else [])
    expected_out = block(x)
    grad = torch.randn(expected_out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(grad_seed))
    args = _fused_args(block)

    def oracle(x, w, b=None):
        return F.max_pool2d(F.relu(F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)),
                            args["pool_kernel_size"], args["pool_stride"], args["pool_padding"],
                            args["pool_dilation"], args["ceil_mode"])

    def fused(x, w, b=None):
        return conv_relu_pool2d(x, w, b, **args)

    (expected,), expected_grads = outputs_and_grads(oracle, params, [grad], dtype=torch.float64, device="cpu")
    with use_backend(backend, device):
        (actual,), actual_grads = outputs_and_grads(fused, params, [grad], dtype=dtype, device=device)
    eager, eager_grads = None, [None] * len(params)
    if dtype in (torch.float16, torch.bfloat16):
        (eager,), eager_grads = outputs_and_grads(oracle, params, [grad], dtype=dtype, device=device)
    assert actual.dtype == dtype and actual.device.type == device
    assert_close(actual, expected, eager=eager, name="output")
    for name, a, e, eg in zip(["grad input", "grad weight", "grad bias"], actual_grads, expected_grads, eager_grads):
        assert_close(a, e, eager=eg, name=name)
    return actual, actual_grads


# Triton's CPU interpreter runs the implicit-GEMM loop step by step in numpy: the wide layers take it tens
# of seconds, so there they run only with the slow tests (the GPU run sets FASTDL_SLOW_TESTS=1).
WIDE_FOR_THE_INTERPRETER = {"alexnet-conv2-groups2", "alexnet-conv5", "vgg16-block5"}
MATCH_CASES = [
    pytest.param(*case.values, *layer, id=f"{layer[0]}-{case.id}",
                 marks=list(case.marks) + ([pytest.mark.slow] if case.id == "triton-cpu-float32"
                                           and layer[0] in WIDE_FOR_THE_INTERPRETER else []))
    for layer in LAYERS for case in CASES
]


@pytest.mark.parametrize("backend,device,dtype,name,shape,conv_kwargs,pool_kwargs", MATCH_CASES)
def test_matches_torch(backend, device, dtype, name, shape, conv_kwargs, pool_kwargs, use_backend):
    block = _torch_block(shape[1], conv_kwargs, pool_kwargs)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _check(backend, device, dtype, block, x, use_backend)


@pytest.mark.parametrize("backend,device,dtype", [c for c in CASES if c.values[2] in (torch.float32, torch.bfloat16)])
def test_layouts_are_read_in_place_and_kept(backend, device, dtype, use_backend):
    block = _torch_block(6, dict(out_channels=10, kernel_size=3, padding=1), dict(kernel_size=3, stride=2))
    base = torch.randn(2, 6, 11, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layouts = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "strided": base.transpose(-1, -2).contiguous().transpose(-1, -2),
    }
    for layout, x in layouts.items():
        actual, grads = _check(backend, device, dtype, block, x, use_backend)
        if layout == "channels_last":
            assert actual.is_contiguous(memory_format=torch.channels_last), "channels_last in → channels_last out"
            assert grads[0].is_contiguous(memory_format=torch.channels_last), "grad input keeps the input's layout"


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_argmax_is_compact_and_carries_the_relu_mask(backend, device, dtype, use_backend):
    x = torch.randn(2, 3, 12, 12, device=device)
    w = torch.randn(5, 3, 3, 3, device=device)
    b = torch.linspace(-12, 4, 5, device=device)  # some channels clipped by the ReLU, some not
    params = ([1, 1], [0, 0], [1, 1], 1, [3, 3], [2, 2], [0, 0], [1, 1], False)
    with use_backend(backend, device):
        output, argmax = torch.ops.fastdl.conv_relu_pool2d(x, w, b, *params)
    with fastdl.backend("reference"):
        expected_output, expected_argmax = torch.ops.fastdl.conv_relu_pool2d(x, w, b, *params)
    assert argmax.dtype == torch.int8
    assert torch.equal(argmax, expected_argmax)
    assert torch.equal(argmax < 0, output <= 0) and (argmax < 0).any() and (argmax >= 0).any()
    assert int(argmax.max()) < 9


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_nan_and_inf_propagate_like_torch(backend, device, dtype, use_backend):
    x = torch.randn(2, 3, 9, 9, dtype=dtype)
    x[0, 1, 4, 4] = float("nan")
    x[1, 2, 0, 0] = float("inf")
    w = torch.randn(4, 3, 3, 3, dtype=dtype)
    expected = F.max_pool2d(F.relu(F.conv2d(x.double(), w.double())), 2)
    with use_backend(backend, device):
        actual = conv_relu_pool2d(x.to(device), w.to(device), pool_kernel_size=2)
    assert_close(actual, expected, name="output with NaN/Inf")


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_empty_batch(backend, device, dtype, use_backend):
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    with use_backend(backend, device):
        y = conv_relu_pool2d(x, w, b, pool_kernel_size=2)
        y.sum().backward()
    assert y.shape == (0, 4, 3, 3) and x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_deterministic(backend, device, dtype, use_backend):
    x = torch.randn(3, 8, 17, 17, device=device, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    grad = torch.randn(3, 16, 7, 7, device=device)
    runs = []
    with use_backend(backend, device):
        for _ in range(2):
            y = conv_relu_pool2d(x, w, b, pool_kernel_size=3, pool_stride=2)
            runs.append((y,) + torch.autograd.grad(y, (x, w, b), grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend,device,dtype", FP32_CASES)
def test_only_the_gradients_asked_for(backend, device, dtype, use_backend):
    x = torch.randn(2, 3, 10, 10, device=device)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device)
    with use_backend(backend, device):
        y = conv_relu_pool2d(x, w, b, pool_kernel_size=2)
        (grad_w,) = torch.autograd.grad(y.sum(), [w])
    expected = torch.autograd.grad(F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2).sum(), [w])[0]
    torch.testing.assert_close(grad_w, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", cpu_isa_cases())
def test_native_gradcheck_fp64(isa, use_backend):
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with use_backend("native", "cpu"):
        assert torch.autograd.gradcheck(lambda *t: conv_relu_pool2d(*t, padding=1, pool_kernel_size=3, pool_stride=2,
                                                                    pool_padding=1, ceil_mode=True), (x, w, b))
        assert torch.autograd.gradcheck(lambda *t: conv_relu_pool2d(*t, pool_kernel_size=2), (x, w, b))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("transform", AUTOGRAD_TRANSFORMS)
def test_autograd_transforms_match_torch(transform, dtype, backend, use_backend):
    """torch.func transforms (over functional_call of the module), forward-mode AD and double backward give
    the numbers of the same transform over Conv2d → ReLU → MaxPool2d."""
    module = ConvReLUPool2d(2, 3, 3, padding=1, pool_kernel_size=3, pool_stride=2, ceil_mode=True).to(dtype)
    g = torch.Generator().manual_seed(14)
    x, w, b = (torch.randn(shape, dtype=torch.float64, generator=g) for shape in ((2, 2, 6, 5), (3, 2, 3, 3), (3,)))

    def oracle(x, w, b):
        return F.max_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), 3, 2, ceil_mode=True)

    ours = lambda x, w, b: functional_call(module, {"weight": w, "bias": b}, (x,))  # noqa: E731
    with use_backend(backend, "cpu"):
        assert_transform_matches(transform, ours, oracle, [x, w, b], dtype=dtype)


def test_native_gradgradcheck_fp64(use_backend):
    g = torch.Generator().manual_seed(15)
    x, w, b = (torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
               for shape in ((1, 2, 7, 6), (3, 2, 3, 3), (3,)))
    with use_backend("native", "cpu"):
        assert torch.autograd.gradgradcheck(lambda *t: conv_relu_pool2d(*t, padding=1, pool_kernel_size=2), (x, w, b))


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_opcheck(backend, use_backend):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 4, 8, 7, device=device, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    params = ([1, 1], [1, 1], [1, 1], 2, [3, 3], [2, 2], [1, 1], [1, 1], True)
    with use_backend(backend, device):
        torch.library.opcheck(torch.ops.fastdl.conv_relu_pool2d.default, (x, w, b) + params)
        x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        torch.library.opcheck(torch.ops.fastdl.conv_relu_pool2d.default, (x_cl, w, None) + params)
        _, argmax = torch.ops.fastdl.conv_relu_pool2d(x.detach(), w.detach(), b.detach(), *params)
        grad = torch.randn(argmax.shape, device=device)
        torch.library.opcheck(torch.ops.fastdl.conv_relu_pool2d_backward.default,
                              (grad, argmax, x.detach(), w.detach(), True, True, True) + params)
        torch.library.opcheck(torch.ops.fastdl.conv_relu_pool2d_backward.default,
                              (grad, argmax, x.detach(), w.detach(), False, False, True) + params)


def test_torch_compile_fullgraph():
    model = nn.Sequential(ConvReLUPool2d(3, 8, 3, padding=1, pool_kernel_size=3, pool_stride=2), nn.Flatten())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    y = compiled(x)
    (grad_x,) = torch.autograd.grad(y.sum(), [x])
    conv = model[0]
    expected = F.max_pool2d(F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)), 3, 2).flatten(1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, torch.autograd.grad(expected.sum(), [x])[0], rtol=1e-5, atol=1e-6)


def test_module_is_a_drop_in_conv2d():
    torch.manual_seed(0)
    ours = ConvReLUPool2d(4, 6, 3, stride=1, padding=1, groups=2, pool_kernel_size=3, pool_stride=2, ceil_mode=True)
    torch.manual_seed(0)
    theirs = nn.Conv2d(4, 6, 3, stride=1, padding=1, groups=2)
    assert isinstance(ours, nn.Conv2d)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias), "same init"
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert "pool_kernel_size=(3, 3)" in repr(ours) and "ceil_mode=True" in repr(ours)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(ours(x), F.max_pool2d(F.relu(theirs(x)), 3, 2, ceil_mode=True), rtol=1e-5, atol=1e-6)
    unbatched = x[0]
    torch.testing.assert_close(ours(unbatched), ours(x[:1])[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding,padding_mode", [("same", "zeros"), ("valid", "zeros"), (1, "reflect"),
                                                  (2, "circular"), ("same", "replicate")])
def test_module_padding_variants(padding, padding_mode):
    torch.manual_seed(0)
    ours = ConvReLUPool2d(3, 5, (4, 3), padding=padding, padding_mode=padding_mode, pool_kernel_size=2)
    theirs = nn.Conv2d(3, 5, (4, 3), padding=padding, padding_mode=padding_mode)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 10, 9)
    torch.testing.assert_close(ours(x), F.max_pool2d(F.relu(theirs(x)), 2), rtol=1e-5, atol=1e-6)


def test_from_modules_shares_parameters():
    conv, pool = nn.Conv2d(3, 8, 5, stride=2), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
    fused = ConvReLUPool2d.from_modules(conv, pool)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert (fused.pool_kernel_size, fused.pool_stride, fused.pool_padding, fused.ceil_mode) == ((3, 3), (2, 2), (1, 1), True)
    x = torch.randn(2, 3, 31, 31)
    torch.testing.assert_close(fused(x), pool(F.relu(conv(x))), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="pool"):
        ConvReLUPool2d.from_modules(conv, nn.AvgPool2d(2))
    with pytest.raises(ValueError, match="return_indices"):
        ConvReLUPool2d.from_modules(conv, nn.MaxPool2d(2, return_indices=True))


def _alexnet_like():
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(3, 16, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 24, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        ),
        nn.Flatten(), nn.Linear(32, 10),
    )


def _vgg_like():
    def block(cin, cout, convs):
        layers = []
        for i in range(convs):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1), nn.ReLU(inplace=True)]
        return layers + [nn.MaxPool2d(2, 2)]

    features = nn.Sequential(*block(3, 8, 2), *block(8, 16, 2), *block(16, 16, 3))
    return nn.Sequential(features, nn.Flatten(), nn.Linear(16 * 2 * 2, 5))


@pytest.mark.parametrize("make,shape,fused_count", [(_alexnet_like, (2, 3, 67, 67), 3), (_vgg_like, (2, 3, 16, 16), 3)],
                         ids=["alexnet-like", "vgg-like"])
def test_fuse_conv_relu_pool_keeps_outputs_gradients_and_state(make, shape, fused_count):
    torch.manual_seed(0)
    original = make().double()
    model = make().double()
    model.load_state_dict(original.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_conv_relu_pool(model) is model
    assert sum(isinstance(m, ConvReLUPool2d) for m in model.modules()) == fused_count
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(shape, dtype=torch.float64)
    expected, actual = original(x), model(x)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(actual.sum(), list(model.parameters()))
    expected_grads = torch.autograd.grad(expected.sum(), list(original.parameters()))
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    original.load_state_dict(model.state_dict())


@pytest.mark.parametrize("parametrization", ["fastdl-spectral-norm", "torch-spectral-norm", "weight-norm"])
def test_fuse_keeps_parametrizations(parametrization):
    apply = {"fastdl-spectral-norm": spectral_norm, "torch-spectral-norm": torch_spectral_norm,
             "weight-norm": weight_norm}[parametrization]
    torch.manual_seed(0)
    original = nn.Sequential(apply(nn.Conv2d(3, 8, 3, padding=1).double()), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    model = nn.Sequential(apply(nn.Conv2d(3, 8, 3, padding=1).double()), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    model.load_state_dict(original.state_dict())
    conv = model[0]
    fuse_conv_relu_pool(model)
    fused = model[0]
    assert isinstance(fused, ConvReLUPool2d) and parametrize.is_parametrized(fused, "weight")
    assert fused.parametrizations.weight is conv.parametrizations.weight, "the parametrization is shared, not copied"
    assert list(model.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):  # training steps: spectral norm's power iteration updates its buffers each time
        expected, actual = original(x), model(x)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad(actual.sum(), list(model.parameters()))
        for a, e in zip(grads, torch.autograd.grad(expected.sum(), list(original.parameters()))):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.state_dict(), original.state_dict(), rtol=1e-10, atol=1e-12)
    parametrize.remove_parametrizations(fused, "weight")
    assert type(fused) is ConvReLUPool2d and isinstance(fused.weight, nn.Parameter)


def test_fuse_keeps_hooks():
    """A conv's forward pre-hooks move with it; a run with hooks that would see the ReLU's or the pool's
    tensors, or the conv's output, is not fused, so those hooks keep running with their usual arguments."""
    torch.manual_seed(0)
    seen = []
    pre_hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    pre_hooked[0].register_forward_pre_hook(lambda module, args: seen.append(("pre", args[0].shape)))
    pooled_hooked = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    pooled_hooked[2].register_forward_hook(lambda module, args, out: seen.append(("pool", out.shape)))
    conv_hooked = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    conv_hooked[0].register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(("conv-backward",)))
    model = nn.Sequential(pre_hooked, pooled_hooked, conv_hooked)
    fuse_conv_relu_pool(model)
    assert isinstance(pre_hooked[0], ConvReLUPool2d)
    assert type(pooled_hooked[0]) is nn.Conv2d and type(conv_hooked[0]) is nn.Conv2d
    x = torch.randn(1, 3, 30, 30, requires_grad=True)
    model(x).sum().backward()
    assert seen == [("pre", (1, 3, 30, 30)), ("pool", (1, 4, 6, 6)), ("conv-backward",)]
    with pytest.raises(ValueError, match="backward hooks"):
        ConvReLUPool2d.from_modules(conv_hooked[0], conv_hooked[2])


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: conv_relu_pool2d(torch.randn(3, 4), torch.randn(2, 3, 1, 1)), RuntimeError, "3-D"),
        (lambda: conv_relu_pool2d(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3)), RuntimeError, "weight"),
        (lambda: conv_relu_pool2d(torch.randn(1, 4, 8, 8), torch.randn(2, 3, 3, 3)), RuntimeError, "channels"),
        (lambda: conv_relu_pool2d(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3), torch.randn(3)), RuntimeError, "bias"),
        (lambda: conv_relu_pool2d(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3).double()), RuntimeError, "dtype"),
        (lambda: conv_relu_pool2d(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3), stride=0), RuntimeError, "stride"),
        (lambda: conv_relu_pool2d(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3), pool_kernel_size=2, pool_padding=2),
         RuntimeError, "pool_padding"),
        (lambda: conv_relu_pool2d(torch.randn(1, 3, 4, 4), torch.randn(2, 3, 3, 3), pool_kernel_size=3), RuntimeError, "too small"),
        (lambda: conv_relu_pool2d(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3), pool_kernel_size=2.5), TypeError, "pool_kernel_size"),
        (lambda: conv_relu_pool2d(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3), stride=2, padding="same"), RuntimeError, "same"),
    ],
    ids=["rank2", "weight-rank3", "channels", "bias-shape", "dtype-mismatch", "stride0", "pool-padding", "too-small",
         "kernel-float", "same-strided"],
)
def test_bad_input_raises_like_torch(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_explicit_backend_that_cannot_run_says_why():
    x, w = torch.randn(1, 3, 8, 8, dtype=torch.float16), torch.randn(2, 3, 3, 3, dtype=torch.float16)
    with fastdl.backend("native"), pytest.raises(NotImplementedError) as info:
        conv_relu_pool2d(x, w)
    message = str(info.value)
    assert "dtype float16 is not supported on cpu" in message
    assert "reference: can run it" in message and "triton:" in message


# ----------------------------------------------------------------------------------------------------
# Differential fuzzing: random shapes (0, 1, odd sizes; ranks 2–5), layouts, every convolution and pooling
# hyper-parameter (strings, zeros, padding past half the window, windows past the input: the invalid ones
# included), on every backend against Conv2d → ReLU → MaxPool2d. Gradients are compared in fp64, where the
# window maxima are the oracle's; in fp32 a near-tie may pick another element, as torch's fp32 may.

def _window_in_padding_only(height, width, kernel, stride, padding, dilation, pool_kernel, pool_stride,
                            pool_padding, pool_dilation, ceil_mode) -> bool:
    """Whether some pooling window lies wholly in the pooling's padding: torch 2.13's max_pool2d backward
    then writes out of bounds (heap corruption, an abort), so the oracle cannot run such calls."""
    pads = (0, 0) if isinstance(padding, str) else (padding, padding) if isinstance(padding, int) else padding
    for size, k, p in zip((height, width), kernel, pads):
        conv = size if padding == "same" else (size + 2 * p - dilation * (k - 1) - 1) // max(stride, 1) + 1
        if conv < 1:
            return False
        pooled = pooled_size(conv, pool_kernel, pool_stride or pool_kernel, pool_padding, pool_dilation, ceil_mode)
        for o in range(max(pooled, 0)):
            start = o * (pool_stride or pool_kernel) - pool_padding
            if all(not 0 <= start + i * pool_dilation < conv for i in range(pool_kernel)):
                return True
    return False


FUZZ_CALLS = dict(
    rank=st.integers(2, 5), batch=st.integers(0, 2), groups=st.integers(0, 2), per_group=st.integers(1, 3),
    outputs_per_group=st.integers(1, 3), height=st.integers(1, 9), width=st.integers(1, 9),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), stride=st.integers(0, 3),
    padding=st.sampled_from([0, 1, 2, (1, 0), "same", "valid"]), dilation=st.integers(1, 2), bias=st.booleans(),
    pool_kernel=st.integers(1, 3), pool_stride=st.sampled_from([None, 1, 2, 3]), pool_padding=st.integers(0, 2),
    pool_dilation=st.integers(1, 2), ceil_mode=st.booleans(),
    layout=st.sampled_from(["contiguous", "channels_last", "transposed", "expanded"]), seed=st.integers(0, 2**31 - 1),
)


def _fuzz_conv_relu_pool(rank, batch, groups, per_group, outputs_per_group, height, width, kernel, stride, padding,
                         dilation, bias, pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode, layout,
                         seed):
    assume(not _window_in_padding_only(height, width, kernel, stride, padding, dilation, pool_kernel, pool_stride,
                                       pool_padding, pool_dilation, ceil_mode))
    g = torch.Generator().manual_seed(seed)
    in_channels, out_channels = max(groups, 1) * per_group, max(groups, 1) * outputs_per_group
    shape = [batch, in_channels, height, width][4 - rank:] if rank <= 4 else [1, batch, in_channels, height, width]
    leaves = [torch.randn(layout_leaf_shape(layout, shape), dtype=torch.float64, generator=g),
              torch.randn(out_channels, per_group, *kernel, dtype=torch.float64, generator=g)]
    if bias:
        leaves.append(0.3 * torch.randn(out_channels, dtype=torch.float64, generator=g))
    leaves = [t.requires_grad_() for t in leaves]
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    pool = (pool_kernel, pool_stride, pool_padding, pool_dilation, ceil_mode)

    def ours(x, w, b=None):
        return conv_relu_pool2d(with_layout(x, layout, shape), w, b, **conv, pool_kernel_size=pool_kernel,
                                pool_stride=pool_stride, pool_padding=pool_padding, ceil_mode=ceil_mode,
                                pool_dilation=pool_dilation)

    def oracle(x, w, b=None):
        return F.max_pool2d(F.relu(F.conv2d(with_layout(x, layout, shape), w, b, **conv)), *pool)

    for backend, dtype in fuzz_backends():
        def run():
            with fastdl.backend(backend):
                results = outputs_and_grads(ours, leaves, dtype=dtype)
            return results if dtype == torch.float64 else (results[0], ())

        assert_like_torch(lambda: outputs_and_grads(oracle, leaves), run, assert_same_results)


test_fuzz_matches_torch = fuzz_test(_fuzz_conv_relu_pool, FUZZ_CALLS, examples=25)
test_fuzz_matches_torch_long = fuzz_test(_fuzz_conv_relu_pool, FUZZ_CALLS, examples=25, long=True)
