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

from launch import launch  # noqa: E402

WORKER = Path(__file__).resolve().parent / "dist_workers" / "migration_worker.py"
ACCUMULATE = 2


@pytest.fixture(scope="module")
def world4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("migration")
    (out / "scenarios.json").write_text(json.dumps([
        {"name": "static"},
        {"name": "migrate", "migrate": True, "every": 4},
        {"name": "migrate_with_monitor", "migrate": True, "every": 4, "monitor": True},
    ]))
    launch(WORKER, [str(out / "scenarios.json"), str(out)], world_size=4, timeout=300, log_dir=out / "logs")
    return out


def read(out: Path, name: str) -> list[dict]:
    results = [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(4)]
    for result in results:
        assert "crash" not in result, result["crash"]
    return results


def step_losses(results: list[dict]) -> np.ndarray:
    return np.array([r["losses"] for r in results]).reshape(4, -1, ACCUMULATE).mean(axis=(0, 2))


@pytest.mark.parametrize("name", ["migrate", "migrate_with_monitor"])
def test_migrates_on_a_skewed_load_and_keeps_the_loss(world4, name):
    results, static = read(world4, name), read(world4, "static")
    history = results[0]["history"]
    assert all(r["history"] == history for r in results)  # every rank planned the same
    assert [entry["step"] for entry in history] == [4, 8]
    first = history[0]
    assert first["layers_moved"] >= 1 and first["experts_moved"] >= 1 and first["bytes"] > 0
    assert first["predicted_max_over_mean_after"] < first["predicted_max_over_mean_before"]
    assert first["predicted_layer_seconds_after"] < first["predicted_layer_seconds_before"]
    assert "measured_step_seconds_after" in history[1]
    assert results[0]["placements"] != static[0]["placements"]
    # Migration moves experts, not the function: the loss of the run without it (EP tolerance).
    np.testing.assert_allclose(step_losses(results), step_losses(static), rtol=1e-4)


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
