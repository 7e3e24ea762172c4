"""Sequence packing: documents and conversations concatenated into fixed windows, in memory or streamed.

The encoded pieces of a split form one stream of ``N`` tokens with a target mask. Window ``i`` covers
stream tokens ``[i T, i T + T]`` (consecutive windows share one boundary token): inputs are its
first ``T`` tokens, targets its last ``T``, with -100 where the mask says a token is not a target
(user turns, template tokens) and in the padding of the last, shorter window. Every token after the
first is a target in exactly one window.

Attention crosses document boundaries: :class:`~lightning_moe.MoETransformer` uses plain causal
attention over the whole window, so a document's tokens attend to the end of the document before
it (separated by EOS or the chat template's own tokens), as in GPT-style pretraining on packed text.

Streaming (:class:`StreamingWindows`): shard ``s`` of ``world_size * num_workers`` shards reads
pieces ``i`` with ``i % num_shards == s`` (see :mod:`~lightning_moe.tokenized.sources`) and packs
its own stream, so the shards cover every document once, without duplicates or gaps (the first
token of each shard's stream is an input only, as the first of the in-memory stream is). With
``windows_per_rank`` set, each rank's epoch is exactly that many windows (every rank runs the same
number of steps, as collectives need), each worker continuing its stream where the last epoch
stopped and starting over at the end of its data.

Resuming: :class:`WindowLoader` is a loader Lightning checkpoints (it has ``state_dict``); its
state is the epoch and the batches this rank finished in it, and a restored loader starts the
epoch after those batches, in the order an uninterrupted run would have seen.

Shape legend: ``N`` tokens of a stream, ``T`` sequence length, ``W = T + 1`` window length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from lightning_moe.tokenized.encoding import DocumentEncoder
from lightning_moe.tokenized.sources import BadInputError, BadLines, DocumentSource, Piece

IGNORE_INDEX = -100
#: Pieces tokenised per call of the (Rust) tokenizer.
_ENCODE_BATCH = 256

Window = tuple[torch.Tensor, torch.Tensor]


def encode_pieces(
    pieces: Iterable[Piece], encoder: DocumentEncoder, bad_lines: BadLines
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, trainable)`` of each piece; a piece that fails goes to ``bad_lines`` (raise or count)."""
    iterator = iter(pieces)
    while batch := list(islice(iterator, _ENCODE_BATCH)):
        for result in encoder.encode_batch(batch):
            if isinstance(result, BadInputError):
                bad_lines.report(result)
            else:
                yield result


def make_window(ids_W: np.ndarray, trainable_W: np.ndarray, seq_len: int, pad_id: int) -> Window:
    """Inputs and targets ``(T,)`` of up to ``T + 1`` stream tokens, padded at the end."""
    length = len(ids_W) - 1
    inputs_T = np.full(seq_len, pad_id, dtype=np.int64)
    targets_T = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    inputs_T[:length] = ids_W[:-1]
    targets_T[:length] = np.where(trainable_W[1:], ids_W[1:], IGNORE_INDEX)
    return torch.from_numpy(inputs_T), torch.from_numpy(targets_T)


