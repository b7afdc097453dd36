"""The benchmark harness every ``bench/bench_<op>.py`` uses.

A case calls the ``bench`` fixture with the function to time, what it is (op, case, implementation), the
bytes it must move and/or the flops it must do. The harness

* times it with pytest-benchmark (synchronizing CUDA after every call), and records the median;
* relates it to eager PyTorch on the same case (the ``baseline`` function; the implementation named
  ``eager`` is that baseline itself): the ratio is the median over pairs of runs alternating baseline
  and implementation, so both see the same machine — these machines are shared and noisy, and only
  side-by-side ratios mean anything;
* turns bytes and flops into GB/s and TFLOP/s, and into percent of this device's peak as measured in
  this same session (device-to-device copy bandwidth; a large matmul's throughput);
* prints one summary table at the end of ``pytest bench/``, and writes it as Markdown to the path given
  by ``--fastdl-report`` (how ``bench/results/`` files are made), headed by what it ran on: the CPU model,
  its instruction set and the one fastdl's kernels ran, torch's, and the machine's load;
* warns when the machine is oversubscribed (load average above the core count): ratios of parallel code
  measured then are meaningless, in either direction.

``FASTDL_CPU_ISA=avx2 pytest bench/`` measures the AVX2 path on an AVX-512 machine as an AVX2 machine would
run it: torch is capped at the same instruction set (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS, unless set already), so eager PyTorch — and the oneDNN calls fastdl makes — run
their code for that instruction set too.
"""
from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field

import pytest
import torch

import fastdl
from fastdl import _cpu_isa

# Before anything runs a torch kernel (torch, oneDNN and MKL read their caps when first used).
if os.environ.get("FASTDL_CPU_ISA", "").strip():
    _cpu_isa.cap_torch_like_fastdl()


def pytest_addoption(parser):
    parser.addoption("--fastdl-report", default=None, help="write the benchmark summary as Markdown to this path")


