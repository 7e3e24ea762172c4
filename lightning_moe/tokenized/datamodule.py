"""``TokenizedDataModule``: fine-tuning data from text and JSONL files, with a checkpoint's own tokenizer."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from lightning_moe.data import check_some_batches, expand_file_patterns
from lightning_moe.tokenized.encoding import DocumentEncoder, checkpoint_vocab_size, load_tokenizer
from lightning_moe.tokenized.packing import (
    PackedWindows,
    WindowLoader,
    ShuffledWindowSampler,
    StreamingWindows,
    encode_all,
)
from lightning_moe.tokenized.sources import (
    BAD_LINE_POLICIES,
    DEFAULT_ROLES,
    BadLines,
    DocumentSource,
    JsonlFields,
    check_input_files,
)
from lightning_moe.validation import check_fraction, check_positive_int


class TokenizedDataModule(L.LightningDataModule):
    """Text files and JSONL (text or chat) tokenised with a checkpoint's tokenizer, packed into windows.

    Inputs: ``.txt`` files (each file one document) and ``.jsonl`` files whose lines hold a text
    (``text_field``) or a conversation (``messages_field``: ``[{"role", "content"}, ...]``, rendered
    with the tokenizer's chat template; only assistant turns are targets). Documents are packed
    into windows of ``seq_len`` tokens (see :mod:`lightning_moe.tokenized.packing`; attention
    crosses document boundaries). Batches are ``(input_ids [B, T], target_ids [B, T])`` with -100
    on tokens that are not targets.

    Validation: ``val_files``, or the documents whose seeded hash falls below ``val_fraction``
    (whole documents, the same on every process). It is held in memory.

    ``streaming=False`` tokenises the training split once in :meth:`setup` and shuffles its windows
    every epoch. ``streaming=True`` reads the files lazily, for data larger than memory: each rank
    and data-loader worker packs its own share of the documents, in file order (no shuffle:
    shuffle the file beforehand); ``samples_per_epoch`` sets the windows per epoch (required with
    more than one process, so every rank runs the same number of steps). Both resume mid-epoch
    from a Lightning checkpoint.

    Bad input (an empty file, a line that is not UTF-8 or not JSON, a line without the field, a
    message with a bad role, a conversation without an assistant turn) raises a ``ValueError``
    that starts with ``path:line:``; with ``on_bad_line="skip"`` the piece is skipped and the
    counts are logged as a warning on the ``lightning_moe.tokenized`` logger (``skipped N bad lines
    of the train data (...)``), once per split in memory, at the end of each shard's pass when
    streaming; :attr:`bad_lines` holds the in-memory counts.

    Args:
        tokenizer: a local checkpoint (or tokenizer) directory; loaded with
            ``AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)``.
        train_files: ``.txt``/``.jsonl`` files or glob patterns.
        val_files: validation files or patterns; by default ``val_fraction`` of the documents.
        val_fraction: expected share of documents held out when ``val_files`` is not given.
        text_field: the JSONL field of a text document (``None``: no text lines).
        messages_field: the JSONL field of a conversation (``None``: no chat lines).
        roles: the roles a message may have.
        append_eos: end every text document with the tokenizer's EOS (after the special tokens the
            tokenizer itself adds, e.g. Llama's BOS before it).
        vocab_size: the model's vocabulary; by default the ``vocab_size`` of ``config.json`` in
            ``tokenizer`` (a checkpoint's embedding rows, often more than the tokenizer's ids), else
            ``len(tokenizer)``.
        seq_len: tokens per input sequence.
        batch_size: sequences per batch (per process).
        streaming: read the training files lazily instead of tokenising them in :meth:`setup`.
        samples_per_epoch: streaming only: windows per epoch over all processes; ``None`` is one
            pass (single process only).
        on_bad_line: ``"error"`` or ``"skip"``.
        num_workers: data-loader worker processes.
        seed: seeds the split and the shuffle.
    """

    def __init__(
        self,
        *,
        tokenizer: str,
        train_files: list[str],
        val_files: list[str] | None = None,
        val_fraction: float = 0.05,
        text_field: str | None = "text",
        messages_field: str | None = "messages",
        roles: list[str] | None = None,
        append_eos: bool = True,
        vocab_size: int | None = None,
        seq_len: int = 1024,
        batch_size: int = 8,
        streaming: bool = False,
        samples_per_epoch: int | None = None,
        on_bad_line: str = "error",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_positive_int(owner, "seq_len", seq_len)
        check_positive_int(owner, "batch_size", batch_size)
        if on_bad_line not in BAD_LINE_POLICIES:
            raise ValueError(f"{owner}: `on_bad_line` must be 'error' or 'skip', got {on_bad_line!r}.")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(
                f"{owner}: `num_workers` must be an integer >= 0, got {num_workers!r}. "
                f"Use 0 to load in the main process."
            )
        if samples_per_epoch is not None:
            check_positive_int(owner, "samples_per_epoch", samples_per_epoch)
            if not streaming:
                raise ValueError(
                    f"{owner}: `samples_per_epoch` ({samples_per_epoch}) applies to streaming=True; an in-memory "
                    f"epoch is one pass over the windows. Drop it or set streaming=True."
                )
        if text_field is None and messages_field is None:
            raise ValueError(f"{owner}: `text_field` and `messages_field` are both None. Set at least one.")
        if val_files is None:
            check_fraction(owner, "val_fraction", val_fraction)
        self.seq_len, self.batch_size, self.streaming = seq_len, batch_size, streaming
        self.samples_per_epoch, self.on_bad_line = samples_per_epoch, on_bad_line
        self.num_workers, self.seed = num_workers, seed
        #: Bad pieces skipped in memory (the training and validation splits, and blank files).
        self.bad_lines = BadLines(on_bad_line)
        train_paths = expand_file_patterns(owner, "train_files", train_files)
        train = check_input_files(owner, "train_files", train_paths, self.bad_lines)
        fields = JsonlFields(
            text_field=text_field, messages_field=messages_field, roles=tuple(roles) if roles else DEFAULT_ROLES
        )
        if val_files is not None:
            val_paths = expand_file_patterns(owner, "val_files", val_files)
            val = check_input_files(owner, "val_files", val_paths, self.bad_lines)
            self.train_source = DocumentSource(train, fields)
            self.val_source = DocumentSource(val, fields)
        else:
            split = dict(val_fraction=val_fraction, seed=seed)
            self.train_source = DocumentSource(train, fields, side="train", **split)
            self.val_source = DocumentSource(train, fields, side="validation", **split)

        self.tokenizer = load_tokenizer(tokenizer, owner)
        #: Ids the tokenizer can produce (added tokens included).
        self.tokenizer_vocab_size = len(self.tokenizer)
        self._vocab_size = vocab_size or checkpoint_vocab_size(tokenizer) or self.tokenizer_vocab_size
        check_positive_int(owner, "vocab_size", self._vocab_size)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = int(pad_id if pad_id is not None else self.tokenizer.eos_token_id or 0)
        self.encoder = DocumentEncoder(self.tokenizer, vocab_size=self._vocab_size, append_eos=append_eos)
        self.train_windows: PackedWindows | None = None
        self.val_windows: PackedWindows | None = None

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size, which the ``lightning-moe`` command links into ``model.vocab_size``."""
        return self._vocab_size

    def _in_memory(self, source: DocumentSource, what: str) -> PackedWindows:
        ids_N, trainable_N = encode_all(source, self.encoder, self.bad_lines)
        windows = PackedWindows(ids_N, trainable_N, seq_len=self.seq_len, pad_id=self.pad_id)
        if len(windows) == 0:
            # The split keeps whole documents (a `.txt` file is one): with few of them, a fraction can put
            # all of them on one side, and only `val_files` separates the two.
            raise ValueError(
                f"{type(self).__name__}: the {what} split holds {len(ids_N)} token(s), too few for one window. "
                + ("Give `val_files`, or raise `val_fraction`" if what == "validation" else "Give more data")
                + " (the split keeps whole documents, and a `.txt` file is one: with few documents, give `val_files`)."
            )
        return windows

    def setup(self, stage: str | None = None) -> None:
        """Tokenise the validation split (and, unless streaming, the training split) once."""
        if self.val_windows is not None:
            return
        if not self.streaming:
            self.train_windows = self._in_memory(self.train_source, "training")
        self.val_windows = self._in_memory(self.val_source, "validation")
        if rank_zero_only.rank == 0:
            self.bad_lines.log_summary("the in-memory data")

    def _shard(self) -> tuple[int, int]:
        kwargs = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        return (kwargs["num_replicas"], kwargs["rank"]) if kwargs else (1, 0)

    def _progress(self) -> tuple[int, int, bool]:
        batches = self.trainer.fit_loop.epoch_loop.batch_progress
        return self.trainer.current_epoch, batches.current.processed, batches.is_last_batch

    def _loader_options(self) -> dict[str, Any]:
        return dict(
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def streaming_windows(
        self, *, rank: int = 0, world_size: int = 1, windows_per_rank: int | None = None
    ) -> StreamingWindows:
        """The training split as a stream of windows for process ``rank`` of ``world_size``.

        Args:
            rank: this process.
            world_size: processes that share the data.
            windows_per_rank: windows of each epoch of this rank; ``None`` for one pass.
        """
        return StreamingWindows(
            source=self.train_source,
            encoder=self.encoder,
            seq_len=self.seq_len,
            pad_id=self.pad_id,
            on_bad_line=self.on_bad_line,
            batch_size=self.batch_size,
            rank=rank,
            world_size=world_size,
            windows_per_rank=windows_per_rank,
        )

    def train_dataloader(self) -> WindowLoader:
        """Shuffled in-memory windows, or this rank's stream; resumable from a Lightning checkpoint."""
        self.setup("fit")
        world_size, rank = self._shard()
        if self.streaming:
            if self.samples_per_epoch is None and world_size > 1:
                raise ValueError(
                    f"{type(self).__name__}: streaming over {world_size} processes needs `samples_per_epoch`, so "
                    f"that every process runs the same number of steps. Set it (e.g. your tokens / seq_len)."
                )
            windows_per_rank = None if self.samples_per_epoch is None else self.samples_per_epoch // world_size
            if windows_per_rank is not None and windows_per_rank < self.batch_size:
                raise ValueError(
                    f"{type(self).__name__}: `samples_per_epoch` {self.samples_per_epoch} gives each of {world_size} "
                    f"process(es) fewer windows than `batch_size` {self.batch_size}. Raise it."
                )
            dataset = self.streaming_windows(rank=rank, world_size=world_size, windows_per_rank=windows_per_rank)
            loader = WindowLoader(dataset, **self._loader_options())
        else:
            sampler = ShuffledWindowSampler(self.train_windows, num_replicas=world_size, rank=rank, seed=self.seed)
            check_some_batches(type(self).__name__, len(sampler), world_size, self.batch_size,
                               fix="give more data, or lower `batch_size` or `seq_len`")
            loader = WindowLoader(self.train_windows, sampler=sampler, drop_last=True, **self._loader_options())
        if self.trainer is not None:
            loader.progress = self._progress
        return loader

    def val_dataloader(self) -> DataLoader:
        """The validation windows in order (Lightning shards them under DDP)."""
        self.setup("validate")
        return DataLoader(self.val_windows, shuffle=False, **self._loader_options())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
