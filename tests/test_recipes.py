"""Every fine-tuning recipe runs through ``lightning-moe fit`` as written, on a tiny checkpoint of its
family that carries its own tokenizer and chat template (the paths and sizes overridden on the command
line, as the recipes' headers tell users to do; one process, EP 1, a few steps). The pre-training
recipe builds the model its header describes, and trains it shrunk on 2 processes at EP 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import hf_config, randomize
from test_tokenized_data import SPECIALS, WORDS, chat_file, make_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_workers"))
from launch import clean_env  # noqa: E402

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
    # The README's next command: `lightning-moe export` of that checkpoint, which transformers loads with
    # the fine-tuned model's logits.
    assert main(["export", str(saved), str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    input_ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids).logits, restored.eval()(input_ids), rtol=1e-4, atol=1e-4)


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


def recipe_model(recipe: str) -> tuple[dict, MoETransformer]:
    """The recipe's model section and the model it builds, full size on the meta device (32k vocabulary)."""
    import yaml

    arguments = yaml.safe_load((RECIPES / recipe).read_text())["model"]["init_args"]
    with torch.device("meta"):
        return arguments, MoETransformer(vocab_size=32000, **arguments)


def test_pretraining_recipe_builds_the_model_its_header_describes():
    """The header's sizes (1.7B parameters, 0.31B active per token) are the model the recipe builds."""
    from lightning_moe import MoELayer

    arguments, model = recipe_model("pretrain.yaml")
    layers = [module for module in model.modules() if isinstance(module, MoELayer)]
    assert len(layers) == arguments["n_layers"] - arguments["first_k_dense"] == 15
    total = sum(p.numel() for p in model.parameters())
    per_expert = sum(p.numel() for p in layers[0].experts.parameters()) // arguments["num_experts"]
    active = total - len(layers) * (arguments["num_experts"] - arguments["top_k"]) * per_expert
    assert round(total / 1e9, 1) == 1.7 and round(active / 1e9, 2) == 0.31
    assert {type(layer.gate).__name__ for layer in layers} == {"SigmoidGate"}
    assert all(layer.gate.top_k == 6 and layer.shared_experts is not None for layer in layers)


def test_pretraining_recipe_trains_from_scratch_on_two_processes(tmp_path):
    """`lightning-moe fit --config recipes/pretrain.yaml` as the header says, shortened and shrunk, on 2
    CPU processes with Lightning starting the second: streamed text, expert parallelism 2 with a spare
    slot, gradient checkpointing, the monitor and the migration callback, a checkpoint that loads."""
    import yaml

    tokenizer = make_tokenizer(tmp_path / "tokenizer", family="llama")
    data = tmp_path / "pretrain"
    data.mkdir()
    for part in range(2):
        lines = (json.dumps({"text": " ".join(WORDS[(part + i + j) % len(WORDS)] for j in range(24))}) for i in range(40))
        (data / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": " ".join(WORDS * 2)}) + "\n")
    recipe = yaml.safe_load((RECIPES / "pretrain.yaml").read_text())
    callbacks = {entry["class_path"].rsplit(".", 1)[1]: entry for entry in recipe["trainer"]["callbacks"]}
    for name in ("ExpertLoadMonitor", "ExpertMigration"):  # the recipe as written, with shorter windows
        callbacks[name]["init_args"]["every_n_steps"] = 3
    callbacks["ModelCheckpoint"]["init_args"]["every_n_train_steps"] = 3
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    logs = tmp_path / "logs"
    command = [
        sys.executable, "-m", "lightning_moe", "fit", "--config", str(tmp_path / "recipe.yaml"),
        "--data.init_args.tokenizer", str(tokenizer),
        "--data.init_args.train_files", json.dumps([str(data / "*.jsonl")]),
        "--data.init_args.val_files", json.dumps([str(tmp_path / "val.jsonl")]),
        "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "2",
        "--data.init_args.samples_per_epoch", "28",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
        "--trainer.strategy.init_args.expert_parallel_size", "2",
        "--trainer.max_steps", "7", "--trainer.val_check_interval", "7", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(logs),
        "--trainer.logger.init_args.save_dir", str(logs),
        "--model.init_args.d_model", "32", "--model.init_args.n_layers", "2", "--model.init_args.n_heads", "4",
        "--model.init_args.n_kv_heads", "2", "--model.init_args.d_ff", "64", "--model.init_args.moe_d_ff", "16",
        "--model.init_args.max_seq_len", "16", "--model.init_args.warmup_steps", "2",
    ]
    done = subprocess.run(command, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = logs.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file.parent), size_guidance={"scalars": 0})
    events.Reload()
    # Re-planned at the start of the batch after steps 3 and 6 (nothing is left to train after step 7).
    assert [e.step for e in events.Scalars("moe/migration/measured_step_seconds")] == [3, 6]
    assert torch.isfinite(torch.tensor(events.Scalars("val_loss")[-1].value))
    (saved,) = logs.rglob("last.ckpt")
    restored = MoETransformer.load_from_checkpoint(saved)
    assert restored.hparams.num_experts == 64 and restored.hparams.vocab_size == VOCAB
    assert all(torch.isfinite(p).all() for p in restored.parameters())
