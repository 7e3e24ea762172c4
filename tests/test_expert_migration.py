"""ExpertMigration end to end, with real gloo processes (tests/dist_workers/migration_worker.py):
world 4 at EP 2 with one spare slot per rank, a load skewed towards EP rank 0's experts. With the
callback the run migrates, balances the predicted load, and follows the loss of the same run
without it; TensorBoard holds the migration scalars and the placement images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))

from launch import launch, read_results, step_losses as per_step_losses  # noqa: E402

from lightning_moe.parallel.replica_balance import SPLITS  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_workers" / "migration_worker.py"
ACCUMULATE = 2


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("migration")
    (out / "scenarios.json").write_text(json.dumps([
        {"name": "static"},
        {"name": "migrate", "migrate": True, "every": 4},
        {"name": "migrate_with_monitor", "migrate": True, "every": 4, "monitor": True},
        {"name": "planning_fails_on_rank_1", "migrate": True, "every": 4, "steps": 6, "fail_on_rank": 1},
        {"name": "measured_links", "migrate": True, "every": 4, "steps": 2,
         "measure_links": {"message_bytes": 1 << 16, "repetitions": 2}},
    ]))
    launch(WORKER, [str(out / "scenarios.json"), str(out)], world_size=4, timeout=300, log_dir=out / "logs")
    return out


def read(out: Path, name: str, world_size: int = 4) -> list[dict]:
    return read_results(out, name, world_size)

def step_losses(results: list[dict]) -> np.ndarray:
    return per_step_losses(results, ACCUMULATE)


@pytest.mark.parametrize("name", ["migrate", "migrate_with_monitor"])
def test_migrates_on_a_skewed_load_and_keeps_the_loss(world4, name):
    results, static = read(world4, name), read(world4, "static")
    history = results[0]["history"]
    assert all(r["history"] == history for r in results)  # every rank applied the same
    # The two layers are planned in turns, one by rank 0 and one by rank 1, at each of two re-plans.
    assert [r["layers_planned_here"] for r in results] == [2, 2, 0, 0]
    assert [entry["step"] for entry in history] == [4, 8]
    first = history[0]
    assert first["layers_moved"] >= 1 and first["experts_moved"] >= 1 and first["bytes"] > 0
    assert first["predicted_max_over_mean_after"] < first["predicted_max_over_mean_before"]
    assert first["predicted_layer_seconds_after"] < first["predicted_layer_seconds_before"]
    assert "measured_step_seconds_after" in history[1]
    assert results[0]["placements"] != static[0]["placements"]
    # A moved layer's table carries the plan's load shares and the cost model's prices of an
    # assignment, with which per-step replica balancing chooses its fractions.
    moved = [n for n in results[0]["placements"] if results[0]["placements"][n] != static[0]["placements"][n]]
    assert all(abs(sum(results[0]["load_shares"][n]) - 1.0) < 1e-9 for n in moved)
    assert all(r["load_shares"] == results[0]["load_shares"] for r in results)
    assert all(min(results[0]["assignment_seconds"][n][:2]) > 0 for n in moved)  # compute and sends priced
    assert all(r["assignment_seconds"] == results[0]["assignment_seconds"] for r in results)
    # Migration moves experts, not the function: the loss of the run without it (EP tolerance).
    np.testing.assert_allclose(step_losses(results), step_losses(static), rtol=1e-4)
    if name == "migrate_with_monitor":
        # The monitor counts which split per-step replica balancing kept in every dispatch (the spare
        # slots hold replicas from the start): each window of 2 steps has 2 x 2 micro-batches on
        # each of the 4 ranks. This run keeps the planned fractions and, on some steps, a fit.
        splits = results[0]["replica_split"]
        assert all(r["replica_split"] == splits for r in results)
        assert len(splits) == 6 and all(sum(kept) == 16 for window in splits for kept in window)
        totals = np.sum(splits, axis=(0, 1))
        assert totals[0] > 0 and totals[1] + totals[2] > 0, totals


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> Path:
    """Runs at world 2, EP 2: a full run that checkpoints after every step, runs resumed from its
    checkpoints, and runs with a monitor, a short monitor history or a slow validation."""
    out = tmp_path_factory.mktemp("migration_world2")
    (out / "scenarios.json").write_text(json.dumps([
        {"name": "full", "migrate": True, "every": 4, "checkpoint_every": 1, "checkpoints": "own"},
        {"name": "resumed_at_4", "migrate": True, "every": 4, "resume_from": 4, "checkpoints": "own"},
        {"name": "resumed_at_2", "migrate": True, "every": 4, "resume_from": 2, "checkpoints": "own"},
        {"name": "monitor_full", "migrate": True, "every": 4, "monitor": True, "steps": 9,
         "checkpoint_every": 1, "checkpoints": "monitored"},
        {"name": "monitor_resumed_at_3", "migrate": True, "every": 4, "monitor": True, "steps": 9, "resume_from": 3,
         "checkpoints": "monitored"},
        {"name": "monitor_short_history", "migrate": True, "every": 4, "monitor": True, "monitor_every": 1,
         "history_size": 2, "steps": 5},
        {"name": "slow_validation", "migrate": True, "every": 4, "steps": 5, "validation_seconds": 3.0,
         "validate_every_batches": 4},
        {"name": "second_layer_in_odd_batches", "migrate": True, "every": 4, "steps": 5,
         "second_layer_in_odd_batches": True},
    ]))
    launch(WORKER, [str(out / "scenarios.json"), str(out)], world_size=2, timeout=400, log_dir=out / "logs")
    return out


@pytest.fixture(scope="module")
def world4_resumed(world2, tmp_path_factory) -> Path:
    """World 4 (two EP groups of 2) resumed from world 2's checkpoint at step 4, a re-plan step whose
    window (and the monitor's) world 2 counted."""
    out = tmp_path_factory.mktemp("migration_world4_resumed")
    (out / "scenarios.json").write_text(json.dumps([
        {"name": "monitor_resumed_at_4", "migrate": True, "every": 4, "monitor": True, "steps": 9, "resume_from": 4,
         "checkpoints": str(world2 / "monitored")},
    ]))
    launch(WORKER, [str(out / "scenarios.json"), str(out)], world_size=4, timeout=300, log_dir=out / "logs")
    return out


def replans(results: list[dict]) -> list[tuple]:
    return [(entry["step"], entry["layers_moved"], entry["experts_moved"]) for entry in results[0]["history"]]


def per_step_totals(results: list[dict]) -> list[float]:
    """The assignments per step of each window a rank planned from (every token takes one expert,
    none is dropped: the same in every window, whatever steps it covers)."""
    return [float(np.sum(load)) for result in results for load in result["planned_loads"]]


def test_a_run_resumed_at_a_replan_step_replans_there_from_the_saved_window(world2):
    """The checkpoint of step 4 is written after the step that closes the window and before the
    re-plan (the next batch's start): the resumed run re-plans at its first batch, from the loads
    the checkpoint holds, and goes on as the full run did."""
    full, resumed = read(world2, "full", 2), read(world2, "resumed_at_4", 2)
    assert replans(full)[0][1] >= 1 and replans(resumed) == replans(full) and [r[0] for r in replans(full)] == [4, 8]
    for mine, theirs in zip(resumed, full):
        np.testing.assert_allclose(mine["planned_loads"], theirs["planned_loads"], rtol=1e-12)
        assert mine["placements"] == theirs["placements"]
    np.testing.assert_allclose(step_losses(resumed), step_losses(full)[4:], rtol=1e-5)


def test_a_run_resumed_at_another_world_size_measures_its_windows_afresh(world2, world4_resumed):
    """The saved window holds world 2's counts (one EP group); at world 4 two groups share the world's
    tokens, so it would plan from another scale (or, at another EP size, other ranks). The resumed run
    drops it, measures from the resume and re-plans at step 8 from its own per-group load: half of
    world 2's per step (the same global batch over two EP groups)."""
    full, resumed = read(world2, "monitor_full", 2), read(world4_resumed, "monitor_resumed_at_4", 4)
    assert [r[0] for r in replans(full)] == [4, 8] and [r[0] for r in replans(resumed)] == [8]
    (world2_per_step,) = set(np.round(per_step_totals(full), 6))
    assert set(np.round(per_step_totals(resumed), 6)) == {world2_per_step / 2}


def test_a_run_resumed_mid_window_keeps_the_schedule_and_the_per_step_load(world2):
    """Resumed at step 2 (the window's first two steps' counts are not in the checkpoint): the
    re-plans stay at steps 4 and 8, and the load is divided by the steps actually counted."""
    full, resumed = read(world2, "full", 2), read(world2, "resumed_at_2", 2)
    assert [r[0] for r in replans(resumed)] == [4, 8]
    np.testing.assert_allclose(per_step_totals(resumed), per_step_totals(full), rtol=1e-12)
    # With the monitor: its window (2, 4] is cut to (3, 4] by the resume at step 3.
    full, resumed = read(world2, "monitor_full", 2), read(world2, "monitor_resumed_at_3", 2)
    assert [r[0] for r in replans(resumed)] == [r[0] for r in replans(full)] == [4, 8]
    np.testing.assert_allclose(per_step_totals(resumed), per_step_totals(full), rtol=1e-12)


def test_a_monitor_whose_history_is_shorter_than_the_window_is_not_read(world2):
    """A monitor every step keeping 2 windows holds half of a 4-step window: the callback counts
    itself, and plans from the same load as without the monitor."""
    for short, full in zip(read(world2, "monitor_short_history", 2), read(world2, "full", 2)):
        np.testing.assert_allclose(short["planned_loads"][0], full["planned_loads"][0], rtol=1e-12)


def test_a_layer_that_skips_a_batch_adds_nothing_for_it(world2):
    """Counting itself, the callback used to add a layer's last forward again in a batch where the
    layer did not run: the second layer, in one micro-batch of two, counted as much as the first.
    Rank 0 plans the first layer, rank 1 the second (one assignment per token, none dropped)."""
    first, second = (per_step_totals([result]) for result in read(world2, "second_layer_in_odd_batches", 2))
    assert len(first) == len(second) == 1 and second[0] == pytest.approx(first[0] / 2), (first, second)


def test_validation_time_is_not_a_training_step(world2):
    """Validation sleeps 3 s after step 2: the measured step time (the window's mean, 0.75 s more
    with it) leaves it out."""
    (entry,) = read(world2, "slow_validation", 2)[0]["history"]
    assert entry["step"] == 4 and 0 < entry["measured_step_seconds"] < 0.5, entry


def test_planning_that_fails_on_one_rank_stops_every_rank(world4):
    """Rank 1 plans a layer and fails: every rank raises the same error (none waits in the gather)."""
    for result in read(world4, "planning_fails_on_rank_1"):
        assert "rank 1, layer 'blocks." in result["error"] and "the planner broke here" in result["error"], result


def test_a_plan_device_limited_routing_cannot_use_keeps_the_placement(tmp_path):
    """World 3 at EP 3, tokens limited to 2 ranks and routed to all 3 experts: the trigger returns a
    plan whose ranks 0 and 1 hold experts 0 and 1 only. Every rank keeps the placement in force (no
    layer moved or re-routed), warns once per layer and trains on."""
    (tmp_path / "scenarios.json").write_text(json.dumps([
        {"name": "unroutable", "migrate": True, "every": 4, "steps": 6, "ep": 3, "device_limit": 2,
         "unroutable_plan": True},
    ]))
    launch(WORKER, [str(tmp_path / "scenarios.json"), str(tmp_path)], world_size=3, timeout=300,
           log_dir=tmp_path / "logs")
    results = read(tmp_path, "unroutable", 3)
    default = [[0, 1], [1, 2], [2, 0]]
    for result in results:
        assert result["placements"] == {"blocks.first": default, "blocks.second": default}, result["placements"]
        (entry,) = result["history"]
        assert entry["step"] == 4 and entry["layers_moved"] == entry["layers_rerouted"] == 0, entry
        assert entry["predicted_layer_seconds_after"] == entry["predicted_layer_seconds_before"], entry
        assert len(result["losses"]) == 2 * 6  # two micro-batches per step
    messages = results[0]["migration_warnings"]
    assert len(messages) == 2 and all("keeps its placement" in m and "top_k=3" in m for m in messages), messages


def test_measure_links_plans_with_the_links_it_timed_the_same_on_every_rank(world4):
    """`measure_links`: the callback times the link inside the node (EP 2 on one machine: no link
    across nodes to time) when training starts; every rank plans with the same figures."""
    from lightning_moe import Topology

    declared = Topology(1, 2)
    topologies = [result["topology"] for result in read(world4, "measured_links")]
    assert all(topology == topologies[0] for topology in topologies)
    measured = topologies[0]
    assert (measured["num_nodes"], measured["ranks_per_node"]) == (1, 2)
    assert measured["intra_node_bandwidth"] != declared.intra_node_bandwidth and measured["intra_node_bandwidth"] > 0
    assert measured["intra_node_latency"] > 0
    assert measured["inter_node_bandwidth"] == declared.inter_node_bandwidth  # not probed, as declared
    # What the planner works with is in TensorBoard, logged when training starts.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (world4 / "measured_links" / "tb").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"scalars": 0})
    events.Reload()
    for field in ("intra_node_bandwidth", "intra_node_latency"):
        (logged,) = events.Scalars(f"moe/migration/{field}")
        assert logged.step == 0 and logged.value == pytest.approx(measured[field], rel=1e-6), field
    assert "moe/migration/inter_node_bandwidth" not in events.Tags()["scalars"]  # one node: nothing measured


def test_tensorboard_holds_the_migration_scalars_and_placement_images(world4):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = (world4 / "migrate" / "tb").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("experts_moved", "bytes", "seconds", "predicted_layer_seconds_before", "predicted_layer_seconds_after",
                "predicted_max_over_mean_before", "measured_step_seconds", "measured_step_seconds_after"):
        assert f"moe/migration/{tag}" in scalars, tag
    assert [e.step for e in events.Scalars("moe/migration/experts_moved")] == [4, 8]
    images = [tag for tag in events.Tags()["images"] if tag.endswith("/placement")]
    assert images and events.Images(images[0])[0].step == 4
    # With the monitor: which split per-step replica balancing kept, as shares of each window's
    # dispatches (the run-level tag: the mean over the layers), from the counts the worker read.
    (event_file,) = (world4 / "migrate_with_monitor" / "tb").rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"scalars": 0})
    events.Reload()
    counts_WLK = np.array(read(world4, "migrate_with_monitor")[0]["replica_split"], dtype=float)
    expected_WK = (counts_WLK / counts_WLK.sum(axis=2, keepdims=True)).mean(axis=1)
    for column, name in enumerate(SPLITS):
        logged = events.Scalars(f"moe/replica_split_{name}")
        assert [e.step for e in logged] == [2, 4, 6, 8, 10, 12]
        np.testing.assert_allclose([e.value for e in logged], expected_WK[:, column], rtol=1e-6)


