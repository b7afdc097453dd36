"""torch.jit.script of every fastdl module (fastdl/_scripting.py): it compiles the PyTorch twin, which shares
the module's state, computes what the module computes, and saves to an archive that loads without fastdl."""
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

from fastdl.ops import (GRU, LSTM, CausalConv1d, ConvReLUPool2d, GRUCell, LocalResponseNorm, LSTMCell,
                        MultiheadAttention)

# TorchScript is what this file tests, deprecated or not.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
              pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated")]


class _Sequence(nn.Module):
    """An LSTM/GRU inside a model, as TorchScript takes them: torch's nn.LSTM scripts, but its overloaded
    forward is callable from TorchScript only."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


def _generator():
    return torch.Generator().manual_seed(0)


MODULES = {
    "lrn": (lambda: LocalResponseNorm(3, 0.5), lambda: (torch.randn(2, 5, 4, 4, generator=_generator()),)),
    "mha": (lambda: MultiheadAttention(8, 2, batch_first=True), lambda: (torch.randn(2, 3, 8, generator=_generator()),) * 3),
    "lstm": (lambda: _Sequence(LSTM(3, 4, 2, bidirectional=True, proj_size=2)),
             lambda: (torch.randn(5, 2, 3, generator=_generator()),)),
    "gru": (lambda: _Sequence(GRU(3, 4, batch_first=True)), lambda: (torch.randn(2, 5, 3, generator=_generator()),)),
    "lstm-cell": (lambda: LSTMCell(3, 4), lambda: (torch.randn(2, 3, generator=_generator()),)),
    "gru-cell": (lambda: GRUCell(3, 4), lambda: (torch.randn(2, 3, generator=_generator()),)),
    "causal-conv": (lambda: CausalConv1d(3, 4, 3, dilation=2, groups=1), lambda: (torch.randn(2, 3, 7, generator=_generator()),)),
    "conv-relu-pool": (lambda: ConvReLUPool2d(3, 4, 3, padding=1, padding_mode="reflect", pool_kernel_size=3,
                                              pool_stride=2, ceil_mode=True),
                       lambda: (torch.randn(1, 3, 9, 9, generator=_generator()),)),
}


def _flat(outputs):
    if isinstance(outputs, Tensor):
        return [outputs]
    return [t for part in outputs if part is not None for t in _flat(part)]


@pytest.mark.parametrize("kind", list(MODULES))
def test_scripted_module_computes_what_the_module_computes(kind, tmp_path):
    make, inputs = MODULES[kind]
    torch.manual_seed(0)
    module = make().eval()
    expected = module(*inputs())
    with pytest.warns(UserWarning, match="torch.jit.script compiles"):
        scripted = torch.jit.script(module)
    for actual, wanted in zip(_flat(scripted(*inputs())), _flat(expected)):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    # The state is shared, not copied: a parameter update shows in the scripted module.
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(0.5)
    for actual, wanted in zip(_flat(scripted(*inputs())), _flat(module(*inputs()))):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:torch.jit.script compiles")
def test_archives_load_without_fastdl(tmp_path):
    """What deployment through TorchScript needs: the saved archives run in a process that never imports
    fastdl (as libtorch in C++ would) and give the fastdl modules' outputs."""
    torch.manual_seed(0)
    for kind, (make, inputs) in MODULES.items():
        module = make().eval()
        torch.jit.save(torch.jit.script(module), str(tmp_path / f"{kind}.pt"))
        torch.save((inputs(), _flat(module(*inputs()))), str(tmp_path / f"{kind}.io"))
    check = (
        "import sys, torch\n"
        "for kind in sys.argv[2:]:\n"
        "    module = torch.jit.load(f'{sys.argv[1]}/{kind}.pt')\n"
        "    inputs, expected = torch.load(f'{sys.argv[1]}/{kind}.io')\n"
        "    outputs = module(*inputs)\n"
        "    outputs = [outputs] if isinstance(outputs, torch.Tensor) else [t for t in outputs if t is not None]\n"
        "    for o, e in zip([t for o in outputs for t in (o if isinstance(o, tuple) else (o,))], expected):\n"
        "        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)\n"
        "assert 'fastdl' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", check, str(tmp_path), *MODULES], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_scripting_a_model_says_it_swaps_its_fastdl_modules():
    model = nn.Sequential(nn.Conv2d(3, 5, 3), LocalResponseNorm(3))
    with pytest.warns(UserWarning, match="in place of the fastdl module in the model it scripts"):
        torch.jit.script(model)
    assert type(model[1]) is nn.LocalResponseNorm  # torch.jit.script's own doing, which the warning announces
