"""The checkpoint format in one process: round trip through any placement, consolidation, the atomic
commit of a save, safe loading, clear errors for damaged or mismatched checkpoints, fsspec paths,
and the per-expert optimizer-state codec (Adafactor's factored state included).

The multi-process behaviour (saving at one layout, resuming at another; a rank killed mid-run) is
tested in test_strategy_ep.py and test_faults.py.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

from lightning_moe import MoELayer
from lightning_moe.checkpoint import (
    CheckpointError,
    consolidate_checkpoint,
    is_sharded_checkpoint,
    load_local_checkpoint,
    read_full_checkpoint,
    save_sharded_checkpoint,
)
from lightning_moe.checkpoint.layout import META_FILE, POINTER_FILE, committed_directory, save_beside_then_swap
from lightning_moe.cli import main as cli_main
from lightning_moe.parallel.expert_state import join_expert_states, split_expert_state
from lightning_moe.parallel.placement import ExpertPlacement
from lightning_moe.parallel.sharding import shard_layer, sharded_expert_params


class _Holder(torch.nn.Module):
    def __init__(self, d_ff: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.dense = torch.nn.Linear(8, 8)
        self.moe = MoELayer(d_model=8, d_ff=d_ff, num_experts=4, init_std=0.3)


def _sharded(placement: list[list[int]], optimizer_class=torch.optim.Adam, **holder_kwargs):
    """A one-rank sharded model (``placement`` over one EP rank) after one optimizer step."""
    full = _Holder(**holder_kwargs)
    sharded = copy.deepcopy(full)
    shard_layer(sharded.moe, placement=ExpertPlacement.from_experts_per_rank(placement), ep_rank=0, ep_group=None)
    optimizer = optimizer_class(sharded.parameters(), lr=0.1)
    sharded.moe(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    return full, sharded, optimizer


def _save(sharded, optimizer, path, *, checkpoint_io=None, global_step: int = 7) -> None:
    checkpoint = {"state_dict": sharded.state_dict(), "optimizer_states": [optimizer.state_dict()], "epoch": 3,
                  "global_step": global_step}
    save_sharded_checkpoint(
        checkpoint, path, expert_params=sharded_expert_params(sharded), optimizers=[optimizer], module=sharded,
        global_rank=0, writes_experts=True, ep_rank=0, checkpoint_io=checkpoint_io or TorchCheckpointIO(),
        broadcast=lambda obj: obj, all_gather=lambda obj: [obj],
    )


def test_round_trip_through_another_placement_and_consolidate(tmp_path):
    """Save a permuted one-rank model and its Adam state per logical expert; consolidate to full tensors
    in logical order; read back into another placement, from the directory and from the single file."""
    full, sharded, optimizer = _sharded([[3, 1, 0, 2]])
    _save(sharded, optimizer, tmp_path / "ckpt")
    version = committed_directory(tmp_path / "ckpt")
    assert sorted(p.name for p in Path(version).iterdir()) == ["experts-ep00000.pt", META_FILE]

    assert cli_main(["consolidate", str(tmp_path / "ckpt"), str(tmp_path / "full.ckpt")]) == 0
    single = torch.load(tmp_path / "full.ckpt", weights_only=True)
    assert single["epoch"] == 3 and "lightning_moe" not in single
    order = torch.tensor([3, 1, 0, 2]).argsort()  # slot of each logical expert
    torch.testing.assert_close(single["state_dict"]["moe.experts.w_in"], sharded.moe.experts.w_in.detach()[order])
    full.load_state_dict(single["state_dict"])  # the unsharded module takes it as is
    names = [n for n, _ in sharded.named_parameters()]
    index = names.index("moe.experts.w_out")
    exp_avg = optimizer.state[sharded.moe.experts.w_out]["exp_avg"]
    torch.testing.assert_close(single["optimizer_states"][0]["state"][index]["exp_avg"], exp_avg[order])

    other = copy.deepcopy(full)
    shard_layer(other.moe, placement=ExpertPlacement.identity(4, 1), ep_rank=0, ep_group=None)
    other_optimizer = torch.optim.Adam(other.parameters(), lr=0.1)
    for source in (tmp_path / "ckpt", tmp_path / "full.ckpt"):
        local = load_local_checkpoint(source, expert_params=sharded_expert_params(other),
                                      optimizers=[other_optimizer], module=other)
        torch.testing.assert_close(local["state_dict"]["moe.experts.w_in"], single["state_dict"]["moe.experts.w_in"])
        torch.testing.assert_close(local["optimizer_states"][0]["state"][index]["exp_avg"], exp_avg[order])
        other_optimizer.load_state_dict(local["optimizer_states"][0])


def test_consolidate_rejects_a_non_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory written by MoEStrategy"):
        consolidate_checkpoint(tmp_path, tmp_path / "out.ckpt")


def test_consolidate_refuses_a_directory_or_a_file_inside_the_checkpoint(tmp_path, capsys):
    """Given a directory, the save moved a temporary file into it and changed the directory's mode
    (its files unreadable to a non-root owner); inside the checkpoint, the file made later saves to
    that path fail. Both are refused before anything is written, the CLI with exit 2."""
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    _save(sharded, optimizer, tmp_path / "ckpt")
    (tmp_path / "out").mkdir()
    before = {p: p.stat().st_mode for p in (tmp_path / "ckpt", tmp_path / "out")}
    with pytest.raises(CheckpointError, match="is a directory; it writes one file"):
        consolidate_checkpoint(tmp_path / "ckpt", tmp_path / "out")
    with pytest.raises(CheckpointError, match="is a directory"):
        consolidate_checkpoint(tmp_path / "ckpt", tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="lies inside the checkpoint directory"):
        consolidate_checkpoint(tmp_path / "ckpt", tmp_path / "ckpt" / "full.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["consolidate", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "is a directory" in capsys.readouterr().err
    assert {p: p.stat().st_mode for p in before} == before and list((tmp_path / "out").iterdir()) == []


class _FailingIO(TorchCheckpointIO):
    """Writes the first ``writes_before_failure`` files, then fails like a full disk."""

    def __init__(self, writes_before_failure: int) -> None:
        super().__init__()
        self.writes_left = writes_before_failure

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if self.writes_left == 0:
            raise OSError(28, "No space left on device")
        self.writes_left -= 1
        super().save_checkpoint(checkpoint, path, storage_options)


def test_a_save_that_fails_half_way_keeps_the_previous_checkpoint(tmp_path):
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "last.ckpt"
    _save(sharded, optimizer, path, global_step=5)
    before = read_full_checkpoint(path)
    with torch.no_grad():
        sharded.moe.experts.w_in.add_(1.0)
    with pytest.raises(CheckpointError, match="No space left on device.*|previous checkpoint there"):
        _save(sharded, optimizer, path, checkpoint_io=_FailingIO(writes_before_failure=1), global_step=9)
    after = read_full_checkpoint(path)  # still the step-5 checkpoint, whole
    assert after["global_step"] == 5
    torch.testing.assert_close(after["state_dict"]["moe.experts.w_in"], before["state_dict"]["moe.experts.w_in"])
    # No debris of the failed save is left next to the committed version.
    assert sorted(p.name for p in path.iterdir()) == sorted([POINTER_FILE, Path(committed_directory(path)).name])

    _save(sharded, optimizer, path, global_step=9)  # a save that succeeds replaces it, old version removed
    assert read_full_checkpoint(path)["global_step"] == 9
    assert len([p for p in path.iterdir() if p.is_dir()]) == 1


def test_a_failed_first_save_leaves_no_directory_that_looks_like_a_checkpoint(tmp_path):
    """`fit(ckpt_path="last")` after a first save that failed must start afresh (no `last.ckpt`), not
    find an empty directory there and refuse it."""
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointError, match="No space left on device"):
        _save(sharded, optimizer, path, checkpoint_io=_FailingIO(writes_before_failure=1), global_step=9)
    assert list(tmp_path.iterdir()) == []


def test_a_save_to_a_link_replaces_the_link_not_the_checkpoint_it_points_at(tmp_path):
    """`ModelCheckpoint(save_last="link")` makes `last.ckpt` a link to a top-k checkpoint; a later save
    to `last.ckpt` (the first after a resume is a real one) replaces the link, as Lightning's single
    file saves do: the top-k checkpoint keeps its step."""
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    top_k, last = tmp_path / "step=8.ckpt", tmp_path / "last.ckpt"
    _save(sharded, optimizer, top_k, global_step=8)
    last.symlink_to(top_k.name)
    _save(sharded, optimizer, last, global_step=12)
    assert not last.is_symlink() and read_full_checkpoint(last)["global_step"] == 12
    assert read_full_checkpoint(top_k)["global_step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=8.ckpt"]


def test_the_pointer_is_renamed_into_place_beside_itself(tmp_path, monkeypatch):
    """The pointer names a complete version at every moment: it is written beside itself and renamed
    over, not staged in the temporary directory (on another filesystem fsspec's move copies into the
    pointer, truncating it first). A temporary directory that does not exist shows where it is staged."""
    import tempfile

    from lightning_moe.checkpoint.layout import commit_version

    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "last.ckpt"
    _save(sharded, optimizer, path, global_step=5)
    version = Path(committed_directory(path)).name
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    commit_version(path, version)
    assert read_full_checkpoint(path)["global_step"] == 5
    assert sorted(p.name for p in path.iterdir()) == sorted([POINTER_FILE, version])


def test_a_committed_save_whose_cleanup_fails_stays_loadable(tmp_path, monkeypatch):
    """Once the pointer names the new version the save has succeeded: an error removing the old
    version only warns (it removed the new one, and nothing loaded)."""
    from fsspec.implementations.local import LocalFileSystem

    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "last.ckpt"
    _save(sharded, optimizer, path, global_step=5)
    old_version = Path(committed_directory(path)).name
    remove = LocalFileSystem.rm

    def failing_on_the_old_version(self, entry, *args, **kwargs):
        if old_version in str(entry):
            raise OSError(5, "Input/output error")
        return remove(self, entry, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "rm", failing_on_the_old_version)
    with pytest.warns(UserWarning, match="is saved, but its earlier entries could not all be removed: .*Input/output"):
        _save(sharded, optimizer, path, global_step=9)
    assert read_full_checkpoint(path)["global_step"] == 9
    monkeypatch.setattr(LocalFileSystem, "rm", remove)
    _save(sharded, optimizer, path, global_step=11)  # the next save removes what was left
    assert read_full_checkpoint(path)["global_step"] == 11 and len([p for p in path.iterdir() if p.is_dir()]) == 1


def test_checkpoint_directories_are_written_synchronously_under_async_checkpoint_io(tmp_path):
    """AsyncCheckpointIO returns before its file exists: a directory committed then would point at
    files not yet written, with the previous checkpoint already removed. Its files are written in turn."""
    import time

    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    class SlowStore(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            time.sleep(0.3)
            super().save_checkpoint(checkpoint, path, storage_options)

    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "last.ckpt"
    _save(sharded, optimizer, path, global_step=5)
    asynchronous = AsyncCheckpointIO(SlowStore())
    with pytest.warns(UserWarning, match="written synchronously, not by AsyncCheckpointIO"):
        _save(sharded, optimizer, path, checkpoint_io=asynchronous, global_step=9)
    assert read_full_checkpoint(path)["global_step"] == 9  # complete as soon as the save returns
    asynchronous.teardown()


def test_a_save_into_a_directory_of_other_files_is_refused(tmp_path):
    """A path that is a directory but not a checkpoint: saving there would delete its files."""
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    folder = tmp_path / "results"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"holds other files \(\['data', 'notes.txt'\]\), not a checkpoint"):
        _save(sharded, optimizer, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["data", "notes.txt"]


def test_a_directory_replaces_a_single_file_checkpoint_only_once_it_is_complete(tmp_path):
    """A run that switches to expert parallelism and saves over a single-file checkpoint: the file
    survives a failed save untouched, and a save that succeeds replaces it with a directory."""
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, path)
    good = path.read_bytes()
    with pytest.raises(CheckpointError, match="No space left on device"):
        _save(sharded, optimizer, path, checkpoint_io=_FailingIO(writes_before_failure=1), global_step=9)
    assert path.is_file() and path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no staging debris

    _save(sharded, optimizer, path, global_step=9)
    assert is_sharded_checkpoint(path) and read_full_checkpoint(path)["global_step"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_single_file_replaces_a_checkpoint_directory_only_once_it_is_written(tmp_path):
    """The other way round (a run back at EP 1 saves over an expert-parallel directory): the file is
    written beside the directory and swapped in; a failed write keeps the directory."""
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "last.ckpt"
    _save(sharded, optimizer, path, global_step=5)

    def fail(staged):
        Path(staged).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        save_beside_then_swap(path, fail)
    assert read_full_checkpoint(path)["global_step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    save_beside_then_swap(path, lambda staged: TorchCheckpointIO().save_checkpoint({"global_step": 9}, staged))
    assert path.is_file() and torch.load(path, weights_only=True)["global_step"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_swapping_in_goes_through_fsspec_paths():
    url = "memory://runs/swap-test/last.ckpt"
    fs = get_filesystem(url)
    fs.pipe(url, b"old single file")
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    _save(sharded, optimizer, url, global_step=4)
    assert is_sharded_checkpoint(url) and read_full_checkpoint(url)["global_step"] == 4
    assert [Path(p).name for p in fs.ls("memory://runs/swap-test", detail=False)] == ["last.ckpt"]


class _RunsCode:
    """Unpickling this executes ``Path(marker).touch()``: what a tampered checkpoint file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_loading_never_runs_code_from_a_tampered_file(tmp_path):
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "ckpt"
    _save(sharded, optimizer, path)
    marker = tmp_path / "code-ran"
    expert_file = Path(committed_directory(path)) / "experts-ep00000.pt"
    content = torch.load(expert_file, weights_only=True)
    content["payload"] = _RunsCode(str(marker))
    torch.save(content, expert_file)
    with pytest.raises(CheckpointError, match="experts-ep00000.pt"):
        load_local_checkpoint(path, expert_params=sharded_expert_params(sharded), optimizers=[optimizer],
                              module=sharded)
    with pytest.raises(CheckpointError):
        consolidate_checkpoint(path, tmp_path / "full.ckpt")
    assert not marker.exists()


