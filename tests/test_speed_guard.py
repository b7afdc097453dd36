"""A coarse speed guard: one small representative case per op, fastdl's native CPU kernel timed against
eager PyTorch, on every instruction set the CPU can run. It fails when a kernel falls under half of
eager's speed: wide enough for a noisy shared machine, tight enough that a collapse like the AVX2 path's
(attention at 0.03× eager, once) cannot land green. `pytest bench/` is where speed is measured.

Each instruction set runs in a subprocess with torch capped at the same one (fastdl._cpu_isa.TORCH_CAPS),
so eager runs as it would on such a CPU, on one thread, timed in thread CPU time, eager and fastdl
alternating: that keeps the ratio meaningful on a loaded machine.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import fastdl
from fastdl import _cpu_isa

MINIMUM_RATIO = 0.5
PAIRS = 9


def _ratio(eager, ours) -> float:
    """Median over alternating pairs of eager's CPU time over fastdl's."""
    eager(), ours()
    ratios = []
    for _ in range(PAIRS):
        start = time.thread_time()
        eager()
        middle = time.thread_time()
        ours()
        ratios.append((middle - start) / max(time.thread_time() - middle, 1e-9))
    return statistics.median(ratios)


def _cases():
    """(name, eager, fastdl) per op: small shapes from the architectures each op serves, forward+backward."""
    import torch.nn.functional as F
    from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

    import fastdl.ops as fo

    def grads(output, inputs, grad):
        return torch.autograd.grad(output, inputs, grad)

    x = torch.randn(4, 32, 27, 27, requires_grad=True)
    lrn = fo.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    torch_lrn = torch.nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)
    g = torch.randn_like(x)
    yield "lrn", lambda: grads(torch_lrn(x), x, g), lambda: grads(lrn(x), x, g)

    conv = torch.nn.Conv2d(32, 48, 5, padding=2)
    fused = fo.ConvReLUPool2d(32, 48, 5, padding=2, pool_kernel_size=3, pool_stride=2)
    fused.load_state_dict(conv.state_dict())
    pooled = torch.randn(4, 48, 13, 13)
    yield ("conv_relu_pool", lambda: grads(F.max_pool2d(F.relu(conv(x)), 3, 2), [x, *conv.parameters()], pooled),
           lambda: grads(fused(x), [x, *fused.parameters()], pooled))

    q, k, v = (torch.randn(1, 4, 512, 64, requires_grad=True) for _ in range(3))
    g = torch.randn(1, 4, 512, 64)
    yield ("attention", lambda: grads(F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], g),
           lambda: grads(fo.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], g))

    mha, torch_mha = fo.MultiheadAttention(256, 4, batch_first=True), torch.nn.MultiheadAttention(256, 4, batch_first=True)
    mha.load_state_dict(torch_mha.state_dict())
    s, g = torch.randn(2, 256, 256, requires_grad=True), torch.randn(2, 256, 256)
    yield ("multihead_attention", lambda: grads(torch_mha(s, s, s, need_weights=False)[0], [s], g),
           lambda: grads(mha(s, s, s, need_weights=False)[0], [s], g))

    for kind in ("LSTM", "GRU"):
        ours, theirs = getattr(fo, kind)(128, 256), getattr(torch.nn, kind)(128, 256)
        ours.load_state_dict(theirs.state_dict())
        seq, g = torch.randn(25, 16, 128, requires_grad=True), torch.randn(25, 16, 256)
        yield (kind, lambda theirs=theirs, seq=seq, g=g: grads(theirs(seq)[0], [seq], g),
               lambda ours=ours, seq=seq, g=g: grads(ours(seq)[0], [seq], g))

    causal, plain = fo.CausalConv1d(32, 32, 2, dilation=4), torch.nn.Conv1d(32, 32, 2, dilation=4)
    causal.load_state_dict(plain.state_dict())
    t, g = torch.randn(4, 32, 4096, requires_grad=True), torch.randn(4, 32, 4096)
    yield ("causal_conv", lambda: grads(plain(F.pad(t, (4, 0))), [t], g), lambda: grads(causal(t), [t], g))

    normed, torch_normed = torch.nn.Linear(256, 128), torch.nn.Linear(256, 128)
    torch_normed.load_state_dict(normed.state_dict())
    fo.spectral_norm(normed)
    torch_spectral_norm(torch_normed)
    yield "spectral_norm", lambda: torch_normed.weight, lambda: normed.weight


def measure() -> dict[str, float]:
    """Every case's ratio at the instruction set this process runs (the subprocess entry point)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with fastdl.backend("native"):
        return {name: _ratio(eager, ours) for name, eager, ours in _cases()}


@pytest.mark.parametrize("isa", _cpu_isa.available_isas())
def test_native_kernels_at_least_half_of_eager_speed(isa):
    if "native" not in fastdl.available_backends("cpu"):
        pytest.skip("the native backend is unavailable")
    env = {**os.environ, "FASTDL_CPU_ISA": isa, **_cpu_isa.TORCH_CAPS[isa]}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    ratios = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(ratios) >= {"lrn", "conv_relu_pool", "attention", "LSTM", "GRU", "causal_conv", "spectral_norm"}
    slow = {name: round(ratio, 2) for name, ratio in ratios.items() if ratio < MINIMUM_RATIO}
    assert not slow, f"{isa}: under {MINIMUM_RATIO}× eager PyTorch's speed: {slow} (all: {ratios})"


if __name__ == "__main__":
    _cpu_isa.cap_torch_like_fastdl()
    assert fastdl.cpu_isa().active == os.environ["FASTDL_CPU_ISA"]
    print(json.dumps(measure()))
