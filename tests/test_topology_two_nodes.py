"""Two simulated nodes of two processes each (two torchrun launches on localhost, gloo/CPU): the
topology is read from the Lightning trainer, the links are probed, and the planner keeps replicas
of the hottest experts on both nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dist_workers.launch import REPO_ROOT, free_port

WORKER = Path(__file__).resolve().parent / "dist_workers" / "topology_worker.py"
TIMEOUT_S = 50


def _launch_two_nodes(out: Path) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    for name in ("TORCHELASTIC_RUN_ID", "GROUP_RANK", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(name, None)
    logs, agents = [], []
    for node in range(2):
        log = open(out / f"node{node}.log", "w")
        logs.append(log)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), str(WORKER), str(out),
        ]  # fmt: skip
        agents.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    failed = False
    try:
        for agent in agents:
            agent.wait(timeout=TIMEOUT_S)
            failed |= agent.returncode != 0
    except subprocess.TimeoutExpired:
        failed = True
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        for log in logs:
            log.close()
    if failed:
        text = "\n".join(f"--- node {n} ---\n{(out / f'node{n}.log').read_text()[-4000:]}" for n in range(2))
        raise RuntimeError(f"two-node launch failed or passed {TIMEOUT_S} s:\n{text}")


def test_topology_from_trainer_and_planner_on_two_nodes(tmp_path):
    _launch_two_nodes(tmp_path)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]
    for rank, record in enumerate(records):
        assert record["global_rank"] == rank
        assert record["node_rank"] == rank // 2 == int(record["env_group_rank"])
        assert (record["num_nodes"], record["ranks_per_node"]) == (2, 2)
        intra, inter, latency = record["measured"]
        assert intra > 0 and inter > 0 and latency >= 0
    # Every rank measured the same links (EP rank 0 broadcasts them) and planned the same placement.
    assert len({json.dumps(record["measured"]) for record in records}) == 1
    assert len({json.dumps(record["experts_per_rank"]) for record in records}) == 1
    experts_per_rank = records[0]["experts_per_rank"]
    for hot in (0, 1):
        nodes = {rank // 2 for rank, experts in enumerate(experts_per_rank) if hot in experts}
        assert nodes == {0, 1}, f"expert {hot} is only on nodes {nodes}: {experts_per_rank}"
    assert abs(records[0]["fractions_sum"] - 4 * 8) < 1e-9
