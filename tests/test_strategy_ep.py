"""MoEStrategy in real multi-process gloo runs on CPU, against single-process references.

Starting processes that import torch and Lightning is the expensive part, so each world size is
launched once (a module-scoped fixture) and runs many scenarios in sequence
(``tests/dist_workers/ep_worker.py``); the tests below only read what every rank wrote.

World 4, global batch 8 (2 per rank), 2 micro-batches per optimizer step, clipping by norm 0.05,
5 optimizer steps per epoch:

- EP 1, 2 and 4 train 10 steps and match the single-process reference (losses and final weights);
- a permuted placement matches the identity one;
- EP 2 saves a checkpoint after epoch 0; EP 4 (world 4), EP 2 (world 2, launched with torchrun)
  and world 1 resume from it and continue exactly as the uninterrupted run;
- MoE layers under ``torch.compile``, capacity mode, every registered gate, bf16-mixed, device-limited routing, manual optimization
  with accumulation;
- each setup error.
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

from launch import REPO_ROOT, clean_env, free_port, launch, read_results  # noqa: E402
from launch import step_losses as per_step_losses  # noqa: E402
from models import LateExperts, StagedExperts, TwoMoELayers, dataset, reference_run  # noqa: E402

from lightning_moe.checkpoint import (  # noqa: E402
    committed_directory,
    consolidate_checkpoint,
    is_sharded_checkpoint,
    read_full_checkpoint,
)
from lightning_moe.layers.gates import GATES  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_workers" / "ep_worker.py"
GLOBAL_BATCH, SAMPLES, ACCUMULATE, CLIP, STEPS_PER_EPOCH = 8, 80, 2, 0.05, 5
TRAIN = {"global_batch": GLOBAL_BATCH, "samples": SAMPLES, "accumulate": ACCUMULATE, "clip": CLIP}
# No load-balancing loss in the runs that change world size: an aux loss is computed per rank's
# micro-batch, so it depends on how the global batch is split (the EP runs keep it, with a
# reference that splits the batch the same way).
NO_AUX = {"num_experts": 4, "gate_kwargs": {"load_balance_coef": 0.0}}
# The load-balancing loss counts the experts' shares over all 4 ranks' micro-batches (Qiu et al. 2025).
GLOBAL_BALANCE = {"num_experts": 4, "gate_kwargs": {"load_balance_coef": 0.1, "load_balance_scope": "global"}}
GATE_KWARGS = {
    "sigmoid": {"bias_update_rate": 0.01, "load_balance_coef": 0.01},
    "expert_choice": {"capacity_factor": 2.0},
}
FIRST_EPOCH = "checkpoints/epoch=0-step=5.ckpt"
RESUME_FROM = f"ep2/{FIRST_EPOCH}"
FINAL = "checkpoints/epoch=1-step=10.ckpt"


def gate_scenarios() -> list[dict]:
    return [
        {"name": f"gate_{name}", "ep": 2, "model": {"num_experts": 4, "gate": name, "top_k": 2,
                                                    "gate_kwargs": GATE_KWARGS.get(name)}, **TRAIN}
        for name in sorted(GATES)
        if name != "topk"
    ]


def world4_scenarios(out: Path) -> list[dict]:
    return [
        # The second MoE layer left out of every forward, or of one EP group's (ranks 2 and 3).
        {"name": "second_layer_unused", "ep": 2, "skip_second_on_ranks": [0, 1, 2, 3], "find_unused": True,
         "model": NO_AUX, **TRAIN},
        {"name": "second_layer_unused_by_one_group", "ep": 2, "skip_second_on_ranks": [2, 3], "find_unused": True,
         "model": NO_AUX, **TRAIN},
        {"name": "ep1", "ep": 1, "max_epochs": 2, "model": {"num_experts": 4, "gate_kwargs": {"z_loss_coef": 1e-3}},
         "try_apply_placement": True,
         **TRAIN},
        {"name": "ep2", "ep": 2, "max_epochs": 2, "model": NO_AUX, **TRAIN},
        {"name": "ep4", "ep": 4, "max_epochs": 2, "model": {"num_experts": 4, "gate_kwargs": {"z_loss_coef": 1e-3}},
         "validate": True, **TRAIN},
        {"name": "ep2_permuted", "ep": 2, "max_epochs": 2, "placement": [[3, 0], [1, 2]], "model": NO_AUX, **TRAIN},
        {"name": "ep2_late_experts", "ep": 2, "late_experts": True, "model": NO_AUX, **TRAIN},
        {"name": "ep2_staged_experts", "ep": 2, "spare": 1, "staged_experts": True, "model": NO_AUX, **TRAIN},
        {"name": "ep2_compiled", "ep": 2, "compile_backend": "aot_eager", "model": NO_AUX, **TRAIN},
        {"name": "ep2_replicas", "ep": 2, "spare": 1, "model": NO_AUX, **TRAIN},
        {"name": "ep2_global_balance", "ep": 2, "model": GLOBAL_BALANCE, **TRAIN},
        {"name": "ep2_replicas_compiled", "ep": 2, "spare": 1, "compile_backend": "aot_eager", "model": NO_AUX, **TRAIN},
        {"name": "resume_ep4", "ep": 4, "max_epochs": 2, "model": NO_AUX, "resume_from": str(out / RESUME_FROM),
         **TRAIN},
        {"name": "capacity_ep4", "ep": 4, "model": {"num_experts": 4, "capacity_factor": 1.0}, **TRAIN},
        {"name": "capacity_padded_ep1", "ep": 1, "model": {"num_experts": 4, "capacity_factor": 1.0,
                                                           "pad_to_capacity": True}, **TRAIN},
        {"name": "capacity_padded_ep4", "ep": 4, "model": {"num_experts": 4, "capacity_factor": 1.0,
                                                           "pad_to_capacity": True}, **TRAIN},
        *gate_scenarios(),
        {"name": "manual_ep2", "ep": 2, "manual": True, "model": NO_AUX, **TRAIN},
        {"name": "bf16", "ep": 2, "precision": "bf16-mixed", "model": {"num_experts": 4}, **TRAIN},
        {"name": "device_limited", "ep": 4, "device_limited": 1, "model": {"num_experts": 8}, **TRAIN},
        {"name": "err_world", "ep": 3, "expect_error": True, "model": {"num_experts": 6}, **TRAIN},
        {"name": "err_experts", "ep": 4, "expect_error": True, "model": {"num_experts": 6}, **TRAIN},
        {"name": "err_root", "ep": 2, "expect_error": True, "root_expert_param": True, **TRAIN},
        {"name": "err_mismatch", "ep": 2, "expect_error": True, "mismatch": True, **TRAIN},
        # 9 samples over 4 ranks: Lightning's predict sampler gives 3, 2, 2, 2 batches of 1.
        {"name": "predict_uneven", "ep": 2, "predict_samples": 9, "model": NO_AUX},
        {"name": "predict_even", "ep": 2, "predict_samples": 8, "model": NO_AUX},
        {"name": "err_device_balance", "ep": 1, "expect_error": True,
         "model": {"num_experts": 4, "gate_kwargs": {"device_balance_coef": 0.05}}, **TRAIN},
    ]


def read(out: Path, name: str, world_size: int = 4) -> list[dict]:
    return read_results(out, name, world_size)

def step_losses(results: list[dict]) -> np.ndarray:
    return per_step_losses(results, ACCUMULATE)


def final_state(out: Path, name: str, tmp: Path) -> dict[str, torch.Tensor]:
    """The final weights of a run, from its last checkpoint (a directory with sharded experts, DDP's
    single file without)."""
    return read_full_checkpoint(out / name / FINAL)["state_dict"]


def assert_states_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def reference(model_kwargs: dict, *, steps: int, world_size: int = 4, **kwargs) -> tuple[list[float], dict]:
    return reference_run(model_kwargs, world_size=world_size, batch_size=GLOBAL_BATCH // world_size,
                         accumulate=ACCUMULATE, steps=steps, clip=CLIP, num_samples=SAMPLES, **kwargs)


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world4")
    scenarios = out / "scenarios.json"
    scenarios.write_text(json.dumps(world4_scenarios(out)))
    launch(WORKER, [str(scenarios), str(out)], world_size=4, timeout=420, log_dir=out / "logs")
    return out


@pytest.fixture(scope="module")
def world2_torchrun(world4) -> Path:
    """Resume at world 2 / EP 2, started by torchrun (Lightning sees a TorchElastic environment), from
    the directory and from the consolidated single file."""
    out = world4 / "world2"
    out.mkdir()
    consolidated = consolidate_checkpoint(world4 / RESUME_FROM, out / "consolidated-step5.ckpt")
    scenarios = out / "scenarios.json"
    scenarios.write_text(json.dumps([
        {"name": "resume_w2", "ep": 2, "max_epochs": 2, "model": NO_AUX, "resume_from": str(world4 / RESUME_FROM),
         **TRAIN},
        {"name": "resume_w2_single_file", "ep": 2, "max_epochs": 2, "model": NO_AUX, "resume_from": str(consolidated),
         **TRAIN},
    ]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(WORKER), str(scenarios), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def world1(world4) -> Path:
    """Resume at world 1 under MoEStrategy from the directory, and under Lightning's default strategy
    from the consolidated single file."""
    out = world4 / "world1"
    out.mkdir()
    consolidated = consolidate_checkpoint(world4 / RESUME_FROM, out / "consolidated-step5.ckpt")
    scenarios = out / "scenarios.json"
    scenarios.write_text(json.dumps([
        {"name": "resume_w1", "ep": 1, "max_epochs": 2, "model": NO_AUX, "resume_from": str(world4 / RESUME_FROM),
         **TRAIN},
        {"name": "resume_w1_plain", "strategy": "auto", "max_epochs": 2, "model": NO_AUX,
         "resume_from": str(consolidated), **TRAIN},
    ]))
    launch(WORKER, [str(scenarios), str(out)], world_size=1, timeout=240, log_dir=out / "logs")
    return out


@pytest.mark.parametrize("name", ["ep1", "ep2", "ep4"])
def test_expert_parallel_matches_single_process(world4, tmp_path, name):
    results = read(world4, name, 4)
    model = {"ep2": NO_AUX}.get(name, {"num_experts": 4, "gate_kwargs": {"z_loss_coef": 1e-3}})
    ref_losses, ref_state = reference(model, steps=2 * STEPS_PER_EPOCH)
    np.testing.assert_allclose(step_losses(results), ref_losses, rtol=1e-4)
    assert_states_close(final_state(world4, name, tmp_path), ref_state)
    # Clipping was active: without it the reference ends elsewhere.
    _, unclipped = reference_run(model, world_size=4, batch_size=2, accumulate=ACCUMULATE, steps=2, clip=None,
                                 num_samples=SAMPLES)
    _, clipped = reference(model, steps=2)
    assert not torch.allclose(unclipped["proj_in.weight"], clipped["proj_in.weight"], rtol=1e-4)
    ep = int(name[-1])
    # Sharded experts need a directory; at EP 1 the checkpoint is DDP's single file.
    assert is_sharded_checkpoint(world4 / name / FINAL) == (ep > 1)
    assert (world4 / name / FINAL).is_file() == (ep == 1)
    for rank, result in enumerate(results):
        assert result["expert_shape"][0] == 4 // ep  # each rank holds E / ep experts
        assert result["global_step"] == 10
        assert len(result["tokens_sent_per_rank"]) == ep
    # `sync_dist=True` metrics: every rank logged the same world-averaged value.
    assert len({round(r["logged_loss"], 6) for r in results}) == 1


def test_validate_after_fit_and_from_checkpoint(world4):
    """``trainer.validate`` on the sharded module after fit, and on a fresh module (other init) from the
    checkpoint directory, both give the reference model's loss on the same data."""
    model = {"num_experts": 4, "gate_kwargs": {"z_loss_coef": 1e-3}}
    _, ref_state = reference(model, steps=2 * STEPS_PER_EPOCH)
    reference_model = TwoMoELayers(**model)
    reference_model.load_state_dict(ref_state)
    x, y = dataset(SAMPLES).tensors
    with torch.no_grad():
        expected = torch.nn.functional.mse_loss(reference_model(x), y).item()
    for result in read(world4, "ep4", 4):
        assert result["val_loss_after_fit"] == pytest.approx(expected, rel=1e-4)
        assert result["val_loss_from_checkpoint"] == pytest.approx(expected, rel=1e-4)


