"""MoEStrategy on one device, as a user with one GPU (or a laptop) runs it: world 1, no launcher
variables, so Lightning starts the process group itself (NCCL on CUDA, gloo on CPU).

In one worker process: fp32 training over 2 epochs with a checkpoint per epoch, a resume from the
first epoch's checkpoint with ``fit(ckpt_path=...)``, and bf16-mixed training (on CUDA that is the
grouped_mm bf16 path). The losses must equal the single-process reference loop (fp32, rtol 1e-4), the
resume must continue as the uninterrupted run, and bf16 must stay near fp32. The CUDA case is skipped
where there is no GPU; on a GPU machine run ``pytest tests/test_strategy_single_device.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))

from launch import REPO_ROOT  # noqa: E402
from models import reference_run  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_workers" / "ep_worker.py"
BATCH, SAMPLES, ACCUMULATE, CLIP, STEPS_PER_EPOCH = 8, 80, 2, 0.05, 5
TRAIN = {"global_batch": BATCH, "samples": SAMPLES, "accumulate": ACCUMULATE, "clip": CLIP}
MODEL = {"num_experts": 4, "gate_kwargs": {"z_loss_coef": 1e-3}}
# Aux-loss-free bias updates and a global-batch loss that pools the 2 accumulated micro-batches: both
# need the end of each global batch, which the strategy registers on the optimizer of a module that
# does not register it itself.
BALANCED = {"num_experts": 4, "gate": "sigmoid",
            "gate_kwargs": {"bias_update_rate": 0.05, "load_balance_coef": 0.1, "load_balance_scope": "global"}}


def scenarios(accelerator: str, out: Path) -> list[dict]:
    common = {"ep": 1, "accelerator": accelerator, "model": MODEL, **TRAIN}
    return [
        {"name": "fp32", "max_epochs": 2, **common},
        {"name": "resumed", "max_epochs": 2, "resume_from": str(out / "fp32/checkpoints/epoch=0-step=5.ckpt"), **common},
        {"name": "bf16", "precision": "bf16-mixed", **common},
        {"name": "balanced", **common, "model": BALANCED},
    ]


def step_losses(result: dict) -> np.ndarray:
    return np.array(result["losses"]).reshape(-1, ACCUMULATE).mean(axis=1)


@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
def test_one_device_trains_checkpoints_and_resumes(tmp_path, accelerator):
    (tmp_path / "scenarios.json").write_text(json.dumps(scenarios(accelerator, tmp_path)))
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "scenarios.json"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    results = {name: json.loads((tmp_path / name / "rank0.json").read_text())
               for name in ("fp32", "resumed", "bf16", "balanced")}

    assert results["fp32"]["backend"] == ("nccl" if accelerator == "cuda" else "gloo")
    reference_losses, _ = reference_run(MODEL, world_size=1, batch_size=BATCH, accumulate=ACCUMULATE,
                                        steps=2 * STEPS_PER_EPOCH, clip=CLIP, num_samples=SAMPLES)
    np.testing.assert_allclose(step_losses(results["fp32"]), reference_losses, rtol=1e-4)
    assert results["resumed"]["global_step"] == 2 * STEPS_PER_EPOCH
    np.testing.assert_allclose(step_losses(results["resumed"]), reference_losses[STEPS_PER_EPOCH:], rtol=1e-4)
    np.testing.assert_allclose(step_losses(results["bf16"]), reference_losses[:STEPS_PER_EPOCH], atol=0.03)
    balanced = {pool: reference_run(BALANCED, world_size=1, batch_size=BATCH, accumulate=ACCUMULATE, steps=STEPS_PER_EPOCH,
                                    clip=CLIP, num_samples=SAMPLES, pool_micro_batches=pool)[0] for pool in (True, False)}
    np.testing.assert_allclose(step_losses(results["balanced"]), balanced[True], rtol=1e-4)
    assert not np.allclose(step_losses(results["balanced"]), balanced[False], rtol=1e-4)
