"""Data modules: the embedded standard-library corpus (split, cache, windows) and the user's text files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_moe import ByteCorpusDataModule, TextFileDataModule
from lightning_moe.data import EpochShardSampler, RandomWindowDataset, SequentialWindowDataset, stdlib_source_files

SMALL = dict(max_bytes=200_000, seq_len=32, batch_size=4)


def test_stdlib_source_files_are_python_sources_in_a_fixed_order():
    files = stdlib_source_files()
    assert len(files) > 100 and files == stdlib_source_files()
    assert all(path.suffix == ".py" for path in files)
    assert not any(part in ("site-packages", "test", "__pycache__") for path in files for part in path.parts)


def test_byte_corpus_split_is_deterministic_and_cached(tmp_path, monkeypatch):
    data = ByteCorpusDataModule(cache_dir=str(tmp_path / "a"), **SMALL)
    data.prepare_data()
    train_path, val_path = data.cache_paths()
    assert train_path.exists() and val_path.exists()
    data.setup("fit")
    train, val = np.asarray(data.train_tokens), np.asarray(data.val_tokens)
    total = len(train) + len(val)
    assert train.dtype == np.uint8 and total <= 200_000
    assert 0.05 * total <= len(val) < 0.5 * total  # whole files, at least val_fraction of the bytes
    # The bytes are the selected files, training files first.
    selected = b"".join(path.read_bytes() for path, _ in data._selected_files())
    assert bytes(train) + bytes(val) == selected

    # A second module reads the cache and never rebuilds it.
    def no_rebuild(self):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(ByteCorpusDataModule, "build_corpus", no_rebuild)
    cached = ByteCorpusDataModule(cache_dir=str(tmp_path / "a"), **SMALL)
    cached.setup("fit")
    assert np.array_equal(cached.train_tokens, train) and np.array_equal(cached.val_tokens, val)
    monkeypatch.undo()

    # A fresh build elsewhere gives the same split; other arguments give another cache file.
    fresh = ByteCorpusDataModule(cache_dir=str(tmp_path / "b"), **SMALL)
    fresh.setup("fit")
    assert np.array_equal(fresh.train_tokens, train) and np.array_equal(fresh.val_tokens, val)
    other = ByteCorpusDataModule(cache_dir=str(tmp_path / "a"), **{**SMALL, "max_bytes": 150_000})
    assert other.cache_paths()[0] != train_path


def test_training_windows_are_shifted_slices_of_the_stream(tmp_path):
    data = ByteCorpusDataModule(cache_dir=str(tmp_path), samples_per_epoch=8, **SMALL)
    data.setup("fit")
    loader = data.train_dataloader()
    batches = list(loader)
    assert len(batches) == 2
    inputs, targets = batches[0]
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    dataset = loader.dataset
    stream = torch.from_numpy(np.asarray(data.train_tokens, dtype=np.int64))
    for row, index in enumerate(range(4)):
        start = dataset.offset(index)
        assert torch.equal(inputs[row], stream[start : start + 32])
        assert torch.equal(targets[row], stream[start + 1 : start + 33])


def test_training_offsets_depend_on_seed_and_epoch_only():
    tokens = np.arange(10_000) % 251
    dataset = RandomWindowDataset(tokens, seq_len=16, samples_per_epoch=20, seed=3)
    same = RandomWindowDataset(tokens, seq_len=16, samples_per_epoch=20, seed=3)
    other_seed = RandomWindowDataset(tokens, seq_len=16, samples_per_epoch=20, seed=4)
    offsets = [dataset.offset(i) for i in range(20)]
    assert offsets == [same.offset(i) for i in range(20)]
    assert offsets != [other_seed.offset(i) for i in range(20)]
    assert all(0 <= offset <= 10_000 - 17 for offset in offsets) and len(set(offsets)) > 15

    sampler = EpochShardSampler(dataset)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 == list(range(20)) and epoch1 == list(range(20, 40))  # new windows each epoch

    # Two processes share the epoch's samples without overlap.
    shards = [EpochShardSampler(dataset, num_replicas=2, rank=rank) for rank in (0, 1)]
    for shard in shards:
        shard.set_epoch(1)
    rank0, rank1 = (list(shard) for shard in shards)
    assert len(rank0) == len(rank1) == 10 and sorted(rank0 + rank1) == epoch1


def test_train_loader_takes_its_shard_from_the_trainer(tmp_path):
    from types import SimpleNamespace

    data = ByteCorpusDataModule(cache_dir=str(tmp_path), samples_per_epoch=8, **SMALL)
    # Lightning hands the data module its trainer; under DDP the strategy gives the process's shard.
    data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1})
    sampler = data.train_dataloader().sampler
    assert isinstance(sampler, EpochShardSampler) and (sampler.num_replicas, sampler.rank) == (2, 1)
    assert list(sampler) == [1, 3, 5, 7]


def test_validation_windows_tile_the_stream():
    tokens = np.arange(1, 100, dtype=np.int64)  # 99 tokens
    dataset = SequentialWindowDataset(tokens, seq_len=10)
    assert len(dataset) == 9
    targets = torch.cat([dataset[i][1] for i in range(len(dataset))])
    assert torch.equal(targets, torch.arange(2, 92))  # every token after the first, once
    with pytest.raises(IndexError):
        dataset[9]


def test_byte_corpus_validation_loader(tmp_path):
    data = ByteCorpusDataModule(cache_dir=str(tmp_path), **SMALL)
    data.setup("validate")
    loader = data.val_dataloader()
    inputs, targets = next(iter(loader))
    assert inputs.shape == (4, 32)
    val = torch.from_numpy(np.asarray(data.val_tokens, dtype=np.int64))
    assert torch.equal(inputs[1], val[32:64]) and torch.equal(targets[1], val[33:65])
    assert data.vocab_size == 256


def test_text_files_as_bytes(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("hello world\n" * 50)
    second.write_text("goodbye moon\n" * 50)
    data = TextFileDataModule(train_files=[str(tmp_path / "*.txt")], val_fraction=0.1, seq_len=16, batch_size=2)
    assert data.vocab_size == 256 and data.train_files == [first, second]
    data.setup("fit")
    stream = first.read_bytes() + second.read_bytes()
    assert bytes(data.train_tokens) + bytes(data.val_tokens) == stream
    assert len(data.val_tokens) == round(0.1 * len(stream))
    inputs, targets = next(iter(data.train_dataloader()))
    assert inputs.shape == (2, 16) and torch.equal(inputs[:, 1:], targets[:, :-1])

    with_val = TextFileDataModule(train_files=[str(first)], val_files=[str(second)], seq_len=16, batch_size=2)
    with_val.setup("fit")
    assert bytes(with_val.val_tokens) == second.read_bytes()


def test_text_files_with_a_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    texts = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"]
    tokenizer = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(" ".join(texts * 20))
    val.write_text(" ".join(texts * 5))

    data = TextFileDataModule(
        train_files=[str(train)], val_files=[str(val)], tokenizer_file=str(tokenizer_file), seq_len=8, batch_size=3
    )
    assert data.vocab_size == tokenizer.get_vocab_size() == 10  # 9 words and [UNK]
    data.setup("fit")
    assert list(data.train_tokens) == tokenizer.encode(train.read_text()).ids
    assert list(data.val_tokens) == tokenizer.encode(val.read_text()).ids
    inputs, targets = next(iter(data.train_dataloader()))
    assert inputs.shape == (3, 8) and int(inputs.max()) < 10
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda tmp: TextFileDataModule(train_files=[str(tmp / "missing.txt")]), "train_files"),
        (lambda tmp: TextFileDataModule(train_files=[str(tmp / "*.nothing")]), "train_files"),
        # One pattern of several that matches nothing (a typo) is an error, not silently fewer files.
        (lambda tmp: TextFileDataModule(train_files=[str(tmp / "*.txt"), str(tmp / "typo/*.txt")]), "train_files"),
        (lambda tmp: TextFileDataModule(train_files=[str(tmp / "x.txt")], tokenizer_file="no.json"), "tokenizer_file"),
        (lambda tmp: TextFileDataModule(train_files=[str(tmp / "x.txt")], seq_len=0), "seq_len"),
        (lambda tmp: TextFileDataModule(train_files=[str(tmp / "x.txt")], val_fraction=1.5), "val_fraction"),
        (lambda tmp: ByteCorpusDataModule(batch_size=0), "batch_size"),
        (lambda tmp: ByteCorpusDataModule(max_bytes=0), "max_bytes"),
        (lambda tmp: ByteCorpusDataModule(max_bytes=1000, cache_dir=str(tmp)).setup(), "max_bytes"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(tmp_path, make, field):
    (tmp_path / "x.txt").write_text("some text\n" * 20)
    with pytest.raises(ValueError, match=field):
        make(tmp_path)


def test_data_that_fills_no_batch_is_rejected(tmp_path):
    """Fewer windows than `batch_size`: the epoch would have no batch (drop_last) and `fit` would end
    at once without training; it is an error that names `batch_size` instead."""
    (tmp_path / "x.txt").write_text("hello world, a small file. " * 40)  # 1080 bytes: 8 windows of 128
    data = TextFileDataModule(train_files=[str(tmp_path / "x.txt")], seq_len=128, batch_size=16, val_fraction=0.05)
    with pytest.raises(ValueError, match="7 window.*fewer than `batch_size` 16"):
        data.train_dataloader()
    data.batch_size = 4
    assert len(data.train_dataloader()) == 1


def test_too_short_text_for_seq_len_is_rejected(tmp_path):
    (tmp_path / "x.txt").write_text("short")
    data = TextFileDataModule(train_files=[str(tmp_path / "x.txt")], seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        data.setup("fit")


def test_a_path_under_home_is_expanded_with_or_without_a_pattern(tmp_path, monkeypatch):
    from lightning_moe.data import expand_file_patterns

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "a.txt").write_text("the cat")
    assert expand_file_patterns("X", "train_files", ["~/a.txt", "~/*.txt"]) == [tmp_path / "a.txt"] * 2