def test_experts_created_in_configure_model(world4):
    """A module whose MoE layers appear only in `configure_model` (as large models build them) is
    sharded and trained like any other: the same steps as its single-process reference."""
    ref_losses, _ = reference(NO_AUX, steps=STEPS_PER_EPOCH, model_class=LateExperts)
    np.testing.assert_allclose(step_losses(read(world4, "ep2_late_experts", 4)), ref_losses, rtol=1e-4)


def test_experts_frozen_at_setup_train_once_unfrozen(world4, tmp_path):
    """Staged fine-tuning at EP 2 with replicas: one layer's experts frozen when the strategy sets up
    (they take no gradient hook then) and unfrozen after 2 steps train like the single-process run."""
    ref_losses, ref_state = reference(NO_AUX, steps=STEPS_PER_EPOCH, model_class=StagedExperts)
    np.testing.assert_allclose(step_losses(read(world4, "ep2_staged_experts", 4)), ref_losses, rtol=1e-4)
    assert_states_close(read_full_checkpoint(world4 / "ep2_staged_experts" / FIRST_EPOCH)["state_dict"], ref_state)


def test_predict_with_uneven_shares_is_refused_on_every_rank(world4):
    """Every MoE forward is a collective under expert parallelism: a predict sampler that gives one
    rank an extra batch would hang it, so every rank refuses; even shares predict."""
    for result in read(world4, "predict_uneven", 4):
        assert "different numbers of batches ([3, 2, 2, 2])" in result["error"]
    assert [r["batches"] for r in read(world4, "predict_even", 4)] == [2, 2, 2, 2]


