"""Start ``N`` real processes of a script on CPU (gloo), like torchrun would, with a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(
    script: str | Path, args: Sequence[str], *, world_size: int, timeout: float, log_dir: Path
) -> list[tuple[int | None, float]]:
    """Run ``world_size`` ranks of ``script`` to the end; return each rank's ``(exit code, seconds)``.

    A rank still running at ``timeout`` is killed and reported with exit code ``None``.
    """
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    start = time.monotonic()
    for rank in range(world_size):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        for name in ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(name, None)
        log = open(log_dir / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=log, stderr=subprocess.STDOUT))
    outcomes: list[tuple[int | None, float]] = []
    try:
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, timeout - (time.monotonic() - start)))
                outcomes.append((proc.returncode, time.monotonic() - start))
            except subprocess.TimeoutExpired:
                outcomes.append((None, time.monotonic() - start))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    return outcomes


def rank_logs(log_dir: Path, world_size: int) -> str:
    return "\n".join(f"--- rank {r} ---\n{(log_dir / f'rank{r}.log').read_text()[-4000:]}" for r in range(world_size))


def launch(script: str | Path, args: Sequence[str], *, world_size: int, timeout: float, log_dir: Path) -> None:
    """Run ``world_size`` ranks of ``script``; raise with every rank's log if one fails or times out."""
    outcomes = start_ranks(script, args, world_size=world_size, timeout=timeout, log_dir=log_dir)
    if any(code != 0 for code, _ in outcomes):
        raise RuntimeError(f"distributed run of {script} failed or timed out:\n{rank_logs(log_dir, world_size)}")
