"""benchmarks/compiled_step.py runs and prints its table: one row eager, one compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_compiled_step_benchmark_prints_its_table():
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "compiled_step.py"), "--batch", "2", "--steps", "1", "--rounds", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert rows == ["eager", "compile_blocks=True"]
    assert "speed-up (medians):" in done.stdout
