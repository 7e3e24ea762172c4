"""TokenizedDataModule: token ids and loss masks, packing, the split, streaming and sharding, resume, bad input."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lightning_moe import TokenizedDataModule  # noqa: E402
from lightning_moe.tokenized.packing import (  # noqa: E402
    PackedWindows,
    WindowLoader,
    pack_stream,
)
from lightning_moe.tokenized.sources import is_validation_document  # noqa: E402

SPECIALS = ["[UNK]", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
WORDS = (
    "system user assistant tool be brief hello hi there how are you fine thanks the cat sat on mat dog "
    "a and log ok bye what is it"
).split() + [f"doc{i}" for i in range(200)]

# A ChatML-style template (Qwen2's format without its default system prompt).
CHATML = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same format with transformers' {% generation %} markers around the assistant text.
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
]


def make_tokenizer(
    directory: Path, *, family: str = "qwen", template: str | None = CHATML, config_vocab: int | None = None
) -> Path:
    """A word-level tokenizer saved as a transformers checkpoint directory (Qwen-like: no BOS; Llama-like: BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(SPECIALS)
    if family == "llama":
        bos = [("<s>", vocab["<s>"])]
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
        special = dict(bos_token="<s>", eos_token="</s>")
    else:
        special = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        **special,
    )
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(directory)
    if config_vocab is not None:
        (directory / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": config_vocab}))
    return directory


def ids_of(text: str) -> list[int]:
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    return [vocab[word] for word in text.split()]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


def text_docs(count: int) -> list[dict]:
    # Each document ends with its own marker word, so a marker counts how often its document is trained on.
    return [{"text": " ".join(["the cat sat"] * (1 + index % 3) + [f"doc{index}"])} for index in range(count)]


@pytest.fixture
def qwen(tmp_path):
    return make_tokenizer(tmp_path / "qwen")


def module(tokenizer: Path, files, **kwargs) -> TokenizedDataModule:
    options = dict(seq_len=8, batch_size=2, val_fraction=0.25)
    options.update(kwargs)
    return TokenizedDataModule(tokenizer=str(tokenizer), train_files=[str(f) for f in files], **options)


# --- tokenisation and masks ---------------------------------------------------------------------


def test_text_documents_get_the_family_separators(tmp_path):
    llama, qwen = make_tokenizer(tmp_path / "llama", family="llama"), make_tokenizer(tmp_path / "qwen")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}, {"text": "a dog"}])
    for tokenizer, expected in (
        (llama, "<s> the cat sat </s> <s> a dog </s>"),  # Llama: BOS before, EOS after each document
        (qwen, "the cat sat <|endoftext|> a dog <|endoftext|>"),  # Qwen2: no BOS, <|endoftext|> after
    ):
        dm = module(tokenizer, [data], val_files=[str(data)])
        dm.setup()
        assert dm.val_windows.ids_N.tolist() == ids_of(expected)
        assert dm.val_windows.trainable_N.all()
    plain = module(qwen, [data], val_files=[str(data)], append_eos=False)
    plain.setup()
    assert plain.val_windows.ids_N.tolist() == ids_of("the cat sat a dog")


def test_a_txt_file_is_one_document(tmp_path, qwen):
    text = tmp_path / "notes.txt"
    text.write_text("the cat sat\non the mat\n")
    dm = module(qwen, [text], val_files=[str(text)])
    dm.setup()
    assert dm.val_windows.ids_N.tolist() == ids_of("the cat sat on the mat <|endoftext|>")


def test_a_byte_order_mark_is_not_text(tmp_path, qwen):
    """Files saved as "UTF-8 with BOM": the mark made the first JSONL line invalid JSON and a text
    file's first token junk."""
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "the cat sat"}\n{"text": "a dog"}\n')
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbfthe cat sat\n")
    for path, expected in ((jsonl, "the cat sat <|endoftext|> a dog <|endoftext|>"), (text, "the cat sat <|endoftext|>")):
        dm = module(qwen, [path], val_files=[str(path)])
        dm.setup()
        assert dm.val_windows.ids_N.tolist() == ids_of(expected)