def _load_into(model, path):
    return load_local_checkpoint(path, expert_params=sharded_expert_params(model), optimizers=[], module=model)


def test_damaged_or_mismatched_checkpoints_raise_clear_errors(tmp_path):
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "ckpt"
    _save(sharded, optimizer, path)
    version = Path(committed_directory(path))
    expert_file = version / "experts-ep00000.pt"
    good = expert_file.read_bytes()

    expert_file.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match=r"Cannot read checkpoint file .*experts-ep00000.pt.*truncated"):
        _load_into(sharded, path)

    expert_file.unlink()  # missing
    with pytest.raises(CheckpointError, match=r"experts-ep00000.pt is missing"):
        _load_into(sharded, path)

    content = torch.load(io.BytesIO(good), weights_only=True)  # manifest places an expert the file lacks
    del content["model"]["moe.experts.w_in#2"]
    torch.save(content, expert_file)
    with pytest.raises(CheckpointError, match=r"places expert 2 of `moe.experts.w_in` in experts-ep00000.pt"):
        _load_into(sharded, path)

    expert_file.write_bytes(good)
    wider = _sharded([[0, 1, 2, 3]], d_ff=6)[1]  # another model: other widths
    with pytest.raises(CheckpointError, match=r"experts of shape \[8, 8\] .* model's are \[8, 12\]"):
        _load_into(wider, path)

    (path / POINTER_FILE).write_text("not json")
    with pytest.raises(CheckpointError, match="pointer .* is damaged"):
        _load_into(sharded, path)


