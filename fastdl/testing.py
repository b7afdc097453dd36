"""Correctness helpers shared by every op's tests (and usable by anyone checking a kernel).

The oracle is PyTorch itself, run in fp64 on the CPU. A kernel result in fp32 or fp64 must match it
tightly; a result in fp16 or bf16 may be off by no more than twice what eager PyTorch is off by when it
runs the same computation in the same low precision.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._backends import KERNEL_BACKENDS
from ._cpu_isa import available_isas

LOW_PRECISION = (torch.float16, torch.bfloat16)
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6)}  # (rtol, atol)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max(|expected|), in fp64 (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected64.abs().max().item()
    error = (actual64 - expected64).abs().max().item()
    return error / scale if scale > 0 else error


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, eager: torch.Tensor | None = None,
                 name: str = "result") -> None:
    """Checks a kernel's ``actual`` against the fp64 oracle ``expected``.

    fp32/fp64: elementwise ``|a − e| ≤ atol + rtol·|e|`` (rtol 1e-5 for fp32). fp16/bf16: the relative
    error of ``actual`` is at most 2× that of ``eager`` (eager PyTorch in the same dtype), with a floor
    of one unit in the last place so that an exact eager result does not demand perfection. NaN and Inf
    must sit where the oracle has them.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = torch.isfinite(expected64)
    if not torch.equal(torch.isnan(actual64), torch.isnan(expected64)) or not torch.equal(
        actual64[~finite & ~torch.isnan(expected64)], expected64[~finite & ~torch.isnan(expected64)]
    ):
        raise AssertionError(f"{name}: NaN/Inf positions differ from the oracle")
    actual64, expected64 = actual64[finite], expected64[finite]
    if actual.dtype in LOW_PRECISION:
        if eager is None:
            raise ValueError(f"{name}: a {actual.dtype} result needs the eager result in the same dtype")
        limit = 2 * relative_error(eager.detach()[finite.to(eager.device)], expected64) + torch.finfo(actual.dtype).eps
        error = relative_error(actual64, expected64)
        if error > limit:
            raise AssertionError(f"{name}: relative error {error:.3g} exceeds 2x eager's ({limit:.3g}) in {actual.dtype}")
        return
    rtol, atol = TOLERANCES.get(actual.dtype, TOLERANCES[torch.float32])
    torch.testing.assert_close(actual64, expected64, rtol=rtol, atol=atol * max(1.0, expected64.abs().max().item() if expected64.numel() else 1.0), msg=lambda m: f"{name}: {m}")


def outputs_and_grads(fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor],
                      grad_outputs: Sequence[torch.Tensor] | None = None, *, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None):
    """Runs ``fn(*inputs)`` on copies of ``inputs`` (cast to ``dtype``/moved to ``device`` when given) and
    returns ``(outputs, grads)``: the outputs as a tuple and the gradients of every floating input that
    requires grad, for ``grad_outputs`` (seeded ones when None). Non-tensor inputs pass through."""
    copies = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            # .to keeps the memory format (channels_last stays channels_last).
            cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
            copy = value.detach().to(device=device or value.device, dtype=cast).requires_grad_(value.requires_grad)
            copies.append(copy)
        else:
            copies.append(value)
    outputs = fn(*copies)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    wants_grad = [c for c in copies if isinstance(c, torch.Tensor) and c.requires_grad]
    if not wants_grad:
        return outputs, ()
    differentiable = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
    if grad_outputs is None:
        generator = torch.Generator().manual_seed(0)
        grad_outputs = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in differentiable]
    grads = torch.autograd.grad(
        differentiable, wants_grad, [g.to(device=o.device, dtype=o.dtype) for g, o in zip(grad_outputs, differentiable)],
        allow_unused=True,
    )
    return tuple(o.detach() for o in outputs), grads


def cpu_isa_cases():
    """pytest params, one per CPU instruction set the native kernels can run on this machine (lowest
    first), each carrying the ``cpu_isa`` mark: a test taking one runs with the kernels capped at that
    instruction set (tests/conftest.py applies the mark), so every per-ISA path is tested on one machine."""
    import pytest

    return [pytest.param(isa, marks=pytest.mark.cpu_isa(isa), id=isa) for isa in available_isas()]


def backend_device_cases(cpu_dtypes=(torch.float32, torch.float64),
                         cuda_dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """pytest params ``(backend, device, dtype)`` for every kernel backend on every device. CUDA cases
    carry the ``cuda`` mark (skipped without a GPU); Triton on CPU (its interpreter) is fp32 only. The
    native CPU kernels run at the CPU's best instruction set, and again at each lower one the CPU can run
    (ids ``native-avx2-cpu-…``, with the ``cpu_isa`` mark)."""
    import pytest

    lower_isas = available_isas()[:-1]
    cases = []
    for backend in KERNEL_BACKENDS:
        for dtype in cpu_dtypes:
            if backend != "triton" or dtype == torch.float32:
                cases.append(pytest.param(backend, "cpu", dtype, id=f"{backend}-cpu-{str(dtype)[6:]}"))
            if backend == "native":
                cases.extend(pytest.param(backend, "cpu", dtype, marks=pytest.mark.cpu_isa(isa),
                                          id=f"{backend}-{isa}-cpu-{str(dtype)[6:]}") for isa in lower_isas)
        for dtype in cuda_dtypes:
            cases.append(pytest.param(backend, "cuda", dtype, marks=pytest.mark.cuda, id=f"{backend}-cuda-{str(dtype)[6:]}"))
    return cases
