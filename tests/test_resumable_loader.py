"""ResumableDataLoader: a run resumed from a mid-epoch (or end-of-epoch) checkpoint sees exactly the
batches the uninterrupted run saw, with and without worker processes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DistributedSampler, TensorDataset

from lightning_moe import ResumableDataLoader

TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.seen: list[tuple[int, int, int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch_idx, int(batch[0][0])))
        return self.linear(batch[0].float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(workers: int) -> ResumableDataLoader:
    # A shuffle that depends on the epoch only (Lightning calls `set_epoch`), as the DistributedSampler
    # Lightning injects under DDP does: a RandomSampler's generator state is not in checkpoints.
    dataset = TensorDataset(torch.arange(8).view(8, 1))
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    return ResumableDataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers,
                               persistent_workers=workers > 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumes_mid_epoch_and_at_epoch_end(tmp_path, workers):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    full = _Recorder()
    L.Trainer(max_epochs=3, callbacks=[checkpoints], **TRAINER).fit(full, _loader(workers))
    for name in ("epoch=0-step=6", "epoch=1-step=9", "epoch=2-step=24"):
        resumed = _Recorder()
        L.Trainer(max_epochs=3, default_root_dir=tmp_path, **TRAINER).fit(resumed, _loader(workers), ckpt_path=tmp_path / f"{name}.ckpt")
        done = int(name.split("step=")[1])
        assert resumed.seen == full.seen[done:], name


def test_resumes_after_an_epoch_cut_short_by_limit_train_batches(tmp_path):
    """An epoch that `limit_train_batches` ends before the loader does: a checkpoint after its last
    batch resumes at the first batch of the next epoch (not `limit` batches into it)."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    options = dict(max_epochs=3, limit_train_batches=3, **TRAINER)
    full = _Recorder()
    L.Trainer(callbacks=[checkpoints], **options).fit(full, _loader(0))
    resumed = _Recorder()
    L.Trainer(default_root_dir=tmp_path, **options).fit(resumed, _loader(0), ckpt_path=tmp_path / "epoch=0-step=3.ckpt")
    assert [batch_idx for _, batch_idx, _ in resumed.seen] == [0, 1, 2, 0, 1, 2]
    assert resumed.seen == full.seen[3:]


def test_a_plain_run_and_len_are_unchanged():
    loader = _loader(0)
    assert len(loader) == 8 and sorted(int(b[0][0]) for b in loader) == list(range(8))
    assert [int(b[0][0]) for b in loader] != list(range(8))  # shuffled
    # A whole epoch: the next one starts afresh. The sampler's epoch is kept beside the count.
    assert loader.state_dict() == {"batches_in_epoch": 0, "epoch": 0}
    loader.load_state_dict({"batches_in_epoch": 5})
    assert len(list(loader)) == 3 and loader.state_dict() == {"batches_in_epoch": 0, "epoch": 0}
    assert len(list(loader)) == 8  # the skip applies to one epoch only


def test_an_iterable_dataset_resumes_only_at_an_epoch_boundary():
    """Batches are skipped by their indices: over an IterableDataset a mid-epoch resume started again
    from the first batch, and the count went on from the saved position (11 of 8 batches). It is
    refused; a whole epoch, and a resume at its end, work as with a plain DataLoader."""

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(8))

    loader = ResumableDataLoader(Stream(), batch_size=1)
    assert [int(batch) for batch in loader] == list(range(8))
    assert loader.state_dict() == {"batches_in_epoch": 0}  # the epoch ended (the stream has no length)
    loader.load_state_dict(loader.state_dict())
    assert [int(batch) for batch in loader] == list(range(8))
    with pytest.raises(TypeError, match="3 batches into an epoch.*Stream is an IterableDataset"):
        loader.load_state_dict({"batches_in_epoch": 3})