def test_checkpoints_go_through_fsspec_paths():
    """``memory://`` stands for any fsspec store (``s3://``, ``gs://``): nothing may become a local path."""
    _, sharded, optimizer = _sharded([[2, 3, 0, 1]])
    url = "memory://runs/fsspec-test/epoch=0-step=7.ckpt"
    _save(sharded, optimizer, url)
    assert is_sharded_checkpoint(url)
    assert get_filesystem(url).exists(url + "/" + POINTER_FILE)
    assert not Path("memory:").exists() and not Path("runs").exists()
    full = read_full_checkpoint(url)
    order = torch.tensor([2, 3, 0, 1]).argsort()
    torch.testing.assert_close(full["state_dict"]["moe.experts.w_out"], sharded.moe.experts.w_out.detach()[order])
    consolidate_checkpoint(url, "memory://runs/fsspec-test/full.ckpt")
    assert get_filesystem(url).exists("memory://runs/fsspec-test/full.ckpt")


def test_format_1_directories_still_load(tmp_path):
    """Directories saved before the versioned layout (meta.pt and expert files directly inside)."""
    _, sharded, optimizer = _sharded([[1, 0, 3, 2]])
    path = tmp_path / "ckpt"
    _save(sharded, optimizer, path)
    version = Path(committed_directory(path))
    flat = tmp_path / "flat.ckpt"
    flat.mkdir()
    for file in version.iterdir():
        (flat / file.name).write_bytes(file.read_bytes())
    torch.testing.assert_close(read_full_checkpoint(flat)["state_dict"]["moe.experts.w_in"],
                               read_full_checkpoint(path)["state_dict"]["moe.experts.w_in"])


