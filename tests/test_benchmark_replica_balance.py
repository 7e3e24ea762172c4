"""benchmarks/replica_balance.py runs and prints one row per size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_replica_balance_benchmark_prints_its_table():
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "replica_balance.py"), "--sizes", "2x8,4x16", "--repeats", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split("|")[1:4] for line in done.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [[cell.strip() for cell in row] for row in rows] == [["2", "8", "2"], ["4", "16", "4"]]
