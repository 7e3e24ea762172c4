"""benchmarks/capacity_padding.py runs and prints one row per capacity factor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_capacity_padding_benchmark_prints_its_table():
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "capacity_padding.py"), "--tokens", "64", "--d-model", "16",
               "--d-ff", "32", "--capacity-factors", "0.5", "1.5", "--steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| ") and "ms" not in line]
    assert [row[0] for row in rows] == ["0.5", "1.5"]
    assert int(rows[0][1]) > 0  # half the capacity of an even split drops assignments
