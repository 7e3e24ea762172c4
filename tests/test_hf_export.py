"""``lightning-moe export CKPT OUT``: a fine-tuned model's Lightning checkpoint, a single file (bf16-mixed,
frozen attention) or an MoEStrategy directory written by 2 expert-parallel processes, becomes a
transformers directory that ``AutoModelForCausalLM`` loads with the model's logits, tokenizer included."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hf_tiny import VOCAB, hf_logits, save_tiny, token_ids
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_moe.checkpoint import committed_directory
from lightning_moe import MoETransformer
from lightning_moe.cli import main


def _loader(seed: int = 0, samples: int = 16) -> DataLoader:
    tokens = torch.randint(0, VOCAB, (samples, 9), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["mixture of experts", "experts route tokens"] * 8,
                                  trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)


def test_export_a_fine_tuned_single_file_checkpoint(tmp_path):
    source, original = save_tiny("qwen2_moe", tmp_path / "source")
    _save_tokenizer(source)
    model = MoETransformer.from_pretrained(source, learning_rate=1e-2, warmup_steps=0, lr_schedule="constant",
                                           freeze=["*.attn.*"], load_balance_coef=0.01)
    trainer = _trainer(precision="bf16-mixed")
    trainer.fit(model, _loader())
    checkpoint = tmp_path / "fine-tuned.ckpt"
    trainer.save_checkpoint(checkpoint)

    assert main(["export", str(checkpoint), str(tmp_path / "out")]) == 0

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(exported, ids), model.eval()(ids), atol=1e-5, rtol=1e-5)
    # Fine-tuning changed the experts and left the frozen attention alone.
    layer, trained = original.model.layers[1], exported.model.layers[1]
    assert not torch.equal(trained.mlp.experts.gate_up_proj, layer.mlp.experts.gate_up_proj)
    assert torch.equal(trained.self_attn.q_proj.weight, layer.self_attn.q_proj.weight)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("experts route")["input_ids"] == AutoTokenizer.from_pretrained(source)("experts route")["input_ids"]


def test_export_writes_the_requested_dtype_and_shards(tmp_path):
    source, _ = save_tiny("mixtral", tmp_path / "source")
    model = MoETransformer.from_pretrained(source)
    trainer = _trainer()
    trainer.fit(model, _loader())
    checkpoint = tmp_path / "model.ckpt"
    trainer.save_checkpoint(checkpoint)
    main(["export", str(checkpoint), str(tmp_path / "out"), "--dtype", "bfloat16", "--max-shard-size", "20KB"])
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert exported.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(exported.lm_head.weight.float(), model.lm_head.weight, atol=1e-2, rtol=1e-2)


def test_save_pretrained_refuses_experts_out_of_logical_order(tmp_path):
    """Rows held in a dispatcher's slot order other than the logical one route right, but a transformers
    checkpoint stores expert e at index e: writing the rows as they are would permute the experts."""
    from lightning_moe.layers.dispatch import LocalDispatcher

    source, reference = save_tiny("mixtral", tmp_path / "source")
    model = MoETransformer.from_pretrained(source).eval()
    layer = model.blocks[0].ffn
    expert_of_slot = [2, 0, 3, 1]
    with torch.no_grad():
        for parameter in (layer.experts.w_in, layer.experts.w_out):
            parameter.copy_(parameter[expert_of_slot])
    layer.dispatcher = LocalDispatcher(4, slot_of_expert_E=torch.argsort(torch.tensor(expert_of_slot)))
    ids = token_ids()
    with torch.no_grad():  # the model still computes the checkpoint's logits
        torch.testing.assert_close(model(ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"`blocks.0.ffn` hold the logical experts \[2, 0, 3, 1\].*permuted"):
        model.save_pretrained(tmp_path / "out")


def worker(source: Path, out: Path) -> None:
    """One of two ranks: fine-tune with experts split over EP 2, save a checkpoint directory."""
    from lightning_moe import MoEStrategy

    model = MoETransformer.from_pretrained(source, learning_rate=1e-2, warmup_steps=0)
    trainer = _trainer(strategy=MoEStrategy(expert_parallel_size=2), devices=2, use_distributed_sampler=False)
    trainer.fit(model, _loader(seed=trainer.global_rank))  # each rank its own batches
    trainer.save_checkpoint(out / "ep2.ckpt")


def test_export_an_expert_parallel_checkpoint_directory(tmp_path):
    from dist_workers.launch import launch

    source, original = save_tiny("deepseek_v3", tmp_path / "source")
    launch(Path(__file__), [str(source), str(tmp_path)], world_size=2, timeout=120, log_dir=tmp_path / "logs")
    directory = tmp_path / "ep2.ckpt"
    assert directory.is_dir() and (Path(committed_directory(directory)) / "experts-ep00001.pt").is_file()

    assert main(["export", str(directory), str(tmp_path / "out")]) == 0

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    main(["consolidate", str(directory), str(tmp_path / "one.ckpt")])
    reference = MoETransformer.load_from_checkpoint(tmp_path / "one.ckpt", weights_only=True).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(exported, ids), reference(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(hf_logits(exported, ids), hf_logits(original, ids))  # it was trained
    # Both EP ranks' trained experts made it (rank 0 holds experts 0-3, rank 1 experts 4-7).
    changed = [not torch.equal(exported.model.layers[1].mlp.experts.gate_up_proj[expert],
                               original.model.layers[1].mlp.experts.gate_up_proj[expert]) for expert in range(8)]
    assert any(changed[:4]) and any(changed[4:]), changed


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dist_workers.launch import end_rank

    worker(Path(sys.argv[1]), Path(sys.argv[2]))
    end_rank()
