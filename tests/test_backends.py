"""The backend-selection API shared by every op (fastdl._backends), and import robustness."""
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdl
from fastdl import _backends
from fastdl._backends import Kernel, OpKernels


def _probe_kernels(calls):
    def kernel(name):
        return lambda: calls.append(name) or name

    return OpKernels(
        "fastdl.probe",
        [
            Kernel("native", kernel("native"), {"cpu": frozenset({torch.float32})}, limits=lambda n: "n > 8" if n > 8 else None),
            Kernel("triton", kernel("triton"), {"cuda": frozenset({torch.float16})}),
            Kernel("reference", kernel("reference"), {}),
        ],
    )


def test_available_backends_lists_what_can_run_here():
    cpu = fastdl.available_backends("cpu")
    assert cpu[-1] == "reference" and set(cpu) <= {"native", "triton", "reference"}
    assert ("triton" in cpu) == (os.environ.get("TRITON_INTERPRET") == "1")
    if not torch.cuda.is_available():
        assert fastdl.available_backends("cuda") == ["reference"]
    assert fastdl.available_backends("meta") == ["reference"]


def test_scoped_backend_nests_and_restores():
    assert fastdl.get_backend() == "auto"
    with fastdl.backend("reference"):
        assert fastdl.get_backend() == "reference"
        with fastdl.backend("native"):
            assert fastdl.get_backend() == "native"
        assert fastdl.get_backend() == "reference"
    assert fastdl.get_backend() == "auto"


def test_scoped_backend_is_per_thread():
    seen = []
    with fastdl.backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(fastdl.get_backend()))
        thread.start()
        thread.join()
    assert seen == ["auto"]


def test_set_backend_sets_the_default():
    try:
        fastdl.set_backend("reference")
        assert fastdl.get_backend() == "reference"
    finally:
        fastdl.set_backend("auto")


@pytest.mark.parametrize("call", [lambda: fastdl.set_backend("cudnn"), lambda: fastdl.backend("fast").__enter__()])
def test_unknown_backend_names_are_rejected(call):
    with pytest.raises(ValueError, match="unknown fastdl backend"):
        call()


def test_auto_takes_the_first_supported_backend_and_falls_back_silently():
    calls = []
    kernels = _probe_kernels(calls)
    cpu = torch.device("cpu")
    expected = "native" if "native" in fastdl.available_backends("cpu") else "reference"
    assert kernels.select(cpu, torch.float32, 4).run() == expected
    assert kernels.select(cpu, torch.float32, 16).run() == "reference"  # outside native's limits
    assert kernels.select(cpu, torch.float64, 4).run() == "reference"  # dtype not supported


def test_explicit_backend_that_cannot_run_explains_per_backend():
    kernels = _probe_kernels([])
    with fastdl.backend("native"), pytest.raises(NotImplementedError) as info:
        kernels.select(torch.device("cpu"), torch.float32, 16)
    message = str(info.value)
    assert "fastdl.probe" in message and "native:" in message and "triton:" in message
    assert "reference: can run it" in message
    if "native" in fastdl.available_backends("cpu"):
        assert "n > 8" in message


def test_reference_kernel_is_required():
    with pytest.raises(ValueError, match="reference kernel is required"):
        OpKernels("fastdl.broken", [Kernel("native", lambda: None, {})])


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_environment_variable_sets_the_default():
    result = _python("import fastdl; print(fastdl.get_backend())", FASTDL_BACKEND="reference")
    assert result.returncode == 0 and result.stdout.strip() == "reference"
    result = _python("import fastdl", FASTDL_BACKEND="bogus")
    assert result.returncode != 0 and "FASTDL_BACKEND" in result.stderr


def test_import_survives_a_missing_extension():
    code = (
        "import sys; sys.modules['fastdl._C'] = None\n"  # makes `import fastdl._C` raise ImportError
        "import torch, fastdl, fastdl.ops\n"
        "print(fastdl.available_backends('cpu'))\n"
        "with fastdl.backend('native'):\n"
        "    try:\n"
        "        fastdl.ops.local_response_norm(torch.randn(2, 3, 4), 2)\n"
        "    except NotImplementedError as e:\n"
        "        print('refused:', e)\n"
        "print(fastdl.ops.local_response_norm(torch.randn(2, 3, 4), 2).shape)\n"
    )
    result = _python(code, TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr
    assert "['reference']" in result.stdout
    assert "refused:" in result.stdout and "fastdl._C could not be imported" in result.stdout
    assert "torch.Size([2, 3, 4])" in result.stdout


def test_python_m_fastdl_reports_every_backend():
    result = _python("import runpy; runpy.run_module('fastdl', run_name='__main__')")
    assert result.returncode == 0, result.stderr
    for word in ("fastdl", "torch", "triton", "native", "triton", "reference"):
        assert word in result.stdout


class _DispatchedOps(TorchDispatchMode):
    """Records the name of every op dispatched below autograd."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _eager_faster_calls():
    """Per EAGER_FASTER entry: a call inside the measured case, and the op only fastdl's path dispatches."""
    from fastdl.ops import LSTM, conv_relu_pool2d

    lstm = LSTM(8, 16)
    return {
        "LSTM": (lambda: lstm(torch.randn(5, 3, 8)), "fastdl.lstm_layer"),
        # The weight (32·16·5·5) outweighs the input (1·16·6·6): the case measured slower.
        "conv_relu_pool2d": (lambda: conv_relu_pool2d(torch.randn(1, 16, 6, 6), torch.randn(32, 16, 5, 5),
                                                      pool_kernel_size=2), "fastdl.conv_relu_pool2d"),
    }


@pytest.mark.parametrize("entry", sorted(_backends.EAGER_FASTER))
def test_auto_runs_eager_where_eager_was_measured_faster(entry):
    if "native" not in fastdl.available_backends("cpu"):
        pytest.skip("without the native backend auto runs reference kernels anyway")
    call, fastdl_op = _eager_faster_calls()[entry]  # a KeyError here: a new entry needs a case in this test
    for backend, runs_fastdl in (("auto", False), ("native", True)):
        with fastdl.backend(backend), _DispatchedOps() as ops:
            call()
        assert (fastdl_op in ops.names) == runs_fastdl, (backend, sorted(ops.names))
    assert all(case.measured for case in _backends.EAGER_FASTER[entry])


def test_auto_keeps_fastdl_outside_the_measured_cases():
    from fastdl.ops import conv_relu_pool2d

    with _DispatchedOps() as ops:  # input larger than the weight
        conv_relu_pool2d(torch.randn(2, 3, 20, 20), torch.randn(4, 3, 3, 3), pool_kernel_size=2)
    assert "fastdl.conv_relu_pool2d" in ops.names