def test_compiled_layers_match_single_process(world4):
    """MoE layers compiled with ``torch.compile`` (the all-to-alls and their split sizes are graph
    breaks) train like the uncompiled single-process reference. The ``aot_eager`` backend traces and
    partitions the graphs as inductor would, without its kernel compilation time."""
    ref_losses, _ = reference(NO_AUX, steps=STEPS_PER_EPOCH)
    np.testing.assert_allclose(step_losses(read(world4, "ep2_compiled", 4)), ref_losses, rtol=1e-4)
    # With a replica of one expert per rank, split over its replicas from each step's counts (the
    # all-reduce of the counts and the balancer's small operations are compiled into the graph).
    replicas, replicas_compiled = read(world4, "ep2_replicas", 4), read(world4, "ep2_replicas_compiled", 4)
    assert [len(experts) for experts in replicas_compiled[0]["local_experts"]] == [3, 3]
    np.testing.assert_allclose(step_losses(replicas_compiled), step_losses(replicas), rtol=1e-4)
    np.testing.assert_allclose(step_losses(replicas), ref_losses, rtol=1e-4)


def test_global_load_balance_is_one_process_routing_the_global_batch(world4, tmp_path):
    """With ``load_balance_scope="global"`` the experts' shares are counted over all 4 ranks and the
    micro-batches accumulated so far, so the 4 ranks at EP 2 train as one process whose micro-batches
    are the global ones (a local loss there would be balanced per rank, a global one that did not pool
    per micro-batch: two other runs)."""
    results = read(world4, "ep2_global_balance", 4)
    one_process, _ = reference(GLOBAL_BALANCE, steps=STEPS_PER_EPOCH, world_size=1)
    np.testing.assert_allclose(step_losses(results), one_process, rtol=1e-4)
    _, one_process_state = reference(GLOBAL_BALANCE, steps=STEPS_PER_EPOCH, world_size=1)
    final = read_full_checkpoint(world4 / "ep2_global_balance" / FIRST_EPOCH)["state_dict"]
    assert_states_close(final, one_process_state)
    local = {**GLOBAL_BALANCE, "gate_kwargs": {**GLOBAL_BALANCE["gate_kwargs"], "load_balance_scope": "local"}}
    per_rank, _ = reference(local, steps=STEPS_PER_EPOCH)
    assert not np.allclose(step_losses(results), per_rank, rtol=1e-4)
    per_micro_batch, _ = reference(GLOBAL_BALANCE, steps=STEPS_PER_EPOCH, world_size=1, pool_micro_batches=False)
    assert not np.allclose(step_losses(results), per_micro_batch, rtol=1e-4)


