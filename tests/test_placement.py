"""Expert placement that changes while training runs, with real gloo processes: slot tables with
replicas, moved in place with their optimizer state (tests/dist_workers/placement_worker.py).

World 4 at EP 2 and EP 4, and world 2 at EP 2 (also with compiled MoE layers), one spare slot per
rank: 20 optimizer steps (accumulation 2, clipping by norm, AdamW) with 6 forced migrations to
random tables (different per layer, replicas added and dropped, random routing fractions) give the
losses, weights and Adam states of the same run with a static placement. A migration followed by its inverse restores every tensor
bit for bit; the bytes sent are those of the slots that changed; a checkpoint saved with a migrated
placement reinstates it at the same layout and falls back to the default elsewhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))

from launch import launch, read_results, step_losses as per_step_losses  # noqa: E402

from lightning_moe.checkpoint import read_full_checkpoint  # noqa: E402
from lightning_moe.parallel.placement import ExpertPlacement  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_workers" / "placement_worker.py"
MODEL = {"num_experts": 4, "gate_kwargs": {"load_balance_coef": 0.0, "z_loss_coef": 1e-3}}
MIGRATE_AT = [2, 5, 8, 11, 14, 17]
ACCUMULATE = 2
# Bytes of one expert slot: w_in [D, 2F] and w_out [F, D] in fp32, each with Adam's exp_avg and exp_avg_sq.
SLOT_BYTES = (16 * 2 * 8 + 8 * 16) * 4 * 3
RESUME_FROM = "migrate_ep2/checkpoints/epoch=1-step=10.ckpt"
DEVICE_OPTIONS = {"load_balance_coef": 0.0, "device_balance_coef": 0.05, "communication_balance_coef": 0.02,
                  "device_capacity_factor": 1.0}


def world4_scenarios(out: Path) -> list[dict]:
    return [
        {"name": "static_ep2", "ep": 2, "model": MODEL},
        {"name": "migrate_ep2", "ep": 2, "model": MODEL, "migrate_at": MIGRATE_AT, "inverse_at": 4,
         "mid_accumulation_at": 6, "differing_at": 3},
        {"name": "static_ep4", "ep": 4, "model": MODEL},
        {"name": "migrate_ep4", "ep": 4, "model": MODEL, "migrate_at": MIGRATE_AT, "inverse_at": 4},
        {"name": "resume_ep2", "ep": 2, "model": MODEL, "migrate_at": [11, 14, 17], "resume_from": str(out / RESUME_FROM)},
        {"name": "resume_ep4", "ep": 4, "model": MODEL, "resume_from": str(out / RESUME_FROM)},
        {"name": "device_limited_ep4", "ep": 4, "steps": 4, "device_limit": 2, "unroutable_at": 2,
         "model": {**MODEL, "top_k": 3}},
    ]


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("placement4")
    (out / "scenarios.json").write_text(json.dumps(world4_scenarios(out)))
    launch(WORKER, [str(out / "scenarios.json"), str(out)], world_size=4, timeout=480, log_dir=out / "logs")
    return out


@pytest.fixture(scope="module")
def world2(world4) -> Path:
    out = world4 / "world2"
    out.mkdir()
    (out / "scenarios.json").write_text(json.dumps([
        {"name": "static_w2", "ep": 2, "model": MODEL},
        {"name": "migrate_w2", "ep": 2, "model": MODEL, "migrate_at": MIGRATE_AT, "inverse_at": 4},
        {"name": "migrate_w2_compiled", "ep": 2, "model": MODEL, "migrate_at": MIGRATE_AT, "compile_backend": "aot_eager"},
        {"name": "resume_w2", "ep": 2, "model": MODEL, "migrate_at": [11, 14, 17],
         "resume_from": str(world4 / RESUME_FROM)},
        {"name": "device_balance", "ep": 2, "steps": 8, "migrate_at": [2, 5],
         "model": {"num_experts": 4, "gate_kwargs": DEVICE_OPTIONS}},
    ]))
    launch(WORKER, [str(out / "scenarios.json"), str(out)], world_size=2, timeout=300, log_dir=out / "logs")
    return out


def read(out: Path, name: str, world_size: int) -> list[dict]:
    return read_results(out, name, world_size)

def step_losses(results: list[dict]) -> np.ndarray:
    return per_step_losses(results, ACCUMULATE)


def assert_same_final_state(out: Path, name: str, reference: str, rtol: float) -> None:
    final, expected = (read_full_checkpoint(out / n / "final.ckpt") for n in (name, reference))
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=rtol, atol=1e-7, msg=key)
    for index, state in expected["optimizer_states"][0]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(final["optimizer_states"][0]["state"][index][key], state[key], rtol=rtol,
                                       atol=1e-9, msg=f"{index} {key}")


@pytest.mark.parametrize(("fixture", "static", "migrated", "world_size"), [
    ("world4", "static_ep2", "migrate_ep2", 4),
    ("world4", "static_ep4", "migrate_ep4", 4),
    ("world2", "static_w2", "migrate_w2", 2),
])
def test_migrations_keep_the_function_and_the_training(request, fixture, static, migrated, world_size):
    out = request.getfixturevalue(fixture)
    static_results, migrated_results = read(out, static, world_size), read(out, migrated, world_size)
    np.testing.assert_allclose(step_losses(migrated_results), step_losses(static_results), rtol=1e-6)
    assert_same_final_state(out, migrated, static, rtol=1e-5)

    reports = migrated_results[0]["reports"]
    assert [r["step"] for r in reports] == MIGRATE_AT
    assert any(r["new"]["blocks.first"] != r["new"]["blocks.second"] for r in reports)  # tables per layer
    replicated = [
        {name: sorted({e for e in range(4) if sum(e in rank for rank in r[side][name]) > 1}) for name in r[side]}
        for r in reports for side in ("old", "new")
    ]
    assert len({json.dumps(x) for x in replicated}) > 2  # replicas added and dropped
    for rank, result in enumerate(migrated_results):
        assert result["inverse_bitwise"] is True, rank
        assert result["balance_replicas"] == [True, True]  # the strategy's default reaches every dispatcher


def test_migration_sends_exactly_the_changed_slots(world4):
    results = read(world4, "migrate_ep2", 4)
    for index, report in enumerate(results[0]["reports"]):
        changed = 0
        for name in report["old"]:
            old, new = report["old"][name], report["new"][name]
            for rank in range(len(new)):
                for slot, expert in enumerate(new[rank]):
                    # A slot whose expert changes travels over the network unless its rank had it already.
                    if old[rank][slot] != expert and expert not in old[rank]:
                        changed += 1
        # Each EP group (two of them at world 4, EP 2) moves its own copies.
        sent = sum(r["reports"][index]["bytes_sent"] for r in results)
        received = sum(r["reports"][index]["bytes_received"] for r in results)
        assert sent == received == 2 * changed * SLOT_BYTES, (index, sent, changed)


def test_migration_mid_accumulation_is_refused(world4):
    for result in read(world4, "migrate_ep2", 4):
        assert "mid-accumulation" in result["mid_accumulation_error"]


def test_tables_that_differ_across_ranks_are_refused_on_every_rank(world4):
    # Only global rank 0's routing fractions differ (the slots agree): compared by digest, they
    # must still be caught, on every rank, before anything moves.
    for result in read(world4, "migrate_ep2", 4):
        assert "different tables on different ranks" in result["differing_error"]
        assert result["unchanged_after_refusal"] is True
        # A table invalid on rank 1 alone raises there and, through the same check, on every rank.
        assert "twice" in result["invalid_error"]  # and a table that is not integers (a TypeError there):
        assert result["invalid_error"].count("the table for `blocks.first`") == 2


def test_a_table_device_limited_routing_cannot_route_with_is_refused_before_anything_moves(world4):
    """Device-limited routing to 2 of 4 ranks with top_k=3: a table where two ranks hold the same two
    experts is refused on every rank (replicas count once), and the placement in force is kept."""
    results = read(world4, "device_limited_ep4", 4)
    for result in results:
        assert "can leave a token 2 distinct expert(s), fewer than top_k=3" in result["unroutable_error"]
        assert result["unchanged_after_refusal"] is True and result["global_step"] == 4


def test_resume_reinstates_the_saved_placement_at_the_same_layout(world4, world2):
    uninterrupted = read(world4, "migrate_ep2", 4)
    saved_table = uninterrupted[0]["reports"][2]["new"]  # the migration at step 8, in force at step 10
    for out, name, world_size in ((world4, "resume_ep2", 4), (world2, "resume_w2", 2)):
        resumed = read(out, name, world_size)
        assert resumed[0]["placements_at_start"] == saved_table, name
        assert resumed[0]["global_step"] == 20
        rtol = 1e-6 if world_size == 4 else 1e-4  # world 2 splits each step's batch differently
        np.testing.assert_allclose(step_losses(resumed), step_losses(uninterrupted)[10:], rtol=rtol)
    assert_same_final_state(world4, "resume_ep2", "migrate_ep2", rtol=1e-6)


def test_resume_at_another_layout_starts_from_the_default_placement(world4):
    resumed = read(world4, "resume_ep4", 4)
    default = ExpertPlacement.identity(4, 4, spare_slots=1).experts_per_rank()
    assert resumed[0]["placements_at_start"] == {"blocks.first": default, "blocks.second": default}
    np.testing.assert_allclose(step_losses(resumed), step_losses(read(world4, "migrate_ep2", 4))[10:], rtol=1e-4)
    log = (world4 / "logs" / "rank0.log").read_text()
    assert "the checkpoint's expert placement (blocks.first: 2 ranks x 3 slots) does not fit this run" in log


def test_device_level_balance_over_the_table_in_force(world2):
    """DeepSeek-V2's device-level and communication losses and device-level dropping at EP 2 with
    replicas and migrations: the losses are there, and no rank sends a destination more assignments
    than its capacity (ceil(1.0 * assignments / 2)), counted by the dispatcher itself."""
    for result in read(world2, "device_balance", 2):
        assert {"device_balance_loss", "communication_balance_loss"} <= set(result["aux_losses"])
        assert result["global_step"] == 8 and len(result["reports"]) == 2
        for sent, routed in zip(result["sent_per_rank"], result["routed"]):
            assert max(sent) <= -(-routed // 2)
        assert sum(result["dropped"]) > 0


def test_compiled_layers_migrate_and_train_like_static_eager_ones(world2):
    """MoE layers compiled with ``torch.compile`` (``aot_eager``: the tracing without inductor's
    kernel compilation) through 6 migrations to random tables: the losses and final state of the
    static eager run, and the compiler still at work at the end (no recompile limit reached)."""
    compiled, static = read(world2, "migrate_w2_compiled", 2), read(world2, "static_w2", 2)
    np.testing.assert_allclose(step_losses(compiled), step_losses(static), rtol=1e-5)
    assert_same_final_state(world2, "migrate_w2_compiled", "static_w2", rtol=1e-5)
    for result in compiled:
        assert result["compiled_graphs"] > 0
        assert not any("limit" in reason for reason in result["graph_break_reasons"]), result["graph_break_reasons"]
