"""``python -m fastdl``: versions, the device, and which backends can run here (and why not)."""
import os
import platform

import torch

import fastdl
from fastdl import _backends, _cpu_isa, _extension


def main() -> None:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as error:  # not installed, or broken
        triton_version = f"unavailable ({type(error).__name__})"
    print(f"fastdl {fastdl.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton_version}")
    print(f"fastdl._C: {'loaded' if _extension.LOAD_ERROR is None else _extension.LOAD_ERROR}"
          f"{', with CUDA kernels' if _extension.BUILT_WITH_CUDA else ''}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
        print(f"device: {torch.cuda.get_device_name(0)} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))})")
    else:
        print(f"device: CPU only ({platform.machine()}, {torch.get_num_threads()} threads); no CUDA device")
    isa = fastdl.cpu_isa()
    if isa.supported is not None:
        capped = f", capped by FASTDL_CPU_ISA={os.environ['FASTDL_CPU_ISA']}" if isa.active != isa.supported else ""
        print(f"CPU: {_cpu_isa.cpu_model()}; instruction set {isa.supported}, kernels run {isa.active}{capped}")
    print(f"selected backend: {fastdl.get_backend()}")
    for device in devices:
        for name in _backends.KERNEL_BACKENDS:
            reason = _backends.why_unavailable(name, device)
            print(f"  {device:4} {name:9} {'available' if reason is None else 'unavailable: ' + reason}")


if __name__ == "__main__":
    main()