def test_permuted_placement_matches_identity(world4, tmp_path):
    permuted, identity = read(world4, "ep2_permuted", 4), read(world4, "ep2", 4)
    assert permuted[0]["local_experts"][0] == [3, 0] and permuted[1]["local_experts"][0] == [1, 2]
    np.testing.assert_allclose(step_losses(permuted), step_losses(identity), rtol=1e-4)
    assert_states_close(final_state(world4, "ep2_permuted", tmp_path), final_state(world4, "ep2", tmp_path))


def _check_resumed(out: Path, name: str, world_size: int, world4: Path, tmp_path: Path) -> None:
    resumed = read(out, name, world_size)
    uninterrupted = step_losses(read(world4, "ep2", 4))
    assert resumed[0]["global_step"] == 10
    np.testing.assert_allclose(step_losses(resumed), uninterrupted[STEPS_PER_EPOCH:], rtol=1e-4)
    assert_states_close(final_state(out, name, tmp_path), final_state(world4, "ep2", tmp_path))


def test_resume_at_world4_ep4(world4, tmp_path):
    _check_resumed(world4, "resume_ep4", 4, world4, tmp_path)


def test_resume_at_world2_ep2_under_torchrun(world2_torchrun, world4, tmp_path):
    _check_resumed(world2_torchrun, "resume_w2", 2, world4, tmp_path)