def test_the_migration_recipe_runs_on_two_processes(tmp_path):
    """`lightning-moe fit --config recipes/expert_migration.yaml`, shortened, with Lightning starting
    the second process: the callback re-plans from YAML and logs to TensorBoard."""
    import subprocess

    from launch import REPO_ROOT, clean_env
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import yaml

    logs = tmp_path / "logs"
    recipe = yaml.safe_load((REPO_ROOT / "recipes" / "expert_migration.yaml").read_text())
    assert recipe["trainer"]["callbacks"][1]["class_path"] == "lightning_moe.ExpertMigration"
    recipe["trainer"]["callbacks"][1]["init_args"]["every_n_steps"] = 5  # the recipe as written, shorter
    recipe["trainer"]["callbacks"][0]["init_args"]["every_n_steps"] = 5
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    command = [
        sys.executable, "-m", "lightning_moe", "fit", "--config", str(tmp_path / "recipe.yaml"),
        "--trainer.max_steps", "12", "--trainer.val_check_interval", "12", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(logs),
        "--trainer.logger.init_args.save_dir", str(logs),
        "--model.init_args.n_layers", "2", "--model.init_args.d_model", "32", "--model.init_args.d_ff", "64",
        "--model.init_args.n_heads", "2", "--model.init_args.max_seq_len", "32",
        "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4",
    ]
    env = clean_env()
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (event_file,) = logs.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("moe/migration/measured_step_seconds")] == [5, 10]


