"""Language-modelling data: an embedded byte-level corpus that needs no download, and the user's own text files.

Both data modules turn a token stream into windows of ``seq_len + 1`` tokens, split into inputs
(the first ``seq_len``) and targets (the last ``seq_len``, shifted by one). Training windows start
at pseudo-random offsets that depend only on ``seed``, the epoch and the sample's index, so a run
is reproducible under any number of processes and data-loader workers; validation windows tile
the validation stream without overlap.

Shape legend: ``T`` sequence length (``seq_len``), ``W = T + 1`` window length.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_moe.resumable_loader import ResumableDataLoader
from lightning_moe.validation import check_fraction, check_positive_int

_MASK64 = (1 << 64) - 1
#: Directories of the standard library left out of the embedded corpus: third-party packages,
#: and the test suites that some Linux distributions ship separately.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def _mix64(value: int) -> int:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014): a fast, well-spread 64-bit integer hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _window(tokens: np.ndarray, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    window_W = torch.from_numpy(np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64))
    return window_W[:-1], window_W[1:]  # inputs (T,), targets (T,)


class RandomWindowDataset(Dataset):
    """``samples_per_epoch`` training windows at pseudo-random offsets of a token stream.

    Index ``i`` of epoch ``e`` is the virtual index ``e * samples_per_epoch + i`` (see
    :class:`EpochShardSampler`); its offset is a hash of ``seed`` and that index, so every epoch
    draws new windows, and the draw does not depend on the number of processes or workers.

    Args:
        tokens: the token stream (any integer dtype).
        seq_len: tokens per input sequence.
        samples_per_epoch: windows per epoch.
        seed: seeds the offsets.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, samples_per_epoch: int, seed: int = 0) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"The training stream has {len(tokens)} tokens, fewer than `seq_len` + 1 = {seq_len + 1}. "
                f"Lower `seq_len` or give more text."
            )
        self.tokens, self.seq_len, self.samples_per_epoch = tokens, seq_len, samples_per_epoch
        self._seed_hash = _mix64(seed & _MASK64)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def offset(self, index: int) -> int:
        """Start of the window of virtual index ``index``."""
        return _mix64(self._seed_hash ^ index) % (len(self.tokens) - self.seq_len)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _window(self.tokens, self.offset(int(index)), self.seq_len)