def test_resume_at_ep2_from_a_single_file(world2_torchrun, world4, tmp_path):
    """A single file (consolidated, or an EP 1 run's) split into EP 2's shards, optimizer state
    included: the split used to read the number of experts from the state dict it had just made
    local, and every rank failed."""
    _check_resumed(world2_torchrun, "resume_w2_single_file", 2, world4, tmp_path)


def test_resume_at_world1(world1, world4, tmp_path):
    _check_resumed(world1, "resume_w1", 1, world4, tmp_path)
    # The consolidated single file resumes under Lightning's default strategy too, and its final
    # single-file checkpoint matches.
    resumed = read(world1, "resume_w1_plain", 1)
    np.testing.assert_allclose(step_losses(resumed), step_losses(read(world4, "ep2", 4))[STEPS_PER_EPOCH:], rtol=1e-4)
    plain = torch.load(next((world1 / "resume_w1_plain" / "checkpoints").glob("epoch=1*")), weights_only=True)
    assert_states_close(plain["state_dict"], final_state(world4, "ep2", tmp_path))


def test_consolidated_checkpoint_loads_without_process_group(world4, tmp_path):
    single = consolidate_checkpoint(world4 / "ep4" / FINAL, tmp_path / "full.ckpt")
    model = TwoMoELayers.load_from_checkpoint(single)
    assert model.blocks["first"].experts.w_in.shape[0] == 4
    assert not torch.distributed.is_initialized()
    _, ref_state = reference({"num_experts": 4, "gate_kwargs": {"z_loss_coef": 1e-3}}, steps=10)
    assert_states_close(model.state_dict(), ref_state)
    # Full optimizer state, as a single process would have saved it.
    optimizer_state = torch.load(single, weights_only=True)["optimizer_states"][0]["state"]
    names = [name for name, _ in model.named_parameters()]
    assert optimizer_state[names.index("blocks.first.experts.w_in")]["exp_avg"].shape == (4, 16, 16)


