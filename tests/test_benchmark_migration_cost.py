"""benchmarks/migration_cost.py runs (2 gloo processes, tiny experts) and prints its table; its bytes
check (the migration code's count equals the slots' size) runs inside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_migration_cost_benchmark_prints_its_table():
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "migration_cost.py"), "--world-size", "2",
               "--num-experts", "4", "--d-model", "16", "--d-ff", "32", "--columns", "1", "2",
               "--repeats", "1", "--warmup", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 /") or line.startswith("| 2 /")]
    assert [row.split("|")[1].strip() for row in rows] == ["1 / 2", "2 / 4"]
