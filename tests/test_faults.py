"""Faults under MoEStrategy, with real gloo processes: an fp16 overflow on one rank, NaN in a router or
the loss, damaged, tampered and mismatched checkpoints, a save that fails half-way, and a rank killed
mid-run then resumed with ``ckpt_path="last"``. In every case each rank either goes on in step with the
others or stops with the same clear error; none is left waiting in a collective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))

from launch import launch, rank_logs, read_results, start_ranks  # noqa: E402

from lightning_moe.checkpoint import read_full_checkpoint  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_workers" / "fault_worker.py"
ACCUMULATE = 2


def read(out: Path, name: str, world_size: int = 2) -> list[dict]:
    return read_results(out, name, world_size)

@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults")
    base = str(out / "base" / "checkpoints" / "epoch=0-step=5.ckpt")
    scenarios = [
        {"name": "fp16_inf"},
        {"name": "fp16_inf_fused"},
        {"name": "nan_router"},
        {"name": "nan_loss"},
        {"name": "nan_in_validation", "validate_every": 4},
        {"name": "base"},
        {"name": "tampered", "base": base},
        {"name": "truncated", "base": base},
        {"name": "mismatch_experts", "base": base},
        {"name": "mismatch_width", "base": base},
        {"name": "save_fails"},
    ]
    (out / "scenarios.json").write_text(json.dumps(scenarios))
    launch(WORKER, [str(out / "scenarios.json"), str(out)], world_size=2, timeout=420, log_dir=out / "logs")
    return out


@pytest.mark.parametrize("name", ["fp16_inf", "fp16_inf_fused"])
def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(world2, name):
    """An inf in rank 1's expert gradient at step 2: both ranks skip that step and halve the scale, so
    the dense replicas stay identical and the sigmoid gate's bias update (a collective after each
    step) runs on both or neither (it used to hang). Also with a fused AdamW, which the scaler does
    not unscale first: it checks the gradients itself (rank 1 alone skipped, and the scales parted)."""
    ranks = read(world2, name)
    assert ranks[0]["error"] is None and ranks[1]["error"] is None
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert step0 == step1  # scale, dense weights and Adam's step count, every step
    by_step = {entry["step"]: entry for entry in ranks[0]["steps"]}
    assert by_step[3]["scale"] == by_step[2]["scale"] / 2  # the overflow at step 2 (the 3rd) backed off
    assert by_step[3]["adam_step"] == by_step[2]["adam_step"]  # and its optimizer step was skipped,
    assert by_step[3]["bias"] == by_step[2]["bias"] != by_step[4]["bias"]  # the bias update too
    assert by_step[5]["adam_step"] == 4
    assert ranks[0]["bias"] == ranks[1]["bias"]


@pytest.mark.parametrize(("name", "what"), [
    ("nan_router", "the router logits of MoE layer `blocks.second` on rank(s) [1]"),
    ("nan_loss", "the loss on rank(s) [0]"),
])
def test_non_finite_values_stop_every_rank_with_the_layer_and_step(world2, name, what):
    for result in read(world2, name):
        assert result["error"].startswith("NonFiniteError: Non-finite values (NaN or Inf) at optimizer step 3")
        assert what in result["error"]


def test_a_non_finite_router_in_validation_does_not_stop_training(world2):
    """Validation's router logits are NaN on rank 1 (training's stay finite): the run trains on. The
    flag was set in evaluation forwards too and read at the next training step, which then stopped
    every rank blaming that step."""
    for result in read(world2, "nan_in_validation"):
        assert result["error"] is None and result["global_step"] == 5, result


@pytest.mark.parametrize(("name", "message"), [
    ("truncated", r"rank 1: Cannot read checkpoint file .*experts-ep00001.pt .*damaged or truncated"),
    ("mismatch_experts", r"has 4 experts for `blocks.first.experts.w_in` but the model has 8"),
    ("mismatch_width", r"experts of shape \[16, 16\] for `blocks.first.experts.w_in` but the model's are \[16, 24\]"),
])
def test_damaged_or_mismatched_checkpoints_stop_every_rank_with_a_clear_error(world2, name, message):
    import re

    for result in read(world2, name):
        assert result["error"].startswith("CheckpointError"), result["error"]
        assert re.search(message, result["error"]), result["error"]


def test_resuming_from_a_tampered_checkpoint_runs_no_code(world2):
    for result in read(world2, "tampered"):
        assert result["error"].startswith("CheckpointError") and "meta.pt" in result["error"]
        assert result["code_ran"] is False


def test_a_save_that_fails_on_one_rank_keeps_last_ckpt(world2):
    for result in read(world2, "save_fails"):
        assert result["error"].startswith("CheckpointError")
        assert "rank 1: OSError" in result["error"] and "No space left on device" in result["error"]
        assert result["last_step"] == 2  # the previous last.ckpt, whole


def _killed_scenarios(out: Path, name: str, checkpoint_dir: Path, **extra) -> Path:
    scenarios = out / f"{name}.json"
    scenarios.write_text(json.dumps([{"name": name, "checkpoint_dir": str(checkpoint_dir), **extra}]))
    return scenarios


def test_a_killed_rank_stops_the_others_and_the_run_resumes_from_last(tmp_path):
    """World 4, EP 2. Uninterrupted: 12 steps. Killed: rank 2 is SIGKILLed at step 7, after the
    mid-epoch checkpoint of step 6; the other ranks must stop with an error, not hang. Resumed with
    `ckpt_path="last"`: the run goes on from step 6 and follows the uninterrupted one, because the
    weights, optimizer, LR schedule, gate biases, monitor history and data position all came back."""
    reference = tmp_path / "uninterrupted-ckpts"
    launch(WORKER, [str(_killed_scenarios(tmp_path, "uninterrupted", reference)), str(tmp_path)], world_size=4,
           timeout=300, log_dir=tmp_path / "logs-uninterrupted")

    checkpoints = tmp_path / "killed-ckpts"
    outcomes = start_ranks(WORKER, [str(_killed_scenarios(tmp_path, "killed", checkpoints)), str(tmp_path)],
                           world_size=4, timeout=240, log_dir=tmp_path / "logs-killed")
    logs = rank_logs(tmp_path / "logs-killed", 4)
    assert outcomes[2][0] == -9, logs  # SIGKILL
    for rank in (0, 1, 3):
        code, seconds = outcomes[rank]
        assert code not in (0, None), logs  # stopped with an error, within the timeout
    assert (checkpoints / "last.ckpt").exists()

    launch(WORKER, [str(_killed_scenarios(tmp_path, "resumed", checkpoints, resume_from="last")), str(tmp_path)],
           world_size=4, timeout=300, log_dir=tmp_path / "logs-resumed")
    full, resumed = read(tmp_path, "uninterrupted", 4), read(tmp_path, "resumed", 4)
    assert resumed[0]["global_step"] == 12
    for rank in range(4):
        # Micro-batch losses of steps 7..12 (two per step): the same batches, the same model.
        np.testing.assert_allclose(resumed[rank]["losses"], full[rank]["losses"][-len(resumed[rank]["losses"]):],
                                   rtol=1e-4)
        assert len(resumed[rank]["losses"]) == 6 * ACCUMULATE
        assert resumed[rank]["lr"] == pytest.approx(full[rank]["lr"])
        np.testing.assert_allclose(resumed[rank]["bias"], full[rank]["bias"], atol=1e-6)
        assert resumed[rank]["monitor_steps"] == full[rank]["monitor_steps"] == [2, 4, 6, 8, 10, 12]
        assert resumed[rank]["monitor_load"] == full[rank]["monitor_load"]
    final_full = read_full_checkpoint(tmp_path / "uninterrupted" / "final.ckpt")
    final_resumed = read_full_checkpoint(tmp_path / "resumed" / "final.ckpt")
    for key, value in final_full["state_dict"].items():
        torch.testing.assert_close(final_resumed["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for state_full, state_resumed in zip(final_full["optimizer_states"][0]["state"].values(),
                                         final_resumed["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(state_resumed["exp_avg_sq"], state_full["exp_avg_sq"], rtol=1e-4, atol=1e-9)
