"""LSTM and GRU language-model shapes (seq 100): eager nn.LSTM / nn.GRU (oneDNN on CPU, cuDNN on GPU), a
Python loop over the torch cells, and fastdl's backends; inference and training (forward+backward).

On a GPU the issue's grid runs: hidden 512 and 1024, 1 and 2 layers, batch 1, 8 and 64. On CPU (2 shared
cores, where one training step of this size takes seconds) the grid is cut to the issue's CPU target —
batch 32, input 256, hidden 512, 1 layer — so that ``pytest bench/bench_rnn.py`` stays within minutes.
"""
import pytest
import torch

import fastdl
from conftest import fastdl_impls
from fastdl.ops import GRU, LSTM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEQ = 100
if DEVICE.type == "cuda":
    # (batch, input, hidden, layers)
    SHAPES = [(b, h, h, layers) for h in (512, 1024) for layers in (1, 2) for b in (1, 8, 64)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    SHAPES = [(32, 256, 512, 1)]
    DTYPES = [torch.float32]
IMPLS = ["eager", "cells"] + fastdl_impls(DEVICE)
MODULES = {"LSTM": (torch.nn.LSTM, LSTM, torch.nn.LSTMCell), "GRU": (torch.nn.GRU, GRU, torch.nn.GRUCell)}


def _cell_loop(kind, torch_module):
    """The same network as a Python loop over torch cells (how many hand-written models run)."""
    _, _, cell_cls = MODULES[kind]
    cells = []
    for layer in range(torch_module.num_layers):
        cell = cell_cls(torch_module.input_size if layer == 0 else torch_module.hidden_size, torch_module.hidden_size)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(cell, name, getattr(torch_module, f"{name}_l{layer}"))
        cells.append(cell)

    def run(x):
        for cell in cells:
            state, outputs = None, []
            for step in x.unbind(0):
                state = cell(step, state)
                outputs.append(state[0] if isinstance(state, tuple) else state)
            x = torch.stack(outputs)
        return x

    return run


def _runner(impl, kind, x, grad, torch_module, training):
    _, ours_cls, _ = MODULES[kind]
    scope, parameters = None, list(torch_module.parameters())
    if impl == "eager":
        model = lambda t: torch_module(t)[0]  # noqa: E731
    elif impl == "cells":
        model = _cell_loop(kind, torch_module)
    else:
        ours = ours_cls(torch_module.input_size, torch_module.hidden_size, num_layers=torch_module.num_layers).to(x)
        ours.load_state_dict(torch_module.state_dict())
        model, scope, parameters = (lambda t: ours(t)[0]), impl, list(ours.parameters())

    def forward():
        with torch.no_grad():
            return model(x)

    def forward_backward():
        # Every gradient a training step needs: the input's and all weights'.
        return torch.autograd.grad(model(x), [x] + parameters, grad)

    fn = forward_backward if training else forward
    if scope is None:
        return fn

    def scoped():
        with fastdl.backend(scope):
            return fn()

    return scoped


def _flops(batch, input_size, hidden, layers, gates, training):
    """Matmul flops: input projection plus recurrence per layer; backward does twice the forward's."""
    per_step = sum(2 * batch * gates * hidden * ((input_size if layer == 0 else hidden) + hidden) for layer in range(layers))
    return SEQ * per_step * (3 if training else 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-i{}-h{}-l{}".format(*s))
@pytest.mark.parametrize("kind", list(MODULES))
@pytest.mark.parametrize("impl", IMPLS)
def bench_rnn(bench, impl, kind, shape, training, dtype):
    batch, input_size, hidden, layers = shape
    torch.manual_seed(0)
    torch_module = MODULES[kind][0](input_size, hidden, num_layers=layers).to(device=DEVICE, dtype=dtype)
    x = torch.randn(SEQ, batch, input_size, device=DEVICE, dtype=dtype, requires_grad=training)
    grad = torch.randn(SEQ, batch, hidden, device=DEVICE, dtype=dtype)
    bench(
        _runner(impl, kind, x, grad, torch_module, training),
        op="rnn",
        case=f"{kind} seq{SEQ} b{batch} i{input_size} h{hidden} l{layers} {str(dtype)[6:]} {'fwd+bwd' if training else 'fwd'}",
        impl=impl,
        device=DEVICE,
        flops=_flops(batch, input_size, hidden, layers, 4 if kind == "LSTM" else 3, training),
        dtype=dtype,
        baseline=_runner("eager", kind, x, grad, torch_module, training),
    )