def test_newer_format_versions_are_refused(tmp_path):
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    path = tmp_path / "ckpt"
    _save(sharded, optimizer, path)
    meta_file = Path(committed_directory(path)) / META_FILE
    meta = torch.load(meta_file, weights_only=True)
    meta["lightning_moe"]["format_version"] = 99
    torch.save(meta, meta_file)
    with pytest.raises(CheckpointError, match="format_version=99; this lightning_moe reads up to 2"):
        _load_into(sharded, path)


# ----------------------------------------------------------------------------- the per-expert codec


def test_adafactor_factored_state_is_split_per_expert_and_resumes_at_another_expert_count(tmp_path):
    """Adafactor keeps ``row_var [L, D, 1]`` and ``col_var [L, 1, F]``: they must be split per expert
    (before, they were stored whole and came back with the old expert count, so the next step crashed)."""
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]], optimizer_class=torch.optim.Adafactor)
    state = optimizer.state[sharded.moe.experts.w_in]
    assert state["row_var"].shape == (4, 8, 1) and state["col_var"].shape == (4, 1, 8)
    _save(sharded, optimizer, tmp_path / "ckpt")

    # Resume on "EP rank 1 of 2": slots hold logical experts 2 and 3 only.
    half = _Holder()
    shard_layer(half.moe, placement=ExpertPlacement.identity(4, 2), ep_rank=1, ep_group=None)
    half_optimizer = torch.optim.Adafactor(half.parameters(), lr=0.1)
    local = load_local_checkpoint(tmp_path / "ckpt", expert_params=sharded_expert_params(half),
                                  optimizers=[half_optimizer], module=half)
    half.load_state_dict(local["state_dict"])
    half_optimizer.load_state_dict(local["optimizer_states"][0])
    restored = half_optimizer.state[half.moe.experts.w_in]
    assert restored["row_var"].shape == (2, 8, 1)
    torch.testing.assert_close(restored["row_var"], state["row_var"][2:])
    for parameter in half.parameters():
        parameter.grad = torch.randn_like(parameter)
    half_optimizer.step()  # crashed with the whole-tensor state


