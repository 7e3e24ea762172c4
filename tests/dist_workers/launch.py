"""Start ``N`` real processes of a script on CPU (gloo), like torchrun would, with a timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

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


# ------------------------------------------------------------------------------ scenario workers


def run_scenarios(run: Callable[[dict, Path, int, int], dict]) -> None:
    """The ``main`` of a scenario worker (``python worker.py SCENARIOS.json OUT_DIR``): run each scenario
    of the JSON list in turn, in this process group, and write what this rank saw to
    ``OUT_DIR/<scenario name>/rank<r>.json`` (a traceback as ``{"crash": ...}`` if it raised)."""
    import torch.distributed as dist

    scenarios = json.loads(Path(sys.argv[1]).read_text())
    out_root = Path(sys.argv[2])
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    for scenario in scenarios:
        out_dir = out_root / scenario["name"]
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            result = run(scenario, out_dir, world_size, rank)
        except Exception:
            (out_dir / f"rank{rank}.json").write_text(json.dumps({"crash": traceback.format_exc()}))
            raise
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    end_rank()


def end_rank() -> None:
    """End this rank after its work: destroy its process group, if any, flush the logs and leave at
    once. The last call of every worker's ``main``; results are in their files by then.

    Left to the interpreter's exit, a thread of the process group or of its TCPStore can still be
    joinable when C++ static destructors run: "terminate called without an active exception", and
    the rank exits with SIGABRT after its work is done (seen with and without destroying the group
    first). ``os._exit`` skips that teardown. Local; no collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fit_scenario(trainer, model, loader, scenario: dict) -> str | None:
    """``trainer.fit`` from ``scenario["resume_from"]`` (if any); with ``scenario["expect_error"]``, the
    message of the ``ValueError`` it raises instead of raising it (``None`` when it trained)."""
    try:
        trainer.fit(model, loader, ckpt_path=scenario.get("resume_from"))
    except ValueError as error:
        if scenario.get("expect_error"):
            return str(error)
        raise
    return None


def read_results(out: Path, name: str, world_size: int) -> list[dict]:
    """What every rank wrote for scenario ``name`` (failing with the traceback of a rank that crashed)."""
    results = [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(world_size)]
    for result in results:
        assert "crash" not in result, result["crash"]
    return results


def step_losses(results: list[dict], accumulate: int) -> np.ndarray:
    """Per optimizer step: the mean over ranks and micro-batches of the training loss."""
    losses = np.array([r["losses"] for r in results])  # (ranks, steps * accumulate)
    return losses.reshape(len(results), -1, accumulate).mean(axis=(0, 2))


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the variables of a running process group (so that a launcher
    started from a test begins its own), with the repository on the path and one thread per process."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **extra)
    return env
