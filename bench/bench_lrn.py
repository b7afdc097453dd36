"""LocalResponseNorm: eager nn.LocalResponseNorm, torch.compile of it, and fastdl's backends, on
AlexNet's two LRN layers (after conv1: 96×55×55, after conv2: 256×27×27), forward and forward+backward."""
import pytest
import torch

import fastdl
from conftest import fastdl_impls
from fastdl.ops import LocalResponseNorm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 128 if DEVICE.type == "cuda" else 16
SHAPES = {"alexnet-lrn1": (BATCH, 96, 55, 55), "alexnet-lrn2": (BATCH, 256, 27, 27)}
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
IMPLS = ["eager", "compile"] + fastdl_impls(DEVICE)


def _runner(impl, x, grad, training):
    torch_module = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    if impl == "eager":
        module, scope = torch_module, None
    elif impl == "compile":
        module, scope = torch.compile(torch_module), None
    else:
        module, scope = LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0), impl

    def forward():
        return module(x)

    def forward_backward():
        return torch.autograd.grad(module(x), x, grad)

    fn = forward_backward if training else forward
    if scope is None:
        return fn

    def scoped():
        with fastdl.backend(scope):
            return fn()

    return scoped


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("training", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def bench_local_response_norm(bench, impl, shape_name, training, dtype):
    shape = SHAPES[shape_name]
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=training)
    grad = torch.randn_like(x)
    numel_bytes = x.numel() * x.element_size()
    bench(
        _runner(impl, x, grad, training),
        op="lrn",
        case=f"{shape_name} {tuple(shape)} {str(dtype)[6:]} {'fwd+bwd' if training else 'fwd'}",
        impl=impl,
        device=DEVICE,
        # The least any implementation must move: read x, write y; backward also reads x and g, writes dx.
        bytes_moved=(5 if training else 2) * numel_bytes,
        baseline=_runner("eager", x, grad, training),
    )
