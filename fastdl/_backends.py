"""Backend selection, shared by every op.

Each op has one public name and up to three kernel backends behind it:

* ``native``    — C++ (CPU tensors) and CUDA C++ (CUDA tensors), compiled into ``fastdl._C``;
* ``triton``    — Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests only);
* ``reference`` — plain PyTorch ops: the spec, and the fallback that runs anywhere.

``auto`` (the default) tries an op's priority list for the tensor's device and takes the first backend
that can run the call, ending at ``reference``. A backend asked for by name that cannot run the call
raises :class:`NotImplementedError` listing, per backend, why it was or was not usable.

``auto`` also promises never to be slower than PyTorch itself: :data:`EAGER_FASTER` lists the calls where
fastdl's kernels were measured slower than torch's own implementation of the module or function they
replace, and for those :func:`auto_runs_eager` tells the public entry point to run torch's (an explicitly
requested backend still runs what it names).

The choice is made per call: ``fastdl.backend(name)`` scopes it (a context variable, so threads and
async tasks each see their own), ``fastdl.set_backend(name)`` sets the process default, and the
environment variable ``FASTDL_BACKEND`` sets the initial default.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from . import _cpu_isa, _extension

KERNEL_BACKENDS = ("native", "triton", "reference")
BACKENDS = ("auto",) + KERNEL_BACKENDS


def _validated(name: str, origin: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{origin}: unknown fastdl backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_default_backend = _validated(os.environ.get("FASTDL_BACKEND", "auto").strip() or "auto", "FASTDL_BACKEND")
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastdl_backend", default=None)


def get_backend() -> str:
    """The backend in force here: the innermost ``fastdl.backend(...)`` scope, else the default."""
    scoped = _scoped_backend.get()
    return _default_backend if scoped is None else scoped


def set_backend(name: str) -> None:
    """Sets the process-wide default backend (``auto``, ``native``, ``triton`` or ``reference``)."""
    global _default_backend
    _default_backend = _validated(name, "fastdl.set_backend")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with fastdl.backend("triton"): ...`` runs the block's fastdl ops on that backend."""
    token = _scoped_backend.set(_validated(name, "fastdl.backend"))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as error:
        return f"triton could not be imported ({type(error).__name__}: {error})"
    return None


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` in this process, or None when it can."""
    device_type = torch.device(device).type
    if name == "reference":
        return None
    if device_type not in ("cpu", "cuda"):
        return f"runs on cpu and cuda tensors, not {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if name == "native":
        if _extension.LOAD_ERROR is not None:
            return _extension.LOAD_ERROR
        if device_type == "cuda" and not _extension.BUILT_WITH_CUDA:
            return "fastdl._C was built without its CUDA kernels (CPU-only torch or no nvcc at build time)"
        return None
    if name == "triton":
        error = _triton_import_error()
        if error is not None:
            return error
        if device_type == "cpu" and not triton_interpreted():
            return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), meant for tests"
        return None
    raise ValueError(f"unknown kernel backend {name!r}")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The kernel backends usable for tensors on ``device`` in this process."""
    return [name for name in KERNEL_BACKENDS if why_unavailable(name, device) is None]


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of an op's entry point, and what it supports.

    ``dtypes`` maps a device type to the dtypes the kernel accepts there (a device type not listed is not
    supported). ``limits``, when given, receives the call's arguments and returns why this call is
    outside the kernel's limits (for example "head dim 320 > 256"), or None.
    """

    backend: str
    run: Callable
    dtypes: Mapping[str, frozenset[torch.dtype]]
    limits: Callable[..., str | None] | None = None


@dataclass
class OpKernels:
    """The backends of one op entry point and the ``auto`` priority list per device type."""

    op: str
    kernels: Sequence[Kernel]
    auto_order: Mapping[str, Sequence[str]] = field(
        default_factory=lambda: {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}
    )

    def __post_init__(self) -> None:
        self._by_backend = {kernel.backend: kernel for kernel in self.kernels}
        self._native_on_cpu: dict[tuple[str, torch.dtype], bool] = {}
        reference = self._by_backend.get("reference")
        if reference is None or reference.limits is not None:
            raise ValueError(f"{self.op}: the reference kernel is required and must accept every call")

    def why_not(self, name: str, device: torch.device, dtype: torch.dtype, *args) -> str | None:
        """Why backend ``name`` cannot run this call, or None when it can."""
        kernel = self._by_backend.get(name)
        if kernel is None:
            return "no kernel for this op"
        reason = why_unavailable(name, device)
        if reason is not None:
            return reason
        if name != "reference":
            supported = kernel.dtypes.get(device.type, frozenset())
            if dtype not in supported:
                names = ", ".join(sorted(str(d).removeprefix("torch.") for d in supported)) or "none"
                return f"dtype {str(dtype).removeprefix('torch.')} is not supported on {device.type} (supported: {names})"
        return kernel.limits(*args) if kernel.limits is not None else None

    def native_on_cpu(self, dtype: torch.dtype) -> bool:
        """Whether a CPU call in ``dtype`` runs the native kernel under the backend in force. For the
        eager fast paths that skip the custom op (causal conv's step, spectral norm's step): their ops'
        kernels have no shape limits, so the answer depends on the backend and dtype alone, and it is
        cached, since ``select`` costs as much as those kernels do on small tensors."""
        key = (get_backend(), dtype)
        native = self._native_on_cpu.get(key)
        if native is None:
            native = self._native_on_cpu[key] = self.select(torch.device("cpu"), dtype).backend == "native"
        return native

    def select(self, device: torch.device, dtype: torch.dtype, *args) -> Kernel:
        """The kernel that runs this call under the backend in force (see the module docstring)."""
        requested = get_backend()
        if requested == "auto":
            order = self.auto_order.get(device.type, ("reference",))
            for name in order:
                if self.why_not(name, device, dtype, *args) is None:
                    return self._by_backend[name]
            return self._by_backend["reference"]
        if self.why_not(requested, device, dtype, *args) is None:
            return self._by_backend[requested]
        report = "; ".join(
            f"{name}: {self.why_not(name, device, dtype, *args) or 'can run it'}" for name in KERNEL_BACKENDS
        )
        raise NotImplementedError(
            f"{self.op}: backend {requested!r} cannot run this call on {device.type} {str(dtype).removeprefix('torch.')} "
            f"tensors. Per backend: {report}"
        )


CPU_NATIVE_DTYPES = frozenset({torch.float32, torch.float64})  # fp64 serves gradcheck and oracles
GPU_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
TRITON_CPU_DTYPES = frozenset({torch.float32})  # the interpreter (tests): fp32 is what we exercise


def standard_kernels(op: str, native: Callable, triton: Callable, reference: Callable, *,
                     limits: Callable[..., str | None] | None = None,
                     auto_order: Mapping[str, Sequence[str]] | None = None) -> OpKernels:
    """The kernel table most op entry points have: ``native`` on CPU (fp32, fp64) and CUDA (fp32, fp16,
    bf16), ``triton`` on CUDA (and fp32 CPU tensors under the interpreter), ``reference`` everywhere.
    ``limits`` applies to the native and Triton kernels alike."""
    kernels = [
        Kernel("native", native, {"cpu": CPU_NATIVE_DTYPES, "cuda": GPU_DTYPES}, limits),
        Kernel("triton", triton, {"cuda": GPU_DTYPES, "cpu": TRITON_CPU_DTYPES}, limits),
        Kernel("reference", reference, {}),
    ]
    return OpKernels(op, kernels) if auto_order is None else OpKernels(op, kernels, auto_order)


@dataclass(frozen=True)
class EagerFaster:
    """Calls of one public entry point where PyTorch's own implementation was measured faster than fastdl's
    kernels: ``auto`` runs torch's there. ``cpu_isas`` are the CPU instruction sets (fastdl's, see
    ``fastdl.cpu_isa``) it applies to; ``when``, if given, receives the entry point's arguments and says
    whether this call is one of them; ``measured`` says what was measured, on which CPU."""

    device: str
    dtypes: frozenset[torch.dtype]
    measured: str
    cpu_isas: frozenset[str] = frozenset(_cpu_isa.ISAS)
    when: Callable[..., bool] | None = None


FP32 = frozenset({torch.float32})

# Per public entry point (the name it passes to auto_runs_eager). Measured with `pytest bench/`, ratios to
# eager in the same run, on a 2-core AMD EPYC Zen 4 at each of its instruction sets (torch capped alike).
EAGER_FASTER: dict[str, tuple[EagerFaster, ...]] = {
    "LSTM": (EagerFaster("cpu", FP32, "torch runs oneDNN's fused LSTM at ~98% of the fp32 matmul peak; fastdl's "
                         "layer kernels reach 0.85–0.91× of it (2 threads)"),),
    "conv_relu_pool2d": (EagerFaster(
        "cpu", FP32, "when the weight outweighs the input (AlexNet conv5, VGG16 block 5 at batch 1) both run the "
                     "same oneDNN convolution and fastdl's pooling pass costs more than eager's: 0.94–0.98×",
        when=lambda input, weight: input.numel() < weight.numel()),),
}


def auto_runs_eager(entry: str, device: torch.device, dtype: torch.dtype, *args) -> bool:
    """Whether this call of public entry point ``entry`` should run PyTorch's own implementation: under
    ``auto`` only, for the calls :data:`EAGER_FASTER` lists. Not while compiling: a traced graph keeps
    fastdl's ops, whose choice of kernel happens when the graph runs."""
    cases = EAGER_FASTER.get(entry)
    if cases is None or torch.compiler.is_compiling() or get_backend() != "auto":  # (Dynamo cannot trace the latter)
        return False
    isa = _cpu_isa.cpu_isa().active
    return any(case.device == device.type and dtype in case.dtypes and (device.type != "cpu" or isa in case.cpu_isas)
               and (case.when is None or case.when(*args)) for case in cases)
