"""A ``DataLoader`` whose position inside an epoch is saved in Lightning checkpoints.

Lightning saves ``state_dict()`` of every training loader that has one and, on resume, calls
``load_state_dict()`` before it iterates again; a plain ``DataLoader`` has neither, so a run resumed
from a mid-epoch checkpoint (``ModelCheckpoint(every_n_train_steps=...)``, the last checkpoint of a
killed job) starts its epoch over and sees the first batches twice. :class:`ResumableDataLoader`
counts the batches it hands out in the current epoch and, after ``load_state_dict``, skips that
many at the index level: the skipped batches are never loaded. Combined with a sampler that depends
only on the epoch (Lightning calls ``set_epoch``), the resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset


class _SkipWhileResuming:
    """The loader's index sampler, minus the first ``loader._skip_now`` entries while the loader builds a
    resumed iterator (torch may iterate it more than once then: a multi-worker iterator does in its
    constructor; a persistent-workers iterator iterates it again every later epoch, without skip)."""

    def __init__(self, inner: Iterable[Any], loader: ResumableDataLoader) -> None:
        self.inner, self.loader = inner, loader

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.inner), self.loader._skip_now, None)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """``torch.utils.data.DataLoader`` that resumes mid-epoch from a Lightning checkpoint.

    Takes exactly ``DataLoader``'s arguments. ``state_dict()`` is ``{"batches_in_epoch": n}``: the
    batches handed out in the current epoch when the checkpoint was written (0 at an epoch boundary),
    and ``"epoch"``, the sampler's epoch then, when the sampler has one. A resumed run skips the ``n``
    batches only in that epoch: when the saved epoch ended early (``limit_train_batches``), the run
    resumes in the next epoch, which starts from its first batch.

    The order of the batches must depend on the epoch only, so that the resumed epoch is the same
    permutation: ``DistributedSampler`` (which Lightning injects under DDP and calls ``set_epoch``
    on) and lightning_moe's samplers are; a ``RandomSampler``'s generator state is not saved.

    NOTE: Lightning counts a batch as handed out when its fetcher takes it, and its checkpoints are
    written between batches, so ``n`` is exactly the batches the run consumed (measured with
    Lightning's default prefetching; tested by resuming a killed run in tests/test_faults.py).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_in_epoch = 0
        self._skip_next = 0
        self._skip_now = 0
        self._epoch: int | None = None
        self._resume_epoch: int | None = None

    @property
    def _index_sampler(self):  # type: ignore[override]
        # Read by the iterator torch builds in `DataLoader.__iter__`; skips only while resuming.
        return _SkipWhileResuming(super()._index_sampler, self)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip_next = self._skip_next, 0
        resume_epoch, self._resume_epoch = self._resume_epoch, None
        return self._iterate(skip, resume_epoch)

    def _sampler_epoch(self) -> int | None:
        """The epoch Lightning set on the sampler (``set_epoch``), if it has one."""
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            epoch = getattr(sampler, "epoch", None)
            if isinstance(epoch, int):
                return epoch
        return None

    def _iterate(self, skip: int, resume_epoch: int | None) -> Iterator[Any]:
        # NOTE: a generator, so torch's iterator is built on the first `next()`. On resume Lightning
        # calls `iter()` before `set_epoch`, and worker processes take indices as soon as their
        # iterator exists: built eagerly, the resumed epoch would use the previous epoch's order.
        self._epoch = self._sampler_epoch()
        if resume_epoch is not None and self._epoch is not None and self._epoch != resume_epoch:
            skip = 0  # the saved epoch was over (cut short by a batch limit): this one starts afresh
        self._skip_now = skip
        try:
            iterator = super().__iter__()
        finally:
            self._skip_now = 0
        self._batches_in_epoch = skip
        for batch in iterator:
            self._batches_in_epoch += 1
            yield batch
        self._batches_in_epoch = 0  # the epoch is over (how an iterable dataset without a length tells)

    def state_dict(self) -> dict[str, int]:
        batches = self._batches_in_epoch
        try:
            batches %= len(self)  # the epoch's last batch: the next run starts a new epoch
        except TypeError:
            pass  # an iterable dataset without a length
        state = {"batches_in_epoch": batches}
        if self._epoch is not None:
            state["epoch"] = self._epoch
        return state

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        skip = int(state_dict.get("batches_in_epoch", 0))
        if skip and isinstance(self.dataset, IterableDataset):
            # It would resume from the first batch and count on from the saved position, silently.
            raise TypeError(
                f"ResumableDataLoader: the checkpoint was written {skip} batches into an epoch, and batches are "
                f"skipped by their indices: {type(self.dataset).__name__} is an IterableDataset, which has none. "
                f"Resume from a checkpoint at an epoch's end, use a map-style dataset (`__getitem__` and "
                f"`__len__`), or an iterable one that saves its own position (`state_dict`/`load_state_dict`, as "
                f"lightning_moe.TokenizedDataModule's streaming loader does)."
            )
        self._skip_next = skip
        epoch = state_dict.get("epoch")
        self._resume_epoch = None if epoch is None else int(epoch)