class PackedWindows(Dataset):
    """The windows of a stream held in memory.

    Args:
        ids_N: token ids.
        trainable_N: whether each token is a target.
        seq_len: tokens per input sequence.
        pad_id: input id of the padding in the last window.
    """

    def __init__(self, ids_N: np.ndarray, trainable_N: np.ndarray, *, seq_len: int, pad_id: int) -> None:
        self.ids_N, self.trainable_N, self.seq_len, self.pad_id = ids_N, trainable_N, seq_len, pad_id

    def __len__(self) -> int:
        return max(0, -(-(len(self.ids_N) - 1) // self.seq_len))  # ceil((N - 1) / T)

    def __getitem__(self, index: int) -> Window:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        end = start + self.seq_len + 1
        return make_window(self.ids_N[start:end], self.trainable_N[start:end], self.seq_len, self.pad_id)


def pack_stream(encoded: Iterable[tuple[np.ndarray, np.ndarray]], *, seq_len: int, pad_id: int) -> Iterator[Window]:
    """The windows of the concatenated pieces, produced as the pieces arrive: those of :class:`PackedWindows`."""
    ids_parts: list[np.ndarray] = []
    mask_parts: list[np.ndarray] = []
    buffered = 0
    for ids, trainable in encoded:
        ids_parts.append(ids)
        mask_parts.append(trainable)
        buffered += len(ids)
        if buffered < seq_len + 1:
            continue
        ids_N, mask_N = np.concatenate(ids_parts), np.concatenate(mask_parts)
        start = 0
        while len(ids_N) - start >= seq_len + 1:
            yield make_window(ids_N[start : start + seq_len + 1], mask_N[start : start + seq_len + 1], seq_len, pad_id)
            start += seq_len
        ids_parts, mask_parts, buffered = [ids_N[start:]], [mask_N[start:]], len(ids_N) - start
    if buffered >= 2:  # a last, shorter window with at least one target
        ids_N, mask_N = np.concatenate(ids_parts), np.concatenate(mask_parts)
        yield make_window(ids_N, mask_N, seq_len, pad_id)


def encode_all(source: DocumentSource, encoder: DocumentEncoder, bad_lines: BadLines) -> tuple[np.ndarray, np.ndarray]:
    """The whole stream of ``source`` in memory: ids (int32) and target mask."""
    ids_parts, mask_parts = [], []
    for ids, trainable in encode_pieces(source.pieces(bad_lines), encoder, bad_lines):
        ids_parts.append(ids)
        mask_parts.append(trainable)
    if not ids_parts:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=bool)
    return np.concatenate(ids_parts), np.concatenate(mask_parts)


def _batches_of(worker: int, start: int, stop: int, num_workers: int) -> int:
    """How many of the batches ``start, ..., stop - 1`` worker ``worker`` serves (batch ``j`` is worker ``j % W``'s)."""

    def served_before(end: int) -> int:
        return max(0, -(-(end - worker) // num_workers))

    return max(0, served_before(stop) - served_before(start))


def control_tensor(num_workers: int) -> torch.Tensor:
    """A zeroed :attr:`StreamingWindows.control` for ``num_workers`` workers, in shared memory."""
    return torch.zeros(3 + max(num_workers, 1), dtype=torch.int64).share_memory_()


class _LiveStream:
    """A shard's endless window stream and how many windows it has given (kept between epochs)."""

    def __init__(self, key: tuple[int, int], windows: Iterator[Window]) -> None:
        self.key, self.windows, self.position = key, windows, 0

    def take(self, count: int) -> Iterator[Window]:
        for _ in range(count):
            window = next(self.windows)
            self.position += 1
            yield window


class StreamingWindows(IterableDataset):
    """Packed windows read lazily from files, sharded over ranks and data-loader workers.

    Data-loader batch ``j`` of a rank comes from worker ``j % num_workers`` (PyTorch serves workers
    in turn), so worker ``w`` yields the batches ``j = w, w + W, ...`` of the rank's epoch. In one
    pass (no ``windows_per_rank``) the shards end at different points, after which PyTorch serves the
    workers still going: each window then carries its shard's role (a third element, which
    :class:`WindowLoader` takes off the batch) so that the loader knows which shard served each
    batch, and a resume skips in each shard what it had served.
    :attr:`control` (shared with the workers) holds the epoch, the batches to skip on resume, and in
    one pass the role of the worker served first and the batches each role had served
    (:meth:`WindowLoader.__init__` sizes it for its workers).

    Args:
        source: the documents of this split.
        encoder: turns pieces into ids and masks.
        seq_len: tokens per input sequence.
        pad_id: input id of padding.
        on_bad_line: ``"error"`` or ``"skip"``; skipped lines are logged at the end of each pass.
        batch_size: windows per batch.
        rank: this process's rank.
        world_size: processes that share the data.
        windows_per_rank: windows of each rank's epoch; ``None`` for one pass over the shard.
    """

    def __init__(
        self,
        *,
        source: DocumentSource,
        encoder: DocumentEncoder,
        seq_len: int,
        pad_id: int,
        on_bad_line: str = "error",
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        windows_per_rank: int | None = None,
    ) -> None:
        self.source, self.encoder, self.seq_len, self.pad_id = source, encoder, seq_len, pad_id
        self.on_bad_line, self.batch_size = on_bad_line, batch_size
        self.rank, self.world_size, self.windows_per_rank = rank, world_size, windows_per_rank
        #: ``[epoch, batches to skip, first role, batches served per role ...]``, in shared memory so
        #: persistent workers see the main process's writes.
        self.control = control_tensor(1)
        #: One pass: add each window's role (set by :class:`WindowLoader`, which takes it off again).
        self.tag_roles = False
        self._live: _LiveStream | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_live": None}  # a generator does not travel to worker processes

    def __len__(self) -> int:
        if self.windows_per_rank is None:
            raise TypeError("a one-pass stream has no length")
        return self.windows_per_rank // self.batch_size * self.batch_size

    def shard_windows(self, shard: int, num_shards: int) -> Iterator[Window]:
        """One pass over the windows of ``shard``; skipped bad lines are logged at its end."""
        bad_lines = BadLines(self.on_bad_line)
        pieces = self.source.pieces(bad_lines, shard=shard, num_shards=num_shards)
        yield from pack_stream(encode_pieces(pieces, self.encoder, bad_lines), seq_len=self.seq_len, pad_id=self.pad_id)
        bad_lines.log_summary(f"the {self.source.side} data, shard {shard} of {num_shards}")

    def _endless(self, shard: int, num_shards: int) -> Iterator[Window]:
        while True:
            empty = True
            for window in self.shard_windows(shard, num_shards):
                empty = False
                yield window
            if empty:
                raise ValueError(
                    f"Streaming shard {shard} of {num_shards} (rank x data-loader worker) holds no window: fewer "
                    f"documents than shards. Lower `num_workers`, or use streaming=False for small data."
                )

    def __iter__(self) -> Iterator[Window]:
        info = get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        epoch, skip, first_role, *served_R = (int(value) for value in self.control.tolist())
        batch = self.batch_size
        if self.windows_per_rank is None:
            # The loader asks worker 0 first: it takes the role whose turn is next, and every role
            # skips what it had served (shards that ended yield nothing, as they did).
            role = (worker + first_role) % num_workers
            shard, num_shards = self.rank * num_workers + role, self.world_size * num_workers
            skipped = served_R[role] * batch if role < len(served_R) else 0  # a control not sized: from the start
            windows = islice(self.shard_windows(shard, num_shards), skipped, None)
            if not self.tag_roles:
                yield from windows
                return
            role_tensor = torch.tensor(role)
            for inputs, targets in windows:
                yield inputs, targets, role_tensor
            return
        # After skipping `skip` batches the loader still asks worker 0 first; hand it the role of the
        # worker whose turn is next, so the resumed order is the uninterrupted one.
        role = (worker + skip) % num_workers
        shard, num_shards = self.rank * num_workers + role, self.world_size * num_workers
        batches_per_epoch = self.windows_per_rank // batch
        per_epoch = _batches_of(role, 0, batches_per_epoch, num_workers)
        start = (epoch * per_epoch + _batches_of(role, 0, skip, num_workers)) * batch
        live = self._live
        if live is None or live.key != (shard, num_shards) or live.position > start:
            live = self._live = _LiveStream((shard, num_shards), self._endless(shard, num_shards))
        for _ in live.take(start - live.position):  # fast-forward: only after a resume or a reshuffle of roles
            pass
        yield from live.take(_batches_of(role, skip, batches_per_epoch, num_workers) * batch)


class ShuffledWindowSampler(DistributedSampler):
    """This rank's windows in a seeded, per-epoch shuffle; can start after the first ``skip`` of them.

    A :class:`~torch.utils.data.DistributedSampler` (so Lightning keeps it under DDP) that drops the
    last windows rather than repeat some, so ranks get equal shares.

    Args:
        dataset: the windows.
        num_replicas: ranks.
        rank: this rank.
        seed: seeds the shuffle (with the epoch).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class WindowLoader(DataLoader):
    """The training loader of packed windows, whose position Lightning saves in checkpoints and restores.

    Unlike the general :class:`~lightning_moe.ResumableDataLoader` it also keeps the epoch, which a
    stream needs to fast-forward to (it has no sampler that Lightning would call ``set_epoch`` on).

    The state is ``{"epoch": e, "batches": k}``: the next batch to train on is batch ``k`` of epoch
    ``e`` (a checkpoint taken after an epoch's last batch points at the start of the next epoch). A
    one-pass stream adds ``"served_per_role"`` (the batches each shard of the rank served) and
    ``"next_role"`` (the shard whose turn is next): its shards end at different points.
    :attr:`progress` (set by the data module) reads the position from the trainer; without it the
    loader counts the batches it served. The first iteration after :meth:`load_state_dict` runs
    epoch ``e`` from batch ``k``: a :class:`ShuffledWindowSampler` skips the windows of the first
    ``k`` batches, a :class:`StreamingWindows` fast-forwards its streams (re-reading and
    re-tokenising them).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Returns ``(epoch, batches finished in it, whether that was its last batch)``; ``None`` counts locally.
        self.progress: Callable[[], tuple[int, int, bool]] | None = None
        self._resume: dict[str, Any] | None = None
        self._epoch, self._served, self._finished, self._iterations = 0, 0, False, 0
        self._one_pass = isinstance(self.dataset, StreamingWindows) and self.dataset.windows_per_rank is None
        if self._one_pass:
            self.dataset.control, self.dataset.tag_roles = control_tensor(self.num_workers), True
        # One pass: where the epoch's iteration started (batches, per role, next role) and the role of
        # each batch served since.
        self._start: tuple[int, list[int], int] = (0, [0] * max(self.num_workers, 1), 0)
        self._roles = bytearray()

    def state_dict(self) -> dict[str, Any]:
        if self.progress is not None:
            epoch, batches, finished = self.progress()
        else:
            epoch, batches, finished = self._epoch, self._served, self._finished
        if finished:
            return {"epoch": int(epoch) + 1, "batches": 0}
        state = {"epoch": int(epoch), "batches": int(batches)}
        if self._one_pass:
            start, served_R, next_role = self._start
            served_R = list(served_R)
            consumed = self._roles[: max(int(batches) - start, 0)]
            for role in consumed:
                served_R[role] += 1
            if consumed:
                next_role = (consumed[-1] + 1) % len(served_R)
            state.update(served_per_role=served_R, next_role=next_role)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        if resume is not None:
            # Lightning creates the resumed iterator before its loops catch up with the checkpoint
            # (its epoch counter can still lag by one), so the saved position decides.
            epoch, skip = int(resume["epoch"]), int(resume["batches"])
        else:
            epoch, skip = (self.progress()[0] if self.progress is not None else self._iterations), 0
        self._iterations = epoch + 1
        if self._one_pass:
            workers = max(self.num_workers, 1)
            if resume is not None and "served_per_role" in resume:
                served_R, next_role = [int(n) for n in resume["served_per_role"]], int(resume["next_role"])
                if len(served_R) != workers:
                    raise ValueError(
                        f"WindowLoader: the checkpoint stopped a one-pass stream mid-epoch with {len(served_R)} "
                        f"data-loader worker(s); resume it with num_workers={len(served_R) if len(served_R) > 1 else 0} "
                        f"(each worker reads its own shard), or from a checkpoint taken at an epoch boundary."
                    )
            else:  # a fresh epoch, or a checkpoint from before the roles were kept: workers in turn
                served_R, next_role = [_batches_of(role, 0, skip, workers) for role in range(workers)], skip % workers
            self._start, self._roles = (skip, served_R, next_role), bytearray()
            self.dataset.control.copy_(torch.tensor([epoch, skip, next_role, *served_R]))
        elif isinstance(self.dataset, StreamingWindows):
            self.dataset.control[:2] = torch.tensor([epoch, skip])
        elif isinstance(self.sampler, ShuffledWindowSampler):
            self.sampler.set_epoch(epoch)
            self.sampler.skip = skip * self.batch_size
        iterator = super().__iter__()
        if self._one_pass:
            iterator = self._without_roles(iterator)
        return iterator if self.progress is not None else self._counted(iterator, epoch, skip)

    def _without_roles(self, iterator: Iterator[Any]) -> Iterator[Any]:
        """One pass: the batches without their role column, each batch's role noted."""
        for inputs, targets, roles in iterator:
            self._roles.append(int(roles[0]))
            yield inputs, targets

    def _counted(self, iterator: Iterator[Any], epoch: int, skip: int) -> Iterator[Any]:
        self._epoch, self._served, self._finished = epoch, skip, False
        for batch in iterator:
            self._served += 1
            yield batch
        self._finished = True