def test_capacity_mode_matches_single_process(world4, tmp_path):
    ref_losses, _ = reference({"num_experts": 4, "capacity_factor": 1.0}, steps=STEPS_PER_EPOCH)
    np.testing.assert_allclose(step_losses(read(world4, "capacity_ep4", 4)), ref_losses, rtol=1e-4)
    # Padded to capacity: every expert runs on its capacity of rows at EP 1; at EP 4 the dispatcher
    # removes the dropped assignments before the all-to-alls. The same training either way.
    for name in ("capacity_padded_ep1", "capacity_padded_ep4"):
        np.testing.assert_allclose(step_losses(read(world4, name, 4)), ref_losses, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("scenario", gate_scenarios(), ids=lambda s: s["name"])
def test_every_gate_trains_under_expert_parallelism(world4, scenario):
    results = read(world4, scenario["name"], 4)
    losses = step_losses(results)
    assert np.isfinite(losses).all() and len(losses) == STEPS_PER_EPOCH
    # Replicated gate state (weights, sigmoid biases) stays identical on every rank.
    assert all(r["gate_state"] == results[0]["gate_state"] for r in results)
    if scenario["model"]["gate"] == "noisy_topk":
        return  # its noise comes from each process's RNG stream, unlike the reference's
    ref_losses, ref_state = reference(scenario["model"], steps=STEPS_PER_EPOCH)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for key, value in results[0]["gate_state"].items():
        torch.testing.assert_close(torch.tensor(value), ref_state[f"blocks.first.gate.{key}"], rtol=1e-4, atol=1e-6)


def test_manual_optimization_accumulates_like_automatic(world4, tmp_path):
    """``manual_backward`` twice per ``optimizer.step()``, clipping by norm: the same steps as the
    single-process reference (each backward's expert gradients are synced as they arrive)."""
    results = read(world4, "manual_ep2", 4)
    ref_losses, ref_state = reference(NO_AUX, steps=STEPS_PER_EPOCH)
    assert results[0]["global_step"] == STEPS_PER_EPOCH
    np.testing.assert_allclose(step_losses(results), ref_losses, rtol=1e-4)
    single = consolidate_checkpoint(world4 / "manual_ep2" / FIRST_EPOCH, tmp_path / "manual.ckpt")
    assert_states_close(torch.load(single, weights_only=True)["state_dict"], ref_state)


def test_bf16_mixed_trains(world4):
    losses = step_losses(read(world4, "bf16", 4))
    ref_losses, _ = reference({"num_experts": 4}, steps=STEPS_PER_EPOCH)
    np.testing.assert_allclose(losses, ref_losses, atol=0.03)


def test_device_limited_routing_matches_reference(world4):
    results = read(world4, "device_limited", 4)
    groups = [e // 2 for e in range(8)]  # identity placement: experts 2r, 2r+1 on rank r
    ref_losses, _ = reference({"num_experts": 8}, steps=STEPS_PER_EPOCH, device_groups=(groups, 1))
    unlimited, _ = reference({"num_experts": 8}, steps=STEPS_PER_EPOCH)
    np.testing.assert_allclose(step_losses(results), ref_losses, rtol=1e-4)
    assert not np.allclose(ref_losses, unlimited, rtol=1e-4)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("err_world", "world size 4 is not divisible by expert_parallel_size=3"),
        ("err_experts", "num_experts=6, which is not divisible by expert_parallel_size=4"),
        ("err_root", "registered directly on the root module"),
        ("err_mismatch", "num_experts=8 on rank 1 but 4 on rank 0"),
        ("err_device_balance", "device_balance_coef=0.05 balances load across expert-parallel ranks, but "
                               "expert_parallel_size=1: there is nothing to balance"),
    ],
)
def test_setup_errors(world4, name, message):
    for result in read(world4, name, 4):
        assert message in result.get("error", ""), result


