"""benchmarks/replica_balance.py runs and prints one row per size, with the tensor operations of one
call (the same on one node for both sizes: the rounds' operations do not grow with the tensors)."""

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
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| ") and "ms" not in line]
    assert [row[:4] for row in rows] == [["2", "8", "1", "2"], ["4", "16", "1", "4"]]
    operations = [int(row[5]) for row in rows]
    assert operations[0] == operations[1] and 0 < operations[0] < 600, rows