def fastdl_impls(device: torch.device) -> list[str]:
    """The fastdl rows of a case: ``auto`` (what users get, the never-slower promise included) and each
    kernel backend that runs on ``device`` here, by name."""
    return ["auto"] + [name for name in ("native", "triton") if name in fastdl.available_backends(device)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, budget_s: float = 0.5, max_rounds: int = 200) -> float:
    """Median wall time of ``fn()`` over as many rounds as fit in ``budget_s`` (at least 5), warmed up."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-6)
    times = []
    for _ in range(max(5, min(max_rounds, int(budget_s / once)))):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_speedup(baseline, fn, device: torch.device, budget_s: float = 2.0, max_pairs: int = 60) -> float:
    """Median over alternating pairs of (baseline time / fn time). Timing the two back to back, pair after
    pair, makes the ratio robust to the load of a shared machine drifting during the run, which two
    medians taken minutes apart are not."""
    pair = median_seconds(baseline, device, budget_s=0.05, max_rounds=3) + median_seconds(fn, device, budget_s=0.05,
                                                                                           max_rounds=3)
    ratios = []
    for _ in range(max(5, min(max_pairs, int(budget_s / max(pair, 1e-6))))):
        times = []
        for candidate in (baseline, fn):
            start = time.perf_counter()
            candidate()
            synchronize(device)
            times.append(time.perf_counter() - start)
        ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_isa.cpu_model()}, {torch.get_num_threads()} threads, fastdl {fastdl.cpu_isa().active}"


def machine_lines() -> list[str]:
    """What the run measured on: the CPU and instruction sets in use, torch's caps, and the load."""
    isa = fastdl.cpu_isa()
    caps = ", ".join(f"{name}={os.environ[name]}" for name in
                     ("FASTDL_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
                     if name in os.environ)
    lines = [
        f"CPU: {_cpu_isa.cpu_model()}, {os.cpu_count()} cores; instruction set {isa.supported}; fastdl's CPU "
        f"kernels ran {isa.active}; torch's CPU capability {torch.backends.cpu.get_cpu_capability()}"
        f"{'; ' + caps if caps else ''}",
        f"Load average (1 min) at the start and end of the run: {SESSION.load_start:.2f}, {os.getloadavg()[0]:.2f}",
    ]
    if SESSION.oversubscribed:
        lines.append(f"**Warning: the machine was oversubscribed during this run (load average up to "
                     f"{SESSION.load_max:.2f} on {os.cpu_count()} cores): ratios of parallel code are not reliable.**")
    return lines


@dataclass
class Row:
    op: str
    case: str
    impl: str
    device: str
    median_ms: float
    vs_eager: float | None
    gbps: float | None
    bandwidth_pct: float | None
    tflops: float | None
    compute_pct: float | None
    notes: str = ""


@dataclass
class Session:
    rows: list[Row] = field(default_factory=list)
    peaks: dict = field(default_factory=dict)
    load_start: float = field(default_factory=lambda: os.getloadavg()[0])
    load_max: float = 0.0

    @property
    def oversubscribed(self) -> bool:
        return self.load_max > (os.cpu_count() or 1)

    def note_load(self) -> None:
        """Samples the load average (once per case): the run is flagged when it exceeds the core count."""
        self.load_max = max(self.load_max, os.getloadavg()[0])

    def copy_gbps(self, device: torch.device) -> float:
        """Measured device-to-device copy bandwidth (bytes read + written per second), once per session."""
        key = ("copy", str(device))
        if key not in self.peaks:
            n = (256 if device.type == "cuda" else 64) * 2**20 // 4
            src = torch.empty(n, device=device)
            dst = torch.empty_like(src)
            seconds = median_seconds(lambda: dst.copy_(src), device)
            self.peaks[key] = 2 * src.numel() * 4 / seconds / 1e9
        return self.peaks[key]

    def matmul_tflops(self, device: torch.device, dtype: torch.dtype) -> float:
        """Measured throughput of a large matmul in ``dtype``, once per session."""
        key = ("matmul", str(device), dtype)
        if key not in self.peaks:
            n = 8192 if device.type == "cuda" else 1024
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            seconds = median_seconds(lambda: a @ b, device)
            self.peaks[key] = 2 * n**3 / seconds / 1e12
        return self.peaks[key]


SESSION = Session()


@pytest.fixture
def bench(benchmark):
    """``bench(fn, op=, case=, impl=, device=, bytes_moved=None, flops=None, dtype=None, baseline=None,
    notes="")`` times ``fn`` and records one row of the summary (see the module docstring)."""

    def run(fn, *, op: str, case: str, impl: str, device: torch.device | str, bytes_moved: float | None = None,
            flops: float | None = None, dtype: torch.dtype = torch.float32, baseline=None, notes: str = ""):
        device = torch.device(device)
        benchmark.group = f"{op} {case}"
        benchmark.extra_info.update(op=op, case=case, impl=impl)

        def call():
            fn()
            synchronize(device)

        fn()  # compile / autotune / first-touch outside the timed rounds
        synchronize(device)
        once = median_seconds(fn, device, budget_s=0.05, max_rounds=5)
        rounds = max(5, min(200, int(1.0 / max(once, 1e-6))))
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
        if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing to record
            return
        median_ms = benchmark.stats.stats.median * 1e3
        if impl == "eager":
            vs_eager = 1.0
        elif baseline is not None:
            vs_eager = interleaved_speedup(baseline, fn, device)
        else:
            vs_eager = None
        gbps = bytes_moved / (median_ms / 1e3) / 1e9 if bytes_moved else None
        tflops = flops / (median_ms / 1e3) / 1e12 if flops else None
        row = Row(
            op, case, impl, device_name(device), median_ms, vs_eager, gbps,
            100 * gbps / SESSION.copy_gbps(device) if gbps else None,
            tflops, 100 * tflops / SESSION.matmul_tflops(device, dtype) if tflops else None, notes,
        )
        SESSION.rows.append(row)
        SESSION.note_load()
        benchmark.extra_info.update({k: v for k, v in row.__dict__.items() if v is not None})

    return run


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summary_markdown() -> str:
    devices = sorted({row.device for row in SESSION.rows})
    peaks = ", ".join(
        f"{kind} {where}{'' if len(key) < 3 else ' ' + str(key[2]).removeprefix('torch.')}: {value:.3g} "
        f"{'GB/s' if kind == 'copy' else 'TFLOP/s'}"
        for key, value in SESSION.peaks.items() for kind, where in [key[:2]]
    )
    lines = [
        f"# fastdl benchmarks — {', '.join(devices)}",
        "",
        f"{datetime.date.today().isoformat()} · fastdl {fastdl.__version__} commit {_git_commit()} · torch {torch.__version__}"
        f" · measured peaks this run: {peaks or 'n/a'}",
        "",
        *(line for entry in machine_lines() for line in (entry, "")),
        "Ratios are against eager PyTorch on the same case: the median of per-pair ratios over runs alternating"
        " eager and the implementation (>1 is faster).",
        "",
        "| op | case | impl | median ms | vs eager | GB/s | % copy BW | TFLOP/s | % matmul peak | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in SESSION.rows:
        lines.append(
            f"| {r.op} | {r.case} | {r.impl} | {r.median_ms:.3f} | {_fmt(r.vs_eager, '.2f')}{'x' if r.vs_eager else ''} | "
            f"{_fmt(r.gbps, '.3g')} | {_fmt(r.bandwidth_pct, '.0f')} | {_fmt(r.tflops, '.3g')} | {_fmt(r.compute_pct, '.0f')} | {r.notes} |"
        )
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not SESSION.rows:
        return
    text = summary_markdown()
    terminalreporter.write_sep("=", "fastdl benchmark summary")
    if SESSION.oversubscribed:
        terminalreporter.write_line(f"WARNING: load average reached {SESSION.load_max:.2f} on {os.cpu_count()} cores "
                                    "during this run: ratios of parallel code are not reliable", red=True)
    terminalreporter.write(text)
    path = config.getoption("--fastdl-report")
    if path:
        with open(path, "w") as handle:
            handle.write(text)
        terminalreporter.write_line(f"written to {path}")