@pytest.mark.parametrize("launcher", ["torchrun", "lightning"])
def test_cli_fit_on_two_processes_then_consolidate(tmp_path, launcher):
    """``torchrun --nproc-per-node 2 -m lightning_moe fit``, or ``python -m lightning_moe fit`` with
    ``devices=2`` and Lightning's own launcher starting the second process, with
    MoEStrategy(expert_parallel_size=2); then ``lightning-moe consolidate`` and
    ``MoETransformer.load_from_checkpoint`` with no process group."""
    from lightning_moe import MoETransformer
    from lightning_moe.cli import main

    logs = tmp_path / "logs"
    model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_seq_len": 32, "num_experts": 4}
    start = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                     "--master-port", str(free_port())],
        "lightning": [sys.executable],
    }[launcher]
    command = [
        *start, "-m", "lightning_moe", "fit", "--config", str(REPO_ROOT / "recipes" / "quickstart.yaml"),
        "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.strategy", "lightning_moe.MoEStrategy", "--trainer.strategy.expert_parallel_size", "2",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(logs),
        "--trainer.logger.init_args.save_dir", str(logs),
        *[arg for key, value in model.items() for arg in (f"--model.init_args.{key}", str(value))],
        "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4",
    ]
    env = clean_env()
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    if launcher == "lightning":
        assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in done.stdout + done.stderr
    (checkpoint,) = logs.glob("*/version_0/checkpoints/*.ckpt")
    version = Path(committed_directory(checkpoint))
    assert sorted(p.name for p in version.iterdir()) == ["experts-ep00000.pt", "experts-ep00001.pt", "meta.pt"]

    assert main(["consolidate", str(checkpoint), str(tmp_path / "full.ckpt")]) == 0
    restored = MoETransformer.load_from_checkpoint(tmp_path / "full.ckpt")
    assert not torch.distributed.is_initialized()
    assert restored(torch.randint(0, 256, (1, 8))).isfinite().all()
    # The directory itself loads with the call users know, whole, in this one process.
    from_directory = MoETransformer.load_from_checkpoint(checkpoint)
    for key, value in restored.state_dict().items():
        assert torch.equal(from_directory.state_dict()[key], value), key


def test_experts_of_a_layer_no_rank_used_are_left_alone_by_the_optimizer(world4):
    """As in one process or under DDP with ``find_unused_parameters``: a layer skipped by every rank
    keeps ``grad = None``, so AdamW neither decays its experts nor keeps state for them. Skipped by one
    EP group only, its experts train from the other group's gradients, the same on both replicas."""
    for result in read(world4, "second_layer_unused"):
        assert result["second_experts_moved"] == 0.0 and result["second_experts_state"] == []
    results = read(world4, "second_layer_unused_by_one_group")
    assert all(r["second_experts_moved"] > 0 and "exp_avg" in r["second_experts_state"] for r in results)
    for rank in (0, 1):  # EP rank r of the two groups holds the same experts: replicas stay equal
        np.testing.assert_array_equal(results[rank]["second_experts"], results[rank + 2]["second_experts"])


def test_experts_are_not_reordered_at_ep1(world4):
    """At EP 1 the experts are not sharded and the checkpoint is DDP's single file in logical order: a
    table that reorders them would be saved in slot order and read back as logical, so none is taken."""
    from lightning_moe import MoEStrategy

    for result in read(world4, "ep1"):
        assert "apply_placement needs expert_parallel_size > 1" in result["apply_placement_error"]
    with pytest.raises(ValueError, match=r"expert_placement=\[\[1, 0, 3, 2\]\] reorders the experts"):
        MoEStrategy(expert_parallel_size=1, expert_placement=[[1, 0, 3, 2]])
    assert MoEStrategy(expert_placement=[[0, 1, 2, 3]]).expert_placement == [[0, 1, 2, 3]]
