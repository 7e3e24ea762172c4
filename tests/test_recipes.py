"""Every fine-tuning recipe runs through ``lightning-moe fit`` as written, on a tiny checkpoint of its
family that carries its own tokenizer and chat template (the paths and sizes overridden on the command
line, as the recipes' headers tell users to do; one process, EP 1, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_tiny import hf_config, randomize
from test_tokenized_data import SPECIALS, WORDS, chat_file, make_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_moe import MoETransformer
from lightning_moe.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


VOCAB = len(SPECIALS + WORDS)


def tiny_checkpoint(directory: Path, variant: str) -> Path:
    """A random transformers model of ``variant`` whose vocabulary is the test tokenizer's, saved with it."""
    config = hf_config(variant)
    config.vocab_size = VOCAB
    randomize(AutoModelForCausalLM.from_config(config)).save_pretrained(directory)
    return make_tokenizer(directory, family="llama" if variant == "llama" else "qwen")


def small_run(tmp_path: Path, checkpoint: Path, data: Path) -> list[str]:
    return [
        "--model.init_args.pretrained", str(checkpoint),
        "--data.init_args.tokenizer", str(checkpoint),
        "--data.init_args.train_files", json.dumps([str(data)]),
        "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "2", "--data.init_args.val_fraction", "0.25",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
        "--trainer.strategy.init_args.expert_parallel_size", "1",
        "--trainer.strategy.init_args.spare_expert_slots", "0",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.accumulate_grad_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
    ]


@pytest.mark.parametrize(("recipe", "variant"), [
    ("finetune_mixtral.yaml", "mixtral"),
    ("finetune_qwen_moe.yaml", "qwen3_moe"),
    ("finetune_deepseek.yaml", "deepseek_v3"),
])
def test_finetuning_recipe_runs_on_a_tiny_checkpoint(tmp_path, recipe, variant):
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint", variant)
    data = chat_file(tmp_path / "chat.jsonl", 24)
    run = main(["fit", "--config", str(RECIPES / recipe), *small_run(tmp_path, checkpoint, data)])
    model, trainer = run.model, run.trainer
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val_loss"])
    assert model.hparams.hf_config["model_type"] == hf_config(variant).model_type
    assert not any(p.is_meta for p in model.parameters())  # read when training started
    if recipe == "finetune_mixtral.yaml":  # the router stays frozen
        assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("ffn.gate.weight"))
    if recipe == "finetune_qwen_moe.yaml":  # Qwen3's global-batch balancing reaches every gate
        scopes = {layer.gate.load_balance_scope for layer in model.modules() if hasattr(layer, "gate")}
        assert scopes == {"global"}
    # The saved checkpoint rebuilds the model without the source directory or `pretrained`.
    (saved,) = (tmp_path / "logs").rglob("last.ckpt")
    restored = MoETransformer.load_from_checkpoint(saved)
    assert "pretrained" not in restored.hparams and restored.hparams.hf_source == str(checkpoint.resolve())


def test_upcycling_recipe_continues_pretraining_an_upcycled_llama(tmp_path):
    dense = tmp_path / "dense"
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=32,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    randomize(AutoModelForCausalLM.from_config(config)).save_pretrained(dense)
    make_tokenizer(dense, family="llama")
    upcycled = tmp_path / "upcycled"
    assert main(["upcycle", str(dense), str(upcycled), "--num-experts", "4", "--top-k", "2", "--method", "copy"]) == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(24):  # a .txt file is one document: the split needs several
        (corpus / f"part{index}.txt").write_text(" ".join(f"the cat sat on the mat doc{index + i}" for i in range(8)))
    run = main(["fit", "--config", str(RECIPES / "upcycle_llama.yaml"),
                *small_run(tmp_path, upcycled, corpus / "*.txt"), "--data.init_args.samples_per_epoch", "8"])
    assert run.trainer.global_step == 2 and torch.isfinite(run.trainer.callback_metrics["val_loss"])
    assert run.model.hparams.num_experts == 4