class EpochShardSampler(DistributedSampler):
    """This process's share of an epoch's samples, as virtual indices ``epoch * len(dataset) + i``.

    A :class:`~torch.utils.data.DistributedSampler` (so Lightning does not replace it under DDP)
    whose indices carry the epoch, which Lightning sets through ``set_epoch`` before each epoch.
    """

    def __init__(self, dataset: RandomWindowDataset, *, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * len(self.dataset)
        return (base + index for index in super().__iter__())


class SequentialWindowDataset(Dataset):
    """Non-overlapping windows that tile a token stream; every token after the first is a target once,
    up to the last whole window (a tail of fewer than ``T`` tokens is left out: every window is full).

    Window ``i`` covers tokens ``[i * T, i * T + T]`` (consecutive windows share one boundary token,
    which is a target in the first and an input in the second).
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"The validation stream has {len(tokens)} tokens, fewer than `seq_len` + 1 = {seq_len + 1}. "
                f"Lower `seq_len`, raise `val_fraction`, or give more validation text."
            )
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return _window(self.tokens, index * self.seq_len, self.seq_len)


def expand_file_patterns(owner: str, name: str, patterns: str | list[str]) -> list[Path]:
    """The files that ``patterns`` name, in order: paths, or glob patterns (``data/*.txt``) expanded sorted.

    Args:
        owner: the class named in errors.
        name: the argument named in errors.
        patterns: one path or pattern, or a list of them.

    Raises:
        ValueError: an entry is not a file, or a pattern matches nothing.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    paths: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))  # `~/data/a.jsonl` as well as `~/data/*.jsonl`
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:  # a typo in one of several patterns must not drop its files silently
            raise ValueError(f"{owner}: `{name}` pattern {pattern!r} matches no file. Check the pattern.")
        for match in matches:
            if not Path(match).is_file():
                raise ValueError(
                    f"{owner}: `{name}` entry {str(match)!r} is not a file. Check the path or the pattern."
                )
            paths.append(Path(match))
    if not paths:
        raise ValueError(f"{owner}: `{name}` {patterns!r} matches no file. Give at least one text file.")
    return paths


def check_some_batches(owner: str, windows_per_process: int, processes: int, batch_size: int, *, fix: str) -> None:
    """Raise ``ValueError`` when a process's windows do not fill one batch: with ``drop_last`` the
    epoch would have no batch, and ``fit`` would end at once without training."""
    if windows_per_process < batch_size:
        raise ValueError(
            f"{owner}: the training data gives each of {processes} process(es) {windows_per_process} window(s), "
            f"fewer than `batch_size` {batch_size}: an epoch would have no batch. To fix it, {fix}."
        )


class _TokenWindowDataModule(L.LightningDataModule):
    """Shared loaders of the data modules below; subclasses provide :meth:`_load_tokens` and ``vocab_size``."""

    vocab_size: int = 256

    def __init__(
        self, *, seq_len: int, batch_size: int, samples_per_epoch: int | None, num_workers: int, seed: int
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(owner, "seq_len", seq_len)
        check_positive_int(owner, "batch_size", batch_size)
        if samples_per_epoch is not None:
            check_positive_int(owner, "samples_per_epoch", samples_per_epoch)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                f"{owner}: `num_workers` must be an integer >= 0, got {num_workers!r}. "
                f"Use 0 to load in the main process."
            )
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self.train_tokens: np.ndarray | None = None
        self.val_tokens: np.ndarray | None = None

    def _load_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is None:
            self.train_tokens, self.val_tokens = self._load_tokens()

    def _loader(self, dataset: Dataset, *, loader_class: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        # Windows that cover the stream about once per epoch, unless told otherwise.
        samples = self.samples_per_epoch or max(1, len(self.train_tokens) // self.seq_len)
        dataset = RandomWindowDataset(
            self.train_tokens, seq_len=self.seq_len, samples_per_epoch=samples, seed=self.seed
        )
        shard = {"num_replicas": 1, "rank": 0}
        if self.trainer is not None and self.trainer.distributed_sampler_kwargs:
            shard = {key: self.trainer.distributed_sampler_kwargs[key] for key in ("num_replicas", "rank")}
        # Resumable: a run restarted from a mid-epoch checkpoint continues with the next window.
        sampler = EpochShardSampler(dataset, **shard)
        loader = self._loader(dataset, sampler=sampler, drop_last=True, loader_class=ResumableDataLoader)
        check_some_batches(type(self).__name__, len(sampler), shard["num_replicas"], self.batch_size,
                           fix="give more text, or set `samples_per_epoch`, or lower `batch_size`")
        return loader

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(SequentialWindowDataset(self.val_tokens, seq_len=self.seq_len), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def stdlib_source_files() -> list[Path]:
    """The standard library's ``.py`` files (no tests, no third-party packages), in a fixed order.

    The order sorts by a CRC-32 of the relative path, then by the path: a shuffle that is the same
    on every machine, so that a ``max_bytes`` cap samples the whole library rather than the
    modules whose names come first.
    """
    root = Path(os.path.dirname(os.__file__))
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in _EXCLUDED_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    relative = [file.relative_to(root).as_posix() for file in files]
    return [root / path for path in sorted(relative, key=lambda path: (zlib.crc32(path.encode()), path))]


class ByteCorpusDataModule(_TokenWindowDataModule):
    """Bytes of the Python standard library's own source code: a corpus on every machine with Python.

    The first ``max_bytes`` of :func:`stdlib_source_files` (whole files), split by file into
    training and validation (the last files, about ``val_fraction`` of the bytes, validate), cached
    as two ``uint8`` ``.npy`` files under ``cache_dir``. The cache key covers the Python version,
    the file list with sizes and the arguments, so a changed installation rebuilds it.

    Args:
        seq_len: bytes per input sequence.
        batch_size: sequences per batch (per process).
        max_bytes: cap on the corpus size.
        val_fraction: share of the bytes held out for validation.
        samples_per_epoch: training windows per epoch; by default the training bytes / ``seq_len``.
        num_workers: data-loader worker processes.
        cache_dir: where the corpus is cached; ``~/.cache/lightning_moe`` by default.
        seed: seeds the training offsets.
    """

    vocab_size = 256

    def __init__(
        self,
        *,
        seq_len: int = 128,
        batch_size: int = 16,
        max_bytes: int = 6_000_000,
        val_fraction: float = 0.05,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            seq_len=seq_len,
            batch_size=batch_size,
            samples_per_epoch=samples_per_epoch,
            num_workers=num_workers,
            seed=seed,
        )
        owner = type(self).__name__
        check_positive_int(owner, "max_bytes", max_bytes)
        check_fraction(owner, "val_fraction", val_fraction)
        self.max_bytes, self.val_fraction = max_bytes, val_fraction
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "lightning_moe").expanduser()

    def _selected_files(self) -> list[tuple[Path, int]]:
        selected, total = [], 0
        for path in stdlib_source_files():
            size = path.stat().st_size
            if selected and total + size > self.max_bytes:
                break
            selected.append((path, size))
            total += size
        return selected

    def cache_paths(self) -> tuple[Path, Path]:
        """The training and validation cache files for this Python installation and these arguments."""
        key = hashlib.sha256(f"{sys.version}|{self.max_bytes}|{self.val_fraction}".encode())
        for path, size in self._selected_files():
            key.update(f"|{path.as_posix()}:{size}".encode())
        stem = f"stdlib-bytes-{key.hexdigest()[:16]}"
        return self.cache_dir / f"{stem}-train.npy", self.cache_dir / f"{stem}-val.npy"

    def build_corpus(self) -> tuple[np.ndarray, np.ndarray]:
        """Read the corpus from the standard library: (training bytes, validation bytes)."""
        files = self._selected_files()
        if len(files) < 2:
            raise ValueError(
                f"{type(self).__name__}: `max_bytes` ({self.max_bytes}) holds {len(files)} file(s); training and "
                f"validation need a file each. Raise `max_bytes` (e.g. 6_000_000)."
            )
        total = sum(size for _, size in files)
        num_val_files, val_bytes = 0, 0
        while val_bytes < self.val_fraction * total and num_val_files < len(files) - 1:
            num_val_files += 1
            val_bytes += files[-num_val_files][1]
        split = len(files) - num_val_files
        train = np.frombuffer(b"".join(path.read_bytes() for path, _ in files[:split]), dtype=np.uint8)
        val = np.frombuffer(b"".join(path.read_bytes() for path, _ in files[split:]), dtype=np.uint8)
        return train, val

    def prepare_data(self) -> None:
        """Build the cache once per node (Lightning calls this on one process per node)."""
        train_path, val_path = self.cache_paths()
        if train_path.exists() and val_path.exists():
            return
        train, val = self.build_corpus()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for path, array in ((train_path, train), (val_path, val)):
            # Write then rename: a process that reads the cache never sees a half-written file.
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            with open(partial, "wb") as handle:
                np.save(handle, array)
            os.replace(partial, path)

    def _load_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        self.prepare_data()
        train_path, val_path = self.cache_paths()
        return np.load(train_path, mmap_mode="r"), np.load(val_path, mmap_mode="r")


class TextFileDataModule(_TokenWindowDataModule):
    """Your own text files, as bytes or as the ids of a Hugging Face ``tokenizers`` tokenizer.

    Set the model's ``vocab_size`` to this module's ``vocab_size`` (256 for bytes, the tokenizer's
    vocabulary otherwise); the ``lightning-moe`` command line links the two.

    Args:
        train_files: training text files, or glob patterns (``data/*.txt``), read in order.
        val_files: validation files or patterns; by default the last ``val_fraction`` of the
            training tokens validates.
        val_fraction: share of the training tokens held out when ``val_files`` is not given.
        tokenizer_file: a ``tokenizer.json`` for :meth:`tokenizers.Tokenizer.from_file`; ``None``
            models bytes.
        seq_len: tokens per input sequence.
        batch_size: sequences per batch (per process).
        samples_per_epoch: training windows per epoch; by default the training tokens / ``seq_len``.
        num_workers: data-loader worker processes.
        seed: seeds the training offsets.
    """

    def __init__(
        self,
        *,
        train_files: list[str],
        val_files: list[str] | None = None,
        val_fraction: float = 0.05,
        tokenizer_file: str | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        samples_per_epoch: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            seq_len=seq_len,
            batch_size=batch_size,
            samples_per_epoch=samples_per_epoch,
            num_workers=num_workers,
            seed=seed,
        )
        owner = type(self).__name__
        self.train_files = expand_file_patterns(owner, "train_files", train_files)
        self.val_files = expand_file_patterns(owner, "val_files", val_files) if val_files else None
        if self.val_files is None:
            check_fraction(owner, "val_fraction", val_fraction)
        self.val_fraction = val_fraction
        self.tokenizer = None
        if tokenizer_file is not None:
            if not Path(tokenizer_file).is_file():
                raise ValueError(
                    f"{owner}: `tokenizer_file` {tokenizer_file!r} is not a file. Give the path of a tokenizer.json."
                )
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
            self.vocab_size = self.tokenizer.get_vocab_size()

    def encode_files(self, paths: list[Path]) -> np.ndarray:
        """The concatenated tokens of ``paths``: their bytes, or the tokenizer's ids of their text."""
        if self.tokenizer is None:
            return np.frombuffer(b"".join(path.read_bytes() for path in paths), dtype=np.uint8)
        dtype = np.uint16 if self.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        ids = []
        for path in paths:
            text = path.read_bytes().decode("utf-8", errors="replace")
            ids.append(np.asarray(self.tokenizer.encode(text).ids, dtype=dtype))
        return np.concatenate(ids)

    def _load_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        train = self.encode_files(self.train_files)
        if self.val_files is not None:
            return train, self.encode_files(self.val_files)
        split = len(train) - max(self.seq_len + 1, int(round(self.val_fraction * len(train))))
        if split < self.seq_len + 1:
            raise ValueError(
                f"{type(self).__name__}: {len(train)} tokens are too few to hold out a validation split of "
                f"`val_fraction` {self.val_fraction} with `seq_len` {self.seq_len}. Give `val_files`, more text, "
                f"or a smaller `seq_len`."
            )
        return train[:split], train[split:]