def test_one_txt_file_and_a_fraction_point_at_val_files(tmp_path, qwen):
    """A `.txt` file is one document and the split keeps whole documents: a fraction puts the one file
    on one side, and the error says that only `val_files` separates them."""
    text = tmp_path / "notes.txt"
    text.write_text("the cat sat on the mat " * 20)
    for fraction in (0.05, 0.9):
        with pytest.raises(ValueError, match="a `.txt` file is one: with few documents, give `val_files`"):
            module(qwen, [text], val_fraction=fraction).setup()


def test_in_memory_data_that_fills_no_batch_is_rejected(tmp_path, qwen):
    data = write_jsonl(tmp_path / "d.jsonl", text_docs(8))
    dm = module(qwen, [data], val_files=[str(data)], batch_size=64)
    with pytest.raises(ValueError, match="fewer than `batch_size` 64: an epoch would have no batch"):
        dm.train_dataloader()


def test_a_file_name_that_is_not_utf8_is_split_by_its_bytes(tmp_path, qwen):
    import os

    name = os.fsdecode(b"caf\xe9.jsonl")  # Latin-1: a surrogate escape in a str path
    path = tmp_path / name
    write_jsonl(path, text_docs(40))
    dm = module(qwen, [path], val_fraction=0.25)
    dm.setup()
    assert len(dm.train_windows) > 0 and len(dm.val_windows) > 0


@pytest.mark.parametrize("template", [CHATML, CHATML_GENERATION], ids=["prefix-diff", "generation-blocks"])
def test_chat_loss_mask_covers_only_assistant_turns(tmp_path, template):
    tokenizer = make_tokenizer(tmp_path / "tok", template=template)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    dm = module(tokenizer, [data], val_files=[str(data)])
    dm.setup()
    tokens = (
        "<|im_start|> system be brief <|im_end|> <|im_start|> user hello <|im_end|> "
        "<|im_start|> assistant hi there <|im_end|> <|im_start|> user how are you <|im_end|> "
        "<|im_start|> assistant fine thanks <|im_end|>"
    )
    trained = {11, 12, 13, 22, 23, 24}  # hi there <|im_end|>, fine thanks <|im_end|>
    assert dm.val_windows.ids_N.tolist() == ids_of(tokens)
    assert np.flatnonzero(dm.val_windows.trainable_N).tolist() == sorted(trained)
    # In the windows, targets are the next tokens where they are trainable and -100 elsewhere.
    targets = torch.cat([dm.val_windows[i][1] for i in range(len(dm.val_windows))])
    expected = [token if position + 1 in trained else -100 for position, token in enumerate(ids_of(tokens)[1:])]
    assert targets[: len(expected)].tolist() == expected and (targets[len(expected) :] == -100).all()