def test_callback_state_survives_a_safe_checkpoint_round_trip(tmp_path):
    """What the trigger weighs next (the windows before the last) is part of the callback's state and
    loads with ``weights_only=True``, as every checkpoint does; so does the single window that
    checkpoints from before several were kept hold."""
    import torch

    from lightning_moe import ExpertMigration

    callback = ExpertMigration(every_n_steps=4)
    callback.history = [{"step": 4, "layers_moved": 1}]
    windows = [np.arange(6, dtype=np.float64).reshape(2, 3), np.ones((2, 3))]
    callback._previous_loads = {"model.layers.0.moe": windows}
    callback._samples, callback._last_plan_step, callback.seconds_per_token = [(1.0, 2.0, 3.0)], 4, 1e-6
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    restored = ExpertMigration(every_n_steps=4)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.history == callback.history and restored._last_plan_step == 4
    assert restored._samples == [(1.0, 2.0, 3.0)] and restored.seconds_per_token == 1e-6
    np.testing.assert_array_equal(np.stack(restored._previous_loads["model.layers.0.moe"]), np.stack(windows))
    old = dict(callback.state_dict(), previous_loads={"model.layers.0.moe": windows[0].tolist()})
    restored.load_state_dict(old)
    np.testing.assert_array_equal(np.stack(restored._previous_loads["model.layers.0.moe"]), windows[0][None])


