"""Conv2d → ReLU → MaxPool2d blocks: eager nn.Sequential, torch.compile of it, and fastdl's
ConvReLUPool2d on each backend, forward and forward+backward, on the blocks of AlexNet (conv1, conv2 with
its two groups, conv5) and VGG16 (first and last block).

What each fastdl backend runs: native CPU = oneDNN convolution + one fused C++ pass for bias, ReLU, pool
and argmax, and in backward a sparse convolution backward from the argmax (oneDNN's dense one where the
filters outgrow the cache: VGG16 block 5); native CUDA = cuDNN convolution + one fused CUDA epilogue kernel; triton =
an implicit-GEMM convolution with bias, ReLU and pooling in its epilogue (the conv output is never stored). The first layer's input needs no gradient in
training (it is the image), so the conv1 forward+backward cases differentiate the parameters only; the
others differentiate the input too. The notes give what autograd keeps for backward (MB, all saved
tensors counted once) and, on GPU, the peak memory of the call.
"""
import pytest
import torch
from torch import nn

import fastdl
from conftest import fastdl_impls
from fastdl.ops import ConvReLUPool2d

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
TRAIN_BATCH = 128 if ON_GPU else 16

# name: (in_channels, spatial size, conv kwargs, pool (kernel, stride), input needs grad)
LAYERS = {
    "alexnet-conv1": (3, 227, dict(out_channels=96, kernel_size=11, stride=4), (3, 2), False),
    "alexnet-conv2": (96, 27, dict(out_channels=256, kernel_size=5, padding=2, groups=2), (3, 2), True),
    "alexnet-conv5": (384, 13, dict(out_channels=256, kernel_size=3, padding=1, groups=2), (3, 2), True),
    "vgg16-block1": (64, 224, dict(out_channels=64, kernel_size=3, padding=1), (2, 2), True),
    "vgg16-block5": (512, 14, dict(out_channels=512, kernel_size=3, padding=1), (2, 2), True),
}
# (layer, batch, forward+backward): on this CPU the targets (conv1, conv2 at training batch) in
# both directions, every layer at batch 1, within a few minutes; on GPU everything at both batches.
if ON_GPU:
    CASES = [(layer, batch, training) for layer in LAYERS for batch in (1, TRAIN_BATCH) for training in (False, True)]
    DTYPES = [torch.bfloat16, torch.float32]
else:
    CASES = [("alexnet-conv1", TRAIN_BATCH, False), ("alexnet-conv1", TRAIN_BATCH, True),
             ("alexnet-conv2", TRAIN_BATCH, False), ("alexnet-conv2", TRAIN_BATCH, True)]
    CASES += [(layer, 1, False) for layer in LAYERS] + [("vgg16-block5", TRAIN_BATCH, True)]
    DTYPES = [torch.float32]
IMPLS = ["eager", "compile"] + fastdl_impls(DEVICE)


def _block(layer, dtype, memory_format):
    in_channels, _, conv_kwargs, (pool_kernel, pool_stride), _ = LAYERS[layer]
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, **conv_kwargs).to(DEVICE, dtype, memory_format=memory_format)
    pool = nn.MaxPool2d(pool_kernel, pool_stride)
    return nn.Sequential(conv, nn.ReLU(), pool), ConvReLUPool2d.from_modules(conv, pool)


def _runner(impl, layer, x, grad, training, dtype, memory_format):
    eager, fused = _block(layer, dtype, memory_format)
    module = {"eager": eager, "compile": torch.compile(eager)}.get(impl, fused)
    wrt = ([x] if x.requires_grad else []) + list(eager.parameters())

    def forward():
        with torch.no_grad():
            return module(x)

    def forward_backward():
        return torch.autograd.grad(module(x), wrt, grad)

    fn = forward_backward if training else forward
    if impl in ("eager", "compile"):
        return fn

    def scoped():
        with fastdl.backend(impl):
            return fn()

    return scoped


def _saved_megabytes(fn) -> float:
    """What autograd keeps for backward during ``fn()``: every saved tensor's storage, counted once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def _peak_megabytes(fn) -> float:
    torch.cuda.synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    fn()
    torch.cuda.synchronize(DEVICE)
    return (torch.cuda.max_memory_allocated(DEVICE) - before) / 2**20


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layer,batch,training", CASES,
                         ids=[f"{layer}-b{batch}-{'fwd+bwd' if training else 'fwd'}" for layer, batch, training in CASES])
@pytest.mark.parametrize("impl", IMPLS)
def bench_conv_relu_pool(bench, impl, layer, batch, training, dtype):
    in_channels, size, conv_kwargs, (pool_kernel, pool_stride), input_grad = LAYERS[layer]
    # Low precision runs channels-last, the layout cuDNN's tensor-core kernels want.
    memory_format = torch.channels_last if dtype != torch.float32 else torch.contiguous_format
    x = torch.randn(batch, in_channels, size, size, device=DEVICE, dtype=dtype).contiguous(memory_format=memory_format)
    x.requires_grad_(training and input_grad)
    eager, _ = _block(layer, dtype, memory_format)
    with torch.no_grad():
        out = eager(x)
    grad = torch.randn_like(out)
    conv_out = (out.shape[0], conv_kwargs["out_channels"]) + tuple(
        (size + 2 * conv_kwargs.get("padding", 0) - conv_kwargs["kernel_size"]) // conv_kwargs.get("stride", 1) + 1
        for _ in range(2))
    k = conv_kwargs["kernel_size"]
    flops = 2 * conv_out[0] * conv_out[1] * conv_out[2] * conv_out[3] * (in_channels // conv_kwargs.get("groups", 1)) * k * k
    if training:  # the backward's weight gradient, plus the input gradient where it is asked for
        flops *= 3 if input_grad else 2
    fn = _runner(impl, layer, x, grad, training, dtype, memory_format)
    notes = []
    if training:
        notes.append(f"saved {_saved_megabytes(fn):.1f} MB")
    if ON_GPU:
        notes.append(f"peak {_peak_megabytes(fn):.0f} MB")
    if impl in ("native", "triton"):
        notes.append({"native": "cuDNN conv + fused CUDA epilogue" if ON_GPU else "oneDNN conv + fused C++ epilogue",
                      "triton": "implicit-GEMM conv, pool in epilogue"}[impl])
    bench(
        fn,
        op="conv_relu_pool",
        case=f"{layer} {tuple(x.shape)} {str(dtype)[6:]} {'fwd+bwd' if training else 'fwd'}",
        impl=impl,
        device=DEVICE,
        flops=flops,
        dtype=dtype,
        baseline=_runner("eager", layer, x, grad, training, dtype, memory_format),
        notes=", ".join(notes),
    )
