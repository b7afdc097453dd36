"""The instruction set of fastdl's CPU kernels (``csrc/cpu/isa.h``): what this CPU supports, which one runs,
and the override.

The kernels are compiled for three x86-64 instruction sets — ``baseline`` (SSE2, any x86-64 CPU),
``avx2`` (AVX2 + FMA) and ``avx512`` — and run the best one the CPU supports. The environment variable
``FASTDL_CPU_ISA`` (read when fastdl is imported) caps it, in the spirit of PyTorch's
``ATEN_CPU_CAPABILITY``: for measuring each path on one machine, or for working around a CPU-specific
problem. Asking for more than the CPU supports warns and runs the CPU's best.
"""
from __future__ import annotations

import os
import platform
import warnings
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from . import _extension

ISAS = ("baseline", "avx2", "avx512")  # lowest to highest


class CpuIsa(NamedTuple):
    """``supported``: the best instruction set of this CPU the kernels can use; ``active``: the one they run
    (lower when capped by ``FASTDL_CPU_ISA``). Both are None when ``fastdl._C`` did not load."""

    supported: str | None
    active: str | None


def cpu_isa() -> CpuIsa:
    """The CPU kernels' instruction sets: the CPU's best, and the one in use."""
    if _extension.LOAD_ERROR is not None:
        return CpuIsa(None, None)
    return CpuIsa(_extension._C.cpu_isa_supported(), _extension._C.cpu_isa())


def available_isas() -> list[str]:
    """Every instruction set the kernels can run on this CPU (each one a test can select)."""
    supported = cpu_isa().supported
    return [] if supported is None else list(ISAS[: ISAS.index(supported) + 1])


def set_cpu_isa(name: str, *, origin: str = "fastdl.set_cpu_isa") -> str:
    """Caps the CPU kernels at instruction set ``name``; returns the one now in use. More than the CPU
    supports warns and runs the CPU's best; an unknown name raises ValueError."""
    if name not in ISAS:
        raise ValueError(f"{origin}: unknown CPU instruction set {name!r}; expected one of {', '.join(ISAS)}")
    if _extension.LOAD_ERROR is not None:
        raise RuntimeError(f"{origin}: the CPU kernels are not available ({_extension.LOAD_ERROR})")
    supported = _extension._C.cpu_isa_supported()
    if ISAS.index(name) > ISAS.index(supported):
        warnings.warn(f"{origin}={name} asks for more than this CPU supports; its best is {supported}, "
                      f"which fastdl's CPU kernels run", RuntimeWarning, stacklevel=2)
    return _extension._C.set_cpu_isa(name)


@contextmanager
def use_cpu_isa(name: str) -> Iterator[str]:
    """``with use_cpu_isa("avx2"):`` runs the block's CPU kernels on that path (for tests: the setting is
    process-wide, not per thread)."""
    previous = cpu_isa().active
    try:
        yield set_cpu_isa(name, origin="use_cpu_isa")
    finally:
        if previous is not None:
            _extension._C.set_cpu_isa(previous)


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (``/proc/cpuinfo`` on Linux; virtual machines
    often shorten the name, e.g. "AMD EPYC", and the numbers then tell Zen 3 from Zen 4), for reports."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _apply_environment() -> None:
    requested = os.environ.get("FASTDL_CPU_ISA", "").strip()
    if requested and _extension.LOAD_ERROR is None:
        set_cpu_isa(requested, origin="FASTDL_CPU_ISA")


_apply_environment()
