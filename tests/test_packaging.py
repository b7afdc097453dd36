"""The install and CI contract: README's commands, .ci/run, and setup.py's CUDA switch."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
from readme_command import readme_command  # noqa: E402


def test_readme_gives_the_two_quick_start_commands():
    bench = readme_command("bench-command", ROOT / "README.md")
    test = readme_command("test-command", ROOT / "README.md")
    assert bench.endswith("pytest bench/") and test.endswith("pytest tests/")
    for command in (bench, test):
        assert command.startswith("python3 -m venv .venv")
        assert 'pip install --no-build-isolation -e ".[test]"' in command


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_command.py test-command" in ci and 'bash -euo pipefail -c "$command"' in ci


def test_forcing_cuda_without_it_fails_loudly():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("a CUDA torch can honour FASTDL_CUDA=1; nothing to refuse")
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "FASTDL_CUDA": "1"}, timeout=300)
    assert result.returncode != 0 and "FASTDL_CUDA=1" in result.stderr
