"""fastdl's Triton kernels and their launchers, one module per op (installed as fastdl.triton_kernels)."""