@pytest.mark.parametrize(
    "measure_links, message",
    [
        ("yes", "`measure_links` must be true, false, or a dict"),
        ({"message_bytes": 1 << 20, "group": None}, "`measure_links`: unknown link probe option `group`"),
        ({"repetitions": 2.5}, "`measure_links`: `repetitions` must be an integer >= 1, got 2.5"),
        ({"message_bytes": 16}, "`measure_links`: `message_bytes` must be an integer >= 1024, got 16"),
    ],
)
def test_a_bad_measure_links_fails_at_construction_naming_the_field(measure_links, message):
    from lightning_moe import ExpertMigration

    with pytest.raises(ValueError, match=message):
        ExpertMigration(every_n_steps=4, measure_links=measure_links)
    assert ExpertMigration(measure_links=True).link_probe_options == {}
    assert ExpertMigration().link_probe_options is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"search_round": 8}, r"`planner_options` has \['search_round'\], which the callback sets itself or the planner "
                              r"does not take. It takes \['per_expert_overhead'"),
        ({"horizon_steps": 8}, r"`planner_options` has \['horizon_steps'\]"),
        ({"search_rounds": -1}, r"`planner_options`: PlacementPlanner: `search_rounds` must be an integer >= 0, got -1"),
    ],
)
def test_bad_planner_options_fail_at_construction_naming_the_field(options, message):
    from lightning_moe import ExpertMigration

    with pytest.raises(ValueError, match=message):
        ExpertMigration(every_n_steps=4, planner_options=options)
    assert ExpertMigration(planner_options={"search_rounds": 8}).planner_options == {"search_rounds": 8}
    with pytest.raises(ValueError, match="`horizon_steps` must be a positive integer, got 0"):
        ExpertMigration(horizon_steps=0)


def test_calibration_keeps_the_fixed_cost_non_negative():
    """Step times that a line through them would reach with a negative fixed cost: the fit is the
    non-negative one (through the origin), and it reports the change (the re-plan then rebuilds its
    planners with it)."""
    from lightning_moe import ExpertMigration
    from lightning_moe.parallel.placement import ExpertPlacement

    class Estimate:
        def __init__(self, busiest):
            self.max_compute_load, self.layer_seconds, self.compute_seconds = busiest, 0.0, 0.0

    class Planner:
        def estimate(self, plan, load):
            return Estimate(float(load))

    callback = ExpertMigration(every_n_steps=4)
    callback._layers = [("moe", None)]
    callback.seconds_per_token = 1.0
    current = {"moe": ExpertPlacement([[0], [1]])}
    changed = [callback._add_sample({"moe": tokens}, current, {"moe": Planner()}, seconds)
               for tokens, seconds in ((10.0, 1.0), (20.0, 3.0))]
    # Unconstrained: seconds = 0.2 * tokens - 1. Through the origin: (10 + 60) / (100 + 400) = 0.14.
    assert changed == [False, True] and callback.seconds_per_token == pytest.approx(0.14)
