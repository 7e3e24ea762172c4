"""MoEStrategy as a drop-in for Lightning's DDPStrategy: the DDP behaviours that Lightning's own
strategy tests cover, written anew and run with real gloo processes, on a dense model (where
MoEStrategy must match DDPStrategy exactly) and on an MoE model.

World 2 is launched once and runs every scenario (tests/dist_workers/dropin_worker.py); the averager
check needs world 4 (EP 2 x EDP 2) and has its own launch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))

from launch import launch, read_results  # noqa: E402

from lightning_moe.checkpoint import is_sharded_checkpoint  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_workers" / "dropin_worker.py"


def scenarios(out: Path) -> list[dict]:
    return [
        {"name": "dense_ddp", "strategy": "ddp", "max_epochs": 2},
        {"name": "dense_moe", "ep": 2, "max_epochs": 2},  # no MoE layer: EP 2 must change nothing
        {"name": "dense_moe_resumed_by_ddp", "strategy": "ddp", "max_epochs": 2,
         "resume_from": str(out / "dense_moe/checkpoints/epoch=0-step=5.ckpt")},
        {"name": "dense_ddp_local_sgd", "strategy": "ddp", "post_local_sgd": True},
        {"name": "dense_moe_local_sgd", "post_local_sgd": True},
        {"name": "moe_local_sgd", "model": "moe", "ep": 2, "post_local_sgd": True},
        {"name": "ignored_ddp", "strategy": "ddp", "model": "rank_tagged"},
        {"name": "ignored_moe", "model": "rank_tagged"},
        {"name": "zero_ddp", "strategy": "ddp", "zero": True},
        {"name": "zero_moe", "zero": True},
        {"name": "zero_moe_ep2", "model": "moe", "ep": 2, "zero": True, "expect_error": True},
        {"name": "moe_ep2_io", "model": "moe", "ep": 2, "counting_io": True,
         "save_to_url": "file://" + str(out / "moe_ep2_io" / "url" / "step5.ckpt")},
        {"name": "moe_ep2_resume_url", "model": "moe", "ep": 2, "max_epochs": 2,
         "resume_from": "file://" + str(out / "moe_ep2_io" / "url" / "step5.ckpt")},
        {"name": "uploading_logger", "model": "moe", "ep": 2, "uploading_logger": True, "expect_error": True},
        {"name": "val_ppl"},
    ]


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dropin")
    (out / "scenarios.json").write_text(json.dumps(scenarios(out)))
    launch(WORKER, [str(out / "scenarios.json"), str(out)], world_size=2, timeout=420, log_dir=out / "logs")
    return out


def read(out: Path, name: str, world_size: int = 2) -> list[dict]:
    return read_results(out, name, world_size)

def states(out: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / name / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_dense_model_trains_bit_for_bit_like_ddp(world2):
    """Same losses and weights to the last bit, gradient clipping by norm included (the norm is
    computed as torch's `clip_grad_norm_` does)."""
    ddp, moe = read(world2, "dense_ddp"), read(world2, "dense_moe")
    for rank in range(2):
        assert moe[rank]["losses"] == ddp[rank]["losses"]
    assert_bitwise(states(world2, "dense_moe")[0], states(world2, "dense_ddp")[0])


def test_dense_checkpoint_is_ddps_single_file(world2):
    """No sharded experts: one file, which `LightningModule.load_from_checkpoint`, `torch.load` and a
    resumed DDPStrategy run all take."""
    for result in read(world2, "dense_moe"):
        assert result["checkpoint_is_directory"] is False
        assert {"state_dict", "optimizer_states", "loops"} <= set(result["torch_load_keys"])
    # Rank 0 saved it (rank 1's BatchNorm statistics differ from rank 0's under DDP, as always).
    assert read(world2, "dense_moe")[0]["restored_matches"] is True
    resumed, uninterrupted = read(world2, "dense_moe_resumed_by_ddp"), read(world2, "dense_ddp")
    assert resumed[0]["global_step"] == 10
    assert resumed[0]["losses"] == uninterrupted[0]["losses"][10:]
    assert_bitwise(states(world2, "dense_moe_resumed_by_ddp")[0], states(world2, "dense_ddp")[0])


def test_post_local_sgd_model_averaging_is_kept(world2):
    """`ddp_comm_state=PostLocalSGDState(...)` with `model_averaging_period` enables model averaging
    as in DDPStrategy (it used to be dropped), expert-aware when experts are sharded."""
    assert read(world2, "dense_ddp_local_sgd")[0]["model_averager"] == "PeriodicModelAverager"
    assert read(world2, "dense_moe_local_sgd")[0]["model_averager"] == "PeriodicModelAverager"
    assert read(world2, "dense_moe_local_sgd")[0]["losses"] == read(world2, "dense_ddp_local_sgd")[0]["losses"]
    moe = read(world2, "moe_local_sgd")
    assert moe[0]["model_averager"] == "ExpertAwareModelAverager" and moe[0]["global_step"] == 5


def test_expert_aware_averager_averages_experts_over_edp_only(tmp_path):
    (tmp_path / "scenarios.json").write_text(json.dumps([{"name": "averager"}]))
    launch(WORKER, [str(tmp_path / "scenarios.json"), str(tmp_path)], world_size=4, timeout=120,
           log_dir=tmp_path / "logs")
    results = read(tmp_path, "averager", world_size=4)
    for rank, result in enumerate(results):
        assert result["before"] == [[float(rank)] * 3, [float(rank)] * 2]  # warm-up step
        assert result["dense"] == [1.5] * 3  # mean of ranks 0..3
        # EDP groups {0, 2} and {1, 3} hold the same experts: they average among themselves only.
        assert result["expert"] == [float(rank % 2 + 1)] * 2


def test_users_ignored_params_and_buffers_stay_ignored(world2):
    """A user's `_ddp_params_and_buffers_to_ignore` is kept (it used to be overwritten), in fit and in
    the states sync outside fit."""
    for name in ("ignored_ddp", "ignored_moe"):
        for rank, result in enumerate(read(world2, name)):
            assert result["rank_tag"] == [float(rank)], name
            assert result["rank_weight"] == [float(rank)] * 2, name
            assert result["rank_tag_after_validate"] == [float(rank)], name


def test_zero_redundancy_optimizer(world2):
    """ZeRO checkpoints save on every rank (rank > 0 used to raise `KeyError: 'state'`) and train like
    DDP; with sharded experts ZeRO is refused at setup, because it would overwrite experts."""
    assert read(world2, "zero_moe")[0]["losses"] == read(world2, "zero_ddp")[0]["losses"]
    assert read(world2, "zero_moe")[0]["global_step"] == 5
    for result in read(world2, "zero_moe_ep2"):
        assert "ZeroRedundancyOptimizer cannot hold expert shards" in result["error"]


def test_checkpoint_io_and_url_paths(world2):
    """Every file of a checkpoint directory goes through the strategy's `checkpoint_io`, to an fsspec URL
    (`file://` here; `s3://`, `gs://` take the same path), and a run resumes from that URL."""
    rank0, rank1 = read(world2, "moe_ep2_io")
    assert rank0["checkpoint_is_directory"] and rank0["restored_matches"]
    # ModelCheckpoint's save (epoch 0), then the save to the URL.
    assert sorted(rank0["saved_through_io"]) == ["experts-ep00000.pt"] * 2 + ["meta.pt"] * 2
    assert rank1["saved_through_io"] == ["experts-ep00001.pt"] * 2
    assert is_sharded_checkpoint(world2 / "moe_ep2_io" / "url" / "step5.ckpt")
    assert not Path("file:").exists()
    assert read(world2, "moe_ep2_resume_url")[0]["global_step"] == 10


def test_repeated_fits_reuse_the_expert_parallel_groups(world2):
    """Each fit used to create process groups that were never destroyed: now the first fit at an EP size
    builds them and every later fit, validate or save reuses them."""
    for first in ("dense_moe", "dense_moe_local_sgd"):  # the first fits at EP 2 and at EP 1
        assert read(world2, first)[0]["groups_after"] > read(world2, first)[0]["groups_before"]
    for name in ("moe_local_sgd", "ignored_moe", "zero_moe", "moe_ep2_io", "moe_ep2_resume_url"):
        for result in read(world2, name):
            assert result["groups_after"] == result["groups_before"], name


def test_uploading_loggers_are_refused_with_sharded_experts(world2):
    for result in read(world2, "uploading_logger"):
        assert "uploads checkpoints (`log_model`)" in result["error"]
        assert "lightning-moe consolidate" in result["error"]


def test_val_loss_and_ppl_are_the_worlds_token_weighted_mean(world2):
    results = read(world2, "val_ppl")
    loss_sum = sum(r["loss_sum"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    expected = torch.exp(torch.tensor(loss_sum / tokens)).item()
    mean_of_exp = sum(torch.exp(torch.tensor(r["loss_sum"] / r["tokens"])).item() for r in results) / 2
    assert abs(expected - mean_of_exp) > 1e-3 * expected  # the two definitions differ on this data
    mean_of_means = sum(r["loss_sum"] / r["tokens"] for r in results) / 2
    assert abs(loss_sum / tokens - mean_of_means) > 1e-3  # so do a token-weighted and a per-rank mean
    for result in results:
        assert result["val_ppl"] == pytest.approx(expected, rel=1e-5)
        assert result["val_loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