def test_codec_splits_per_expert_state_and_refuses_what_cannot_be_split():
    state = {"step": torch.tensor(3.0), "exp_avg": torch.arange(24.0).view(4, 2, 3), "lr_scale": 0.5}
    parts = split_expert_state(state, 4, where="optimizer 0, parameter `w`")
    assert len(parts) == 4 and torch.equal(parts[2]["sharded"]["exp_avg"], state["exp_avg"][2])
    assert parts[1]["replicated"]["step"] is state["step"] and parts[1]["replicated"]["lr_scale"] == 0.5
    joined = join_expert_states([parts[3], parts[0]])
    assert torch.equal(joined["exp_avg"], state["exp_avg"][[3, 0]]) and joined["lr_scale"] == 0.5
    with pytest.raises(ValueError, match=r"`flat_buffer` of optimizer 0, parameter `w` has shape \(7,\), which does not"):
        split_expert_state({"flat_buffer": torch.zeros(7)}, 4, where="optimizer 0, parameter `w`")


class _FlatStateSGD(torch.optim.SGD):
    """An optimizer whose state for each parameter is a flat buffer (not splittable per expert)."""

    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["flat"] = torch.zeros(p.numel())


def test_a_state_that_cannot_be_split_is_refused_at_save(tmp_path):
    _, sharded, optimizer = _sharded([[0, 1, 2, 3]], optimizer_class=_FlatStateSGD)
    with pytest.raises(ValueError, match=r"optimizer 0 \(_FlatStateSGD\), parameter `moe.experts.w_in`"):
        _save(sharded, optimizer, tmp_path / "ckpt")
    assert not is_sharded_checkpoint(tmp_path / "ckpt")


