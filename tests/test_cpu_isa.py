"""The CPU instruction-set layer: detection, the FASTDL_CPU_ISA override, the per-test cap, and that every
path the CPU can run computes the same numbers as the best one (the per-op tests check each against
PyTorch; see fastdl.testing.backend_device_cases)."""
import os
import subprocess
import sys

import pytest
import torch

import fastdl
from fastdl import _cpu_isa
from fastdl.testing import cpu_isa_cases

pytestmark = pytest.mark.skipif(fastdl.cpu_isa().supported is None, reason="fastdl._C did not load")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_supported_isa_matches_the_cpu_flags():
    flags = set()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    v3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    assert fastdl.cpu_isa().supported == ("avx512" if v4 else "avx2" if v3 else "baseline")
    assert _cpu_isa.available_isas() == list(_cpu_isa.ISAS[: _cpu_isa.ISAS.index(fastdl.cpu_isa().supported) + 1])


@pytest.mark.parametrize("isa", cpu_isa_cases())
def test_cpu_isa_mark_caps_the_kernels(isa):
    assert fastdl.cpu_isa().active == isa


@pytest.mark.parametrize("isa", _cpu_isa.available_isas())
def test_environment_variable_caps_the_kernels(isa):
    result = _run("import fastdl; print(fastdl.cpu_isa().active)", FASTDL_CPU_ISA=isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == isa


def test_environment_variable_rejects_unknown_names():
    result = _run("import fastdl", FASTDL_CPU_ISA="avx9000")
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "avx9000" in result.stderr and "baseline, avx2, avx512" in result.stderr


def test_asking_for_more_than_the_cpu_warns_and_runs_its_best():
    supported = fastdl.cpu_isa().supported
    if supported == "avx512":
        pytest.skip("this CPU runs every instruction set fastdl has")
    with pytest.warns(RuntimeWarning, match=f"its best is {supported}"):
        assert fastdl.set_cpu_isa("avx512") == supported
    assert fastdl.cpu_isa().active == supported


def test_set_cpu_isa_validates_and_use_cpu_isa_restores():
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
        fastdl.set_cpu_isa("sse9")
    before = fastdl.cpu_isa().active
    with _cpu_isa.use_cpu_isa("baseline"):
        assert fastdl.cpu_isa().active == "baseline"
    assert fastdl.cpu_isa().active == before


def test_python_m_fastdl_shows_the_instruction_sets():
    result = _run("import runpy; runpy.run_module('fastdl', run_name='__main__')", FASTDL_CPU_ISA="baseline")
    assert result.returncode == 0, result.stderr
    supported = fastdl.cpu_isa().supported
    assert f"instruction set {supported}, kernels run baseline" in result.stdout
    if supported != "baseline":
        assert "capped by FASTDL_CPU_ISA=baseline" in result.stdout


def test_every_path_agrees_with_the_best_within_rounding():
    """The paths differ only in vector width (the order partial sums are added), so they agree closely."""
    from fastdl.ops import LocalResponseNorm, scaled_dot_product_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 40, dtype=torch.float64) for _ in range(3))
    x = torch.randn(2, 9, 11, 13, dtype=torch.float64)
    results = {}
    with fastdl.backend("native"):
        for isa in _cpu_isa.available_isas():
            with _cpu_isa.use_cpu_isa(isa):
                results[isa] = (scaled_dot_product_attention(q, k, v, is_causal=True), LocalResponseNorm(3)(x))
    best = results[fastdl.cpu_isa().supported]
    for isa, outputs in results.items():
        for output, expected in zip(outputs, best):
            torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{isa}: {m}")