def test_both_template_kinds_train_the_same_tokens_with_a_byte_level_tokenizer(tmp_path):
    """With byte-level BPE, ChatML's newline after <|im_end|> is a token: the prefix-rendering path
    trained it, the {% generation %} blocks did not. Both now train the turn through <|im_end|>; a
    template without an end-of-turn marker keeps the whitespace that ends the turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello there, how are you? fine thanks\n"] * 20, trainer)
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "fine thanks"}]

    def trained_by(template: str) -> str:
        name = f"t{abs(hash(template))}"
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
        fast.chat_template = template
        fast.save_pretrained(tmp_path / name)
        data = write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": conversation}])
        dm = module(tmp_path / name, [data], val_files=[str(data)])
        dm.setup()
        ids_N, mask_N = dm.val_windows.ids_N.tolist(), dm.val_windows.trainable_N
        return fast.decode([ids_N[i] for i in np.flatnonzero(mask_N)])

    trained = {"prefix": trained_by(CHATML), "generation": trained_by(CHATML_GENERATION)}
    assert trained["prefix"] == trained["generation"] == "fine thanks<|im_end|>"
    # A template that ends a turn with whitespace alone keeps it: it is how the model learns to end one.
    bare = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:\n{% endif %}")
    assert trained_by(bare) == "fine thanks\n\n"


def test_an_opening_assistant_message_is_trained_without_its_header(tmp_path, qwen):
    turns = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    dm = module(qwen, [data], val_files=[str(data)])
    dm.setup()
    expected = ids_of("<|im_start|> assistant hi <|im_end|> <|im_start|> user bye <|im_end|>")
    assert dm.val_windows.ids_N.tolist() == expected
    assert dm.val_windows.trainable_N.tolist() == [False, False, True, True, False, False, False, False]


def test_text_and_chat_lines_mix_and_fields_are_configurable(tmp_path, qwen):
    data = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"body": "a dog"}, {"turns": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}],
    )
    dm = module(qwen, [data], val_files=[str(data)], text_field="body", messages_field="turns")
    dm.setup()
    assert dm.val_windows.ids_N.tolist() == ids_of(
        "a dog <|endoftext|> <|im_start|> user hi <|im_end|> <|im_start|> assistant ok <|im_end|>"
    )
    assert dm.val_windows.trainable_N.tolist() == [True] * 3 + [False] * 6 + [True, True]


def test_vocab_size_is_the_checkpoints_embedding_rows(tmp_path):
    padded = make_tokenizer(tmp_path / "ckpt", config_vocab=512)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a dog"}])
    dm = module(padded, [data], val_files=[str(data)])
    assert dm.vocab_size == 512 and dm.tokenizer_vocab_size == len(SPECIALS + WORDS)
    bare = module(make_tokenizer(tmp_path / "tok"), [data], val_files=[str(data)])
    assert bare.vocab_size == len(SPECIALS + WORDS)
    small = module(padded, [data], val_files=[str(data)], vocab_size=10)
    with pytest.raises(ValueError, match=r"d\.jsonl:1: token id \d+ is not below `vocab_size` 10"):
        small.setup()


# --- packing and the split ----------------------------------------------------------------------


def test_packed_windows_tile_the_stream_and_pad_the_last():
    ids = np.arange(10, 30, dtype=np.int32)  # 20 tokens
    trainable = np.ones(20, dtype=bool)
    trainable[[3, 4, 15]] = False
    windows = PackedWindows(ids, trainable, seq_len=8, pad_id=0)
    assert len(windows) == 3  # ceil(19 / 8)
    inputs, targets = zip(*(windows[i] for i in range(3)))
    assert inputs[0].tolist() == list(range(10, 18)) and inputs[1].tolist() == list(range(18, 26))
    assert inputs[2].tolist() == [26, 27, 28, 0, 0, 0, 0, 0]
    every_target = torch.cat(targets)
    expected = [token if trainable[token - 10] else -100 for token in range(11, 30)] + [-100] * 5
    assert every_target.tolist() == expected  # each token after the first is a target once
    with pytest.raises(IndexError):
        windows[3]


def test_pack_stream_equals_packed_windows_for_any_piece_lengths():
    rng = np.random.default_rng(0)
    pieces = [(rng.integers(0, 50, n).astype(np.int32), rng.random(n) < 0.7) for n in rng.integers(1, 30, 40)]
    ids, trainable = np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces])
    for seq_len in (1, 5, 16, 64):
        expected = PackedWindows(ids, trainable, seq_len=seq_len, pad_id=7)
        streamed = list(pack_stream(iter(pieces), seq_len=seq_len, pad_id=7))
        assert len(streamed) == len(expected)
        for index, (inputs, targets) in enumerate(streamed):
            assert torch.equal(inputs, expected[index][0]) and torch.equal(targets, expected[index][1])


def test_split_is_by_document_deterministic_and_seeded(tmp_path, qwen):
    data = write_jsonl(tmp_path / "d.jsonl", text_docs(200))

    def markers(windows) -> list[str]:
        words = {index: word for word, index in qwen_vocab().items()}
        return [words[i] for i in windows.ids_N.tolist() if words[i].startswith("doc")]

    first, again = module(qwen, [data], seed=1), module(qwen, [data], seed=1)
    other = module(qwen, [data], seed=2)
    for dm in (first, again, other):
        dm.setup()
    train, val = markers(first.train_windows), markers(first.val_windows)
    assert sorted(train + val, key=lambda m: int(m[3:])) == [f"doc{i}" for i in range(200)]  # whole documents, once
    assert 25 <= len(val) <= 75  # val_fraction 0.25 of 200
    assert markers(again.val_windows) == val and markers(other.val_windows) != val
    assert val == [f"doc{i}" for i in range(200) if is_validation_document(str(data), i + 1, val_fraction=0.25, seed=1)]


def qwen_vocab() -> dict[str, int]:
    return {token: index for index, token in enumerate(SPECIALS + WORDS)}


# --- streaming, sharding, resume ----------------------------------------------------------------


def test_streaming_equals_in_memory(tmp_path, qwen):
    data = write_jsonl(tmp_path / "d.jsonl", text_docs(60) + [{"messages": CONVERSATION}] * 3)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat\n" * 5)
    memory = module(qwen, [data, text], seed=3)
    stream = module(qwen, [data, text], seed=3, streaming=True)
    memory.setup()
    stream.setup()
    assert stream.train_windows is None  # nothing tokenised ahead
    streamed = list(stream.streaming_windows().shard_windows(0, 1))
    assert len(streamed) == len(memory.train_windows) > 10
    for index, (inputs, targets) in enumerate(streamed):
        expected_inputs, expected_targets = memory.train_windows[index]
        assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)
    assert np.array_equal(stream.val_windows.ids_N, memory.val_windows.ids_N)


def marker_counts(batches) -> dict[str, int]:
    words = {index: word for word, index in qwen_vocab().items()}
    counts: dict[str, int] = {}
    for _, targets in batches:
        for token in targets[targets != -100].tolist():
            if words[token].startswith("doc"):
                counts[words[token]] = counts.get(words[token], 0) + 1
    return counts


def test_streaming_shards_over_ranks_and_workers_cover_each_document_once(tmp_path, qwen):
    data = write_jsonl(tmp_path / "d.jsonl", text_docs(120))
    dm = module(qwen, [data], seed=0)
    dm.setup()
    validates = [is_validation_document(str(data), i + 1, val_fraction=0.25, seed=0) for i in range(120)]
    train_markers = {f"doc{i}" for i in range(120) if not validates[i]}
    batches = []
    for rank in range(2):  # two ranks, each with two real data-loader worker processes
        dataset = dm.streaming_windows(rank=rank, world_size=2)
        batches += list(DataLoader(dataset, batch_size=2, num_workers=2))
    counts = marker_counts(batches)
    assert set(counts) == train_markers and set(counts.values()) == {1}


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_streaming_epochs_have_a_fixed_size_and_continue_the_stream(tmp_path, qwen, start_method):
    """Also with spawned workers (the default on macOS): the stream, its source and its tokenizer then
    travel to them pickled, and the epoch counter they share must still reach them."""
    data = write_jsonl(tmp_path / "d.jsonl", text_docs(40))
    dm = module(qwen, [data], val_files=[str(data)], seed=0)
    dm.setup()
    one_pass = [w for shard in range(2) for w in dm.streaming_windows().shard_windows(shard, 2)]
    dataset = dm.streaming_windows(windows_per_rank=6)
    loader = WindowLoader(dataset, batch_size=2, num_workers=2, persistent_workers=True, multiprocessing_context=start_method)
    epochs = [list(loader) for _ in range(2)]
    assert [len(epoch) for epoch in epochs] == [3, 3] and len(loader) == 3
    # Worker w serves batches w, w + 2, ...; its stream (shard w of 2) goes on across epochs.
    served = {0: [], 1: []}
    for epoch in epochs:
        for index, batch in enumerate(epoch):
            served[index % 2].extend(zip(*batch))
    for worker in (0, 1):
        shard = [w for w in dm.streaming_windows().shard_windows(worker, 2)]
        for (inputs, targets), expected in zip(served[worker], shard):
            assert torch.equal(inputs, expected[0]) and torch.equal(targets, expected[1])
    assert len(one_pass) > 6


@pytest.mark.parametrize("streaming,num_workers", [(False, 0), (True, 0), (True, 2)])
def test_a_restored_loader_continues_where_the_epoch_stopped(tmp_path, qwen, streaming, num_workers):
    data = write_jsonl(tmp_path / "d.jsonl", text_docs(60))
    extra = dict(streaming=True, samples_per_epoch=10) if streaming else {}
    dm = module(qwen, [data], num_workers=num_workers, **extra)
    dm.setup()
    reference = dm.train_dataloader()
    epochs = [[b[0].clone() for b in reference] for _ in range(2)]
    for epoch, done in ((0, 3), (1, 1)):
        interrupted = dm.train_dataloader()
        for _ in range(epoch):
            list(interrupted)
        iterator = iter(interrupted)
        for _ in range(done):
            next(iterator)
        state = interrupted.state_dict()
        assert state == {"epoch": epoch, "batches": done}
        resumed = module(qwen, [data], num_workers=num_workers, **extra)
        resumed.setup()
        loader = resumed.train_dataloader()
        loader.load_state_dict(state)
        rest = [b[0] for b in loader]
        assert len(rest) == len(epochs[epoch]) - done
        assert all(torch.equal(a, b) for a, b in zip(rest, epochs[epoch][done:]))


def test_a_one_pass_stream_resumes_where_it_stopped_after_a_shard_ran_out(tmp_path, qwen):
    """One pass with two workers whose shards end at different points (long even lines, short odd
    ones): once shard 1 runs out PyTorch serves shard 0 alone. A loader stopped at any batch, and
    resumed from its state (also a second time), serves exactly the rest of the epoch."""
    docs = [{"text": " ".join(["the cat sat"] * (4 if index % 2 == 0 else 1) + [f"doc{index}"])} for index in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", docs)

    def loader():
        dm = module(qwen, [data], val_files=[str(data)], streaming=True, num_workers=2)
        dm.setup()
        return dm.train_dataloader()

    def keys(batches):
        return [tuple(batch[0].flatten().tolist()) for batch in batches]

    epoch = keys(loader())
    assert len(set(epoch)) == len(epoch) > 6
    for done in range(1, len(epoch)):
        interrupted = loader()
        iterator = iter(interrupted)
        for _ in range(done):
            next(iterator)
        state = interrupted.state_dict()
        assert state["batches"] == done and sum(state["served_per_role"]) == done
        resumed = loader()
        resumed.load_state_dict(state)
        iterator = iter(resumed)
        rest = keys(iterator) if done % 3 else keys([next(iterator)])  # every third: stop again after one
        if done % 3:
            assert rest == epoch[done:], done
            continue
        again = loader()
        again.load_state_dict(resumed.state_dict())
        assert rest + keys(again) == epoch[done:], done


def test_a_one_pass_stream_refuses_to_resume_with_another_number_of_workers(tmp_path, qwen):
    data = write_jsonl(tmp_path / "d.jsonl", text_docs(20))
    dm = module(qwen, [data], val_files=[str(data)], streaming=True, num_workers=2)
    dm.setup()
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches": 3, "served_per_role": [1, 1, 1], "next_role": 0})
    with pytest.raises(ValueError, match="with 3 data-loader worker.*resume it with num_workers=3"):
        iter(loader)


# --- bad input ----------------------------------------------------------------------------------


BAD_LINES = [
    ("not JSON", b'{"text": "a dog"}\n{"text": "a dog"\n', 2, r"not valid JSON"),
    ("missing field", b'{"text": "a dog"}\n\n{"body": "a dog"}\n', 3, r"no 'text' or 'messages' field"),
    ("not UTF-8", b'{"text": "a dog"}\n{"text": "caf\xe9"}\n', 2, r"not valid UTF-8"),
    (
        "bad role",
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "ok"}]}\n',
        1,
        r"messages\[1\] has role 'robot'",
    ),
    (
        "no assistant turn",
        b'{"messages": [{"role": "user", "content": "hi"}]}\n',
        1,
        r"the conversation has no assistant message",
    ),
    ("not an object", b'["a", "dog"]\n', 1, r"expected a JSON object"),
    ("empty text", b'{"text": "  "}\n', 1, r"field 'text' must be a non-empty string"),
]


@pytest.mark.parametrize("reason,content,line,message", BAD_LINES, ids=[case[0] for case in BAD_LINES])
def test_bad_lines_are_errors_that_name_file_and_line(tmp_path, qwen, reason, content, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    dm = module(qwen, [bad], val_files=[str(bad)])
    with pytest.raises(ValueError, match=rf"^{bad}:{line}: {message}"):
        dm.setup()


# Templates that refuse a conversation, as Mistral's (roles must alternate) and Qwen2.5's (it reads
# messages[0] when rendering the prompt before an opening assistant turn) do.
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)
READS_FIRST = (
    "{% if messages[0]['role'] == 'system' %}<|im_start|>system {{ messages[0]['content'] }} <|im_end|> "
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


@pytest.mark.parametrize(
    "template, bad, message",
    [
        (ALTERNATING, [("user", "the cat"), ("user", "the dog"), ("assistant", "sat")],
         "TemplateError: Conversation roles must alternate user/assistant"),
        (READS_FIRST, [("assistant", "the cat"), ("user", "sat")], "UndefinedError"),
    ],
    ids=["raise_exception", "messages[0] of an empty prefix"],
)
def test_a_conversation_the_template_refuses_is_a_bad_line(tmp_path, template, bad, message):
    tokenizer = make_tokenizer(tmp_path / "tok", template=template)
    good = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]}
    refused = {"messages": [{"role": role, "content": content} for role, content in bad]}
    data = write_jsonl(tmp_path / "chat.jsonl", [good, good, refused, good])
    with pytest.raises(ValueError, match=rf"^{data}:3: the chat template rejects this conversation \({message}"):
        module(tokenizer, [data], val_files=[str(data)]).setup()
    skipping = module(tokenizer, [data], val_files=[str(data)], on_bad_line="skip")
    skipping.setup()
    assert dict(skipping.bad_lines.counts) == {"template": 2}  # the line, in the training and validation reads


def test_bad_text_file_lines_and_empty_files(tmp_path, qwen):
    text = tmp_path / "t.txt"
    text.write_bytes(b"the cat\nsat \xff on\nthe mat\n")
    with pytest.raises(ValueError, match=rf"^{text}:2: not valid UTF-8"):
        module(qwen, [text], val_files=[str(text)]).setup()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"^{empty}: the file is empty"):
        module(qwen, [empty, text])
    with pytest.raises(ValueError, match="`train_files` entry .* is not a file"):
        module(qwen, [tmp_path])
    csv = tmp_path / "d.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match="neither a .txt nor a .jsonl"):
        module(qwen, [csv])


def test_chat_lines_need_a_prefix_stable_template_or_generation_blocks(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"text": "a dog"}, {"messages": CONVERSATION}])
    # Like templates that drop earlier turns' reasoning: an assistant message renders differently
    # once later messages follow, so its tokens cannot be found by rendering prefixes.
    past = "{{ 'ok' if (m['role'] == 'assistant' and not loop.last) else m['content'] }}"
    shifty = CHATML.replace("{{ m['content'] }}", past)
    tokenizer = make_tokenizer(tmp_path / "shifty", template=shifty)
    with pytest.raises(ValueError, match=rf"^{data}:2: the chat template renders message 2 differently"):
        module(tokenizer, [data], val_files=[str(data)]).setup()
    no_template = make_tokenizer(tmp_path / "base", template=None)
    with pytest.raises(ValueError, match=rf"^{data}:2: a chat line, but the tokenizer has no chat_template"):
        module(no_template, [data], val_files=[str(data)]).setup()


def test_skip_mode_counts_and_logs_bad_lines(tmp_path, qwen, caplog):
    good = [json.dumps(doc) for doc in text_docs(30)]
    bad = tmp_path / "d.jsonl"
    bad.write_bytes(
        "\n".join(good[:10]).encode()
        + b'\n{"text": oops}\n{"body": "x"}\n{"text": "caf\xe9"}\n'
        + "\n".join(good[10:]).encode()
        + b"\n"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with caplog.at_level(logging.WARNING, logger="lightning_moe.tokenized"):
        dm = module(qwen, [bad, empty], on_bad_line="skip", val_fraction=0.3)
        dm.setup()
    assert dict(dm.bad_lines.counts) == {"empty file": 1, "missing field": 1, "not JSON": 1, "not UTF-8": 1}
    record = next(r for r in caplog.records if r.name == "lightning_moe.tokenized")
    assert "skipped 4 bad lines of the in-memory data" in record.getMessage()
    assert f"{empty}: the file is empty" in record.getMessage()
    counts = marker_counts(dm.train_windows[i] for i in range(len(dm.train_windows)))
    counts.update(marker_counts(dm.val_windows[i] for i in range(len(dm.val_windows))))
    assert set(counts) == {f"doc{i}" for i in range(30)}  # every good document kept

    # Streaming: each shard counts the bad lines it owns and logs them at the end of its pass.
    stream = module(qwen, [bad], on_bad_line="skip", val_fraction=0.3, streaming=True)
    stream.setup()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lightning_moe.tokenized"):
        for shard in range(2):
            list(stream.streaming_windows().shard_windows(shard, 2))
    logged = [r.getMessage() for r in caplog.records if r.name == "lightning_moe.tokenized"]
    total = sum(int(message.split()[1]) for message in logged)
    in_train = [not is_validation_document(str(bad), line, val_fraction=0.3, seed=0) for line in (11, 12, 13)]
    assert total == sum(in_train) and all("of the train data, shard" in m for m in logged)


def test_argument_errors_name_the_field(tmp_path, qwen):
    data = write_jsonl(tmp_path / "d.jsonl", text_docs(4))
    with pytest.raises(ValueError, match="`on_bad_line` must be 'error' or 'skip'"):
        module(qwen, [data], on_bad_line="ignore")
    with pytest.raises(ValueError, match="`samples_per_epoch` .* applies to streaming=True"):
        module(qwen, [data], samples_per_epoch=8)
    with pytest.raises(ValueError, match="`tokenizer` .* is not a directory"):
        module(tmp_path / "missing", [data])
    weights_only = tmp_path / "weights-only"  # a checkpoint copied without its tokenizer files
    weights_only.mkdir()
    (weights_only / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 64}))
    with pytest.raises(ValueError, match="`tokenizer` .* holds no tokenizer files"):
        module(weights_only, [data])
    with pytest.raises(ValueError, match="`val_fraction` must lie strictly between 0 and 1"):
        module(qwen, [data], val_fraction=0.0)


# --- training -----------------------------------------------------------------------------------

TINY_MODEL = dict(d_model=32, n_layers=2, n_heads=2, d_ff=64, num_experts=4, top_k=2, max_seq_len=32, warmup_steps=1)


def chat_file(path: Path, count: int) -> Path:
    records = []
    for index in range(count):
        turns = [
            {"role": "user", "content": f"what is doc{index}"},
            {"role": "assistant", "content": f"it is doc{index}"},
        ]
        records.append({"messages": turns} if index % 4 else {"text": f"the cat sat on the mat doc{index}"})
    return write_jsonl(path, records)


def test_lightning_moe_fit_on_a_chat_file_from_yaml(tmp_path, qwen):
    from lightning_moe import MoETransformer, cli

    data = chat_file(tmp_path / "chat.jsonl", 40)
    config = tmp_path / "finetune.yaml"
    config.write_text(
        "model:\n"
        "  class_path: lightning_moe.MoETransformer\n"
        f"  init_args: {json.dumps({**TINY_MODEL, 'learning_rate': 3e-3})}\n"
        "data:\n"
        "  class_path: lightning_moe.TokenizedDataModule\n"
        "  init_args:\n"
        f"    tokenizer: {qwen}\n"
        f"    train_files: [{data}]\n"
        "    val_fraction: 0.2\n"
        "    seq_len: 32\n"
        "    batch_size: 4\n"
        "trainer:\n"
        "  max_steps: 12\n"
        "  accelerator: cpu\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
        "  num_sanity_val_steps: 0\n"
        f"  default_root_dir: {tmp_path}\n"
    )
    run = cli.main(["fit", "--config", str(config)])
    model, trainer = run.model, run.trainer
    assert isinstance(model, MoETransformer) and isinstance(run.datamodule, TokenizedDataModule)
    assert model.hparams.vocab_size == run.datamodule.vocab_size == len(SPECIALS + WORDS)  # linked from the data
    assert trainer.global_step == 12
    val_loss = float(trainer.callback_metrics["val_loss"])
    assert np.isfinite(val_loss) and val_loss < np.log(len(SPECIALS + WORDS))  # learnt something in 12 steps


class RecordBatches:
    """A callback that keeps the inputs of every training batch."""

    def __new__(cls):
        import lightning as L

        class _Recorder(L.Callback):
            def __init__(self) -> None:
                self.inputs: list[torch.Tensor] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self.inputs.append(batch[0].clone())

        return _Recorder()


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streaming"])
def test_resuming_a_checkpoint_sees_the_uninterrupted_batches(tmp_path, qwen, streaming, monkeypatch):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_moe import MoETransformer

    monkeypatch.chdir(tmp_path)  # a relative path: the same split in every test run
    chat_file(Path("chat.jsonl"), 16)
    extra = dict(streaming=True, samples_per_epoch=10) if streaming else {}

    def fit(max_steps: int, ckpt_path: Path | None = None, save: bool = False):
        dm = TokenizedDataModule(
            tokenizer=str(qwen), train_files=["chat.jsonl"], seq_len=16, batch_size=2, val_fraction=0.25, **extra
        )
        model = MoETransformer(vocab_size=dm.vocab_size, **TINY_MODEL)
        recorder = RecordBatches()
        callbacks = [recorder]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1))
        trainer = L.Trainer(
            max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=save, limit_val_batches=0, callbacks=callbacks,
        )
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return recorder.inputs, trainer

    uninterrupted, trainer = fit(8)
    per_epoch = trainer.num_training_batches
    assert per_epoch == 5  # streaming: 10 windows / 2 per batch; in memory: the 10 windows of this split
    saved, _ = fit(per_epoch, save=True)
    assert all(torch.equal(a, b) for a, b in zip(saved, uninterrupted[:per_epoch], strict=True))
    # Resume mid-epoch (after step 3) and after the last batch of epoch 0.
    for step in (3, per_epoch):
        resumed, _ = fit(8, ckpt_path=tmp_path / "ckpt" / f"epoch=0-step={step}.ckpt")
        assert len(resumed) == 8 - step
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[step:], strict=True))


def test_ddp_ranks_train_on_their_own_documents(tmp_path, qwen):
    """Two real gloo processes (Lightning DDP): each rank trains on its own share, none twice, same steps."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
    from launch import launch

    data = write_jsonl(tmp_path / "d.jsonl", text_docs(120))
    base = dict(tokenizer=str(qwen), train_files=[str(data)], seq_len=16, batch_size=2, val_fraction=0.25)
    scenarios = [
        {"name": "streaming", "data": {**base, "streaming": True, "samples_per_epoch": 16}, "model": TINY_MODEL},
        {"name": "memory", "data": base, "model": TINY_MODEL},
    ]
    (tmp_path / "scenarios.json").write_text(json.dumps(scenarios))
    worker = Path(__file__).resolve().parent / "dist_workers" / "tokenized_worker.py"
    args = [str(tmp_path / "scenarios.json"), str(tmp_path)]
    launch(worker, args, world_size=2, timeout=300, log_dir=tmp_path / "logs")

    validates = [is_validation_document(str(data), i + 1, val_fraction=0.25, seed=0) for i in range(120)]
    train_order = [f"doc{i}" for i in range(120) if not validates[i]]
    for name in ("streaming", "memory"):
        ranks = [json.loads((tmp_path / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1)]
        assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
        seen = [marker_counts([(None, torch.tensor(rank["targets"]))]) for rank in ranks]
        assert set(seen[0]).isdisjoint(seen[1]) and all(count == 1 for counts in seen for count in counts.values())
        assert set(seen[0]) | set(seen[1]) <= set(train_order)
        if name == "streaming":  # 4 batches per rank; rank r reads the documents r, r + 2, ... of the split
            assert ranks[0]["global_step"] == 4
            for rank in (0, 1):
                assert {train_order.index(marker) % 2 for marker in seen[rank]} == {rank}
        else:  # a shuffled half of the windows each (the last odd window dropped)
            assert len(set(seen[0]) | set(seen[1])) >= 0.8 * len(train_order)