class _TrustedNote:
    """An object only a full unpickle restores (not a tensor, not a plain container)."""


def test_load_from_checkpoint_passes_weights_only_false_to_a_directory(tmp_path):
    """A checkpoint you trust that holds an object: ``weights_only=False`` reaches the directory's
    files too (it was dropped there, and the load refused what the user had allowed); without it the
    object is refused."""
    import lightning as L

    from lightning_moe import load_from_checkpoint

    class Module(L.LightningModule):  # `_Holder` as a LightningModule
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(8, 8)
            self.moe = MoELayer(d_model=8, d_ff=4, num_experts=4, init_std=0.3)

    _, sharded, optimizer = _sharded([[0, 1, 2, 3]])
    checkpoint = {"state_dict": sharded.state_dict(), "optimizer_states": [optimizer.state_dict()], "epoch": 3,
                  "global_step": 7, "pytorch-lightning_version": L.__version__, "note": _TrustedNote()}
    save_sharded_checkpoint(
        checkpoint, tmp_path / "c.ckpt", expert_params=sharded_expert_params(sharded), optimizers=[optimizer],
        module=sharded, global_rank=0, writes_experts=True, ep_rank=0, checkpoint_io=TorchCheckpointIO(),
        broadcast=lambda obj: obj, all_gather=lambda obj: [obj],
    )
    with pytest.raises(Exception, match="_TrustedNote|weights_only"):
        load_from_checkpoint(Module, tmp_path / "c.ckpt")
    module = load_from_checkpoint(Module, tmp_path / "c.ckpt", weights_only=False)
    torch.testing.assert_close(module.moe.experts.w_in, read_full_checkpoint(tmp_path / "c.ckpt", weights_only=False)
                               ["state_dict"]["moe.experts.w_in"])
