"""Dilated causal conv (WaveNet / TCN layers): eager ``pad + Conv1d`` (the baseline), the TCN form
``Conv1d(padding=p)`` followed by a chomp, and fastdl's backends, forward and forward+backward; and
streaming generation of a 30-layer stack (dilations 1 … 512, three times) one sample at a time by ``step``
against naive recomputation of the receptive field."""
import pytest
import torch
import torch.nn.functional as F

import fastdl
from conftest import fastdl_impls
from fastdl.ops import CausalConv1d, causal_conv1d

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
BACKENDS = fastdl_impls(DEVICE)

# name: (batch, channels, length, kernel_size, dilation, groups). The first is the target case; on
# CPU the others are kept to a few so that the whole file stays within minutes on two cores.
LAYERS = {
    "tcn k2 d8": (16, 64, 4096, 2, 8, 1),
    "wavenet k2 d512": (16, 64, 4096, 2, 512, 1),
    "tcn k3 d1 c128": (16, 128, 4096, 3, 1, 1),
    "k2 d64 long": (16, 64, 16384, 2, 64, 1),
    "depthwise k3 d8": (16, 64, 4096, 3, 8, 64),
}
if DEVICE.type == "cuda":
    LAYERS.update({
        "tcn k3 d8 c128 long": (16, 128, 16384, 3, 8, 1),
        "wavenet k2 d1 c128 long": (16, 128, 16384, 2, 1, 1),
    })


def _layer_runner(impl, x, weight, bias, dilation, groups, grad, training):
    padding = dilation * (weight.shape[-1] - 1)
    if impl == "eager":
        def forward():
            return F.conv1d(F.pad(x, (padding, 0)), weight, bias, dilation=dilation, groups=groups)
    elif impl == "tcn-chomp":
        def forward():
            # TCN's Chomp1d: x[:, :, :-p].contiguous()
            return F.conv1d(x, weight, bias, dilation=dilation, padding=padding, groups=groups)[:, :, :-padding].contiguous()
    else:
        def forward():
            with fastdl.backend(impl):
                return causal_conv1d(x, weight, bias, dilation, groups)

    if not training:
        return forward
    return lambda: torch.autograd.grad(forward(), (x, weight, bias), grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("training", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("impl", ["eager", "tcn-chomp"] + BACKENDS)
def bench_causal_conv1d(bench, impl, layer, training, dtype):
    batch, channels, length, k, dilation, groups = LAYERS[layer]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, length, generator=gen).to(DEVICE, dtype).requires_grad_(training)
    weight = (torch.randn(channels, channels // groups, k, generator=gen) * 0.1).to(DEVICE, dtype).requires_grad_(training)
    bias = torch.randn(channels, generator=gen).to(DEVICE, dtype).requires_grad_(training)
    grad = torch.randn(batch, channels, length, generator=gen).to(DEVICE, dtype)
    flops = 2 * batch * channels * (channels // groups) * k * length * (3 if training else 1)
    numel_bytes = x.numel() * x.element_size()
    bench(
        _layer_runner(impl, x, weight, bias, dilation, groups, grad, training),
        op="causal_conv1d",
        case=f"{layer} {(batch, channels, length)} k={k} d={dilation} g={groups} {str(dtype)[6:]} "
             f"{'fwd+bwd' if training else 'fwd'}",
        impl=impl,
        device=DEVICE,
        dtype=dtype,
        flops=flops,
        # The least any implementation must move: read x, write y; backward also reads x and g, writes dx.
        bytes_moved=(5 if training else 2) * numel_bytes,
        baseline=_layer_runner("eager", x, weight, bias, dilation, groups, grad, training),
    )


GENERATION_DILATIONS = [2 ** i for i in range(10)] * 3
GENERATION_CHANNELS = 64


def _generation_stack(dtype):
    torch.manual_seed(0)
    return [CausalConv1d(GENERATION_CHANNELS, GENERATION_CHANNELS, 2, dilation=d).to(DEVICE, dtype)
            for d in GENERATION_DILATIONS]


def _naive_generation(layers, history):
    """One new sample the naive way: the whole stack recomputed over the receptive field."""

    @torch.no_grad()
    def run():
        h = history
        for layer in layers:
            h = torch.tanh(F.conv1d(F.pad(h, (layer.dilation[0], 0)), layer.weight, layer.bias, dilation=layer.dilation[0]))
        return h[:, :, -1]

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("impl", ["eager"] + BACKENDS)
def bench_generation(bench, impl, dtype):
    layers = _generation_stack(dtype)
    receptive_field = 1 + sum(layer.dilation[0] for layer in layers)
    history = torch.randn(1, GENERATION_CHANNELS, receptive_field, device=DEVICE, dtype=dtype)
    naive = _naive_generation(layers, history)
    if impl == "eager":
        fn = naive
    else:
        states = [layer.init_state(1) for layer in layers]
        sample = history[:, :, -1]

        def fn():
            with fastdl.backend(impl):
                value = sample
                for i, layer in enumerate(layers):
                    value, states[i] = layer.step(value, states[i])
                    value = torch.tanh(value)
                return value

    bench(
        fn,
        op="causal_conv1d generation",
        case=f"30 layers d=1..512 x3, {GENERATION_CHANNELS} ch, receptive field {receptive_field}, batch 1, "
             f"{str(dtype)[6:]} (time per sample; eager = naive recompute)",
        impl=impl,
        device=DEVICE,
        dtype=dtype,
        baseline=naive,
    )
