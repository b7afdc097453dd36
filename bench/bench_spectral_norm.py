"""Spectral normalization: torch's parametrization (eager) vs fastdl's backends, on the weights of an
SN-GAN / DCGAN discriminator (conv 3→64→128→256→512, 4×4, and the final linear), the issue's 128×1024
and 512×4096 targets and a large 512×4608 weight: one training-mode weight computation (power iteration,
σ, W/σ), its forward+backward, and a whole discriminator step (forward+backward of real and fake)."""
import contextlib

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import fastdl
from conftest import fastdl_impls
from fastdl.ops import spectral_norm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WEIGHTS = {
    "d-conv1": (64, 3, 4, 4),
    "d-conv2": (128, 64, 4, 4),
    "d-conv3": (256, 128, 4, 4),
    "d-conv4": (512, 256, 4, 4),
    "d-linear": (1, 512 * 4 * 4),
    "128x1024": (128, 1024),
    "512x4096": (512, 4096),
    "512x4608": (512, 4608),
}
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
IMPLS = ["eager"] + fastdl_impls(DEVICE)


def _holder(shape, dtype, impl):
    """A module holding one spectrally normalized weight of ``shape``, torch's or fastdl's."""
    module = nn.Module()
    module.weight = nn.Parameter(torch.randn(shape, device=DEVICE, dtype=dtype))
    return (torch_spectral_norm if impl == "eager" else spectral_norm)(module)


@contextlib.contextmanager
def _backend_for_case(impl):
    """Makes ``impl`` fastdl's default backend while a case is timed. Set once per case rather than by a
    ``with fastdl.backend(...)`` block inside the timed function, which would time its own entry and exit
    too: several microseconds that a user pays once around a training loop, not per weight computation,
    and that the eager baseline (which never reads the setting) does not pay."""
    if impl == "eager":
        yield
        return
    previous = fastdl.get_backend()
    fastdl.set_backend(impl)
    try:
        yield
    finally:
        fastdl.set_backend(previous)


# impl varies fastest, so each case's implementations run back to back, under the same machine load.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("with_backward", [False, True], ids=["weight", "weight+backward"])
@pytest.mark.parametrize("weight", list(WEIGHTS))
def bench_spectral_norm_weight(bench, impl, weight, with_backward, dtype):
    shape = WEIGHTS[weight]

    def runner(which):
        module = _holder(shape, dtype, which)
        original = module.parametrizations.weight.original
        grad = torch.randn(shape, device=DEVICE, dtype=dtype)
        if with_backward:
            return lambda: torch.autograd.grad(module.weight, original, grad)
        return lambda: module.weight

    numel_bytes = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    with _backend_for_case(impl):
        bench(
            runner(impl),
            op="spectral_norm",
            case=f"{weight} {shape} {str(dtype)[6:]} {'train weight+bwd' if with_backward else 'train weight'}",
            impl=impl,
            device=DEVICE,
            # The least any implementation must move: read W, write W/σ; backward reads W and G, writes ∂L/∂W.
            bytes_moved=(5 if with_backward else 2) * numel_bytes,
            dtype=dtype,
            baseline=runner("eager"),
        )


def _discriminator(apply, dtype):
    layers = [nn.Conv2d(3, 64, 4, 2, 1), nn.LeakyReLU(0.1), nn.Conv2d(64, 128, 4, 2, 1), nn.LeakyReLU(0.1),
              nn.Conv2d(128, 256, 4, 2, 1), nn.LeakyReLU(0.1), nn.Conv2d(256, 512, 4, 2, 1), nn.LeakyReLU(0.1),
              nn.Flatten(), nn.Linear(512 * 4 * 4, 1)]
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            apply(layer)
    return nn.Sequential(*layers).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def bench_sn_gan_discriminator_step(bench, impl, dtype):
    batch = 64 if DEVICE.type == "cuda" else 4

    def runner(which):
        model = _discriminator(torch_spectral_norm if which == "eager" else spectral_norm, dtype)
        real = torch.randn(batch, 3, 64, 64, device=DEVICE, dtype=dtype)
        fake = torch.randn(batch, 3, 64, 64, device=DEVICE, dtype=dtype)
        params = list(model.parameters())

        def step():
            loss = torch.relu(1 - model(real)).mean() + torch.relu(1 + model(fake)).mean()
            return torch.autograd.grad(loss, params)

        return step

    with _backend_for_case(impl):
        bench(
            runner(impl),
            op="spectral_norm",
            case=f"SN-GAN D 64x64 batch {batch} {str(dtype)[6:]} fwd+bwd real+fake",
            impl=impl,
            device=DEVICE,
            dtype=dtype,
            baseline=runner("eager"),
        )
