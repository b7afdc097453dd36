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


# The instruction sets as read from fastdl._C, kept here so that Python callers (and code torch.compile
# traces) read a plain value; set_cpu_isa is the one place that changes the active one.
_supported: str | None = None if _extension.LOAD_ERROR is not None else _extension._C.cpu_isa_supported()
_active: str | None = _supported


def cpu_isa() -> CpuIsa:
    """The CPU kernels' instruction sets: the CPU's best, and the one in use."""
    return CpuIsa(_supported, _active)


def available_isas() -> list[str]:
    """Every instruction set the kernels can run on this CPU (each one a test can select)."""
    return [] if _supported is None else list(ISAS[: ISAS.index(_supported) + 1])


def set_cpu_isa(name: str, *, origin: str = "fastdl.set_cpu_isa") -> str:
    """Caps the CPU kernels at instruction set ``name``; returns the one now in use. More than the CPU
    supports warns and runs the CPU's best; an unknown name raises ValueError."""
    global _active
    if name not in ISAS:
        raise ValueError(f"{origin}: unknown CPU instruction set {name!r}; expected one of {', '.join(ISAS)}")
    if _supported is None:
        raise RuntimeError(f"{origin}: the CPU kernels are not available ({_extension.LOAD_ERROR})")
    if ISAS.index(name) > ISAS.index(_supported):
        warnings.warn(f"{origin}={name} asks for more than this CPU supports; its best is {_supported}, "
                      f"which fastdl's CPU kernels run", RuntimeWarning, stacklevel=2)
    _active = _extension._C.set_cpu_isa(name)
    return _active


@contextmanager
def use_cpu_isa(name: str) -> Iterator[str]:
    """``with use_cpu_isa("avx2"):`` runs the block's CPU kernels on that path (for tests: the setting is
    process-wide, not per thread)."""
    previous = _active
    try:
        yield set_cpu_isa(name, origin="use_cpu_isa")
    finally:
        if previous is not None:
            set_cpu_isa(previous)


# fastdl's instruction sets in the names of torch's own caps: ATen's kernels (ATEN_CPU_CAPABILITY), oneDNN
# (ONEDNN_MAX_CPU_ISA; SSE4.1 is its lowest) and MKL (MKL_ENABLE_INSTRUCTIONS). Each is read once, when that
# library first runs something.
TORCH_CAPS = {
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {},
}


def cap_torch_like_fastdl() -> None:
    """Caps torch at the instruction set fastdl's kernels run (unless its caps are set already), so that
    eager PyTorch and the oneDNN calls fastdl makes run as on a CPU of that instruction set: how
    ``FASTDL_CPU_ISA=avx2 pytest bench/`` measures the AVX2 path on an AVX-512 machine. Must run before any
    torch kernel does; warns if torch's instruction set was fixed otherwise already."""
    import torch

    for name, value in TORCH_CAPS.get(_active, {}).items():
        os.environ.setdefault(name, value)
    capability = torch.backends.cpu.get_cpu_capability()
    at_most = {"baseline": {"DEFAULT", "NO AVX"}, "avx2": {"DEFAULT", "NO AVX", "AVX2"}}.get(_active)
    if at_most is not None and capability not in at_most:
        warnings.warn(f"fastdl's CPU kernels run {_active} but torch runs {capability} kernels (capped too late, "
                      f"or ATEN_CPU_CAPABILITY set otherwise): eager PyTorch is not measured as on a {_active} CPU",
                      RuntimeWarning, stacklevel=2)


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
