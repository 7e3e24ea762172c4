"""``MoETransformer(pretrained=DIR)``: the YAML way to fine-tune a transformers checkpoint. The
architecture comes from the checkpoint, the model is built on the meta device, and the weights are
read when training starts (here under Lightning's single-device strategy, in ``configure_model``)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hf_tiny import VOCAB, hf_logits, save_tiny, token_ids
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoETransformer


def test_weights_are_read_in_configure_model_and_match_transformers(tmp_path):
    source, reference = save_tiny("qwen2_moe", tmp_path / "source")
    model = MoETransformer(pretrained=str(source), learning_rate=1e-9, warmup_steps=1, weight_decay=0.0)
    assert all(p.is_meta for p in model.parameters())
    assert model.hparams.hf_config["model_type"] == "qwen2_moe" and "pretrained" not in model.hparams
    data = TensorDataset(torch.randint(0, VOCAB, (4, 8)), torch.randint(0, VOCAB, (4, 8)))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=2))
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():  # one step at a learning rate of 1e-9: still the checkpoint's weights
        torch.testing.assert_close(model.eval()(token_ids()), hf_logits(reference, token_ids()), atol=1e-4, rtol=1e-4)


def test_an_architecture_argument_that_disagrees_is_refused(tmp_path):
    source, _ = save_tiny("mixtral", tmp_path / "source")
    with pytest.raises(ValueError, match=r"`d_model`=64 differs from the checkpoint's 32 .* leave `d_model` out"):
        MoETransformer(pretrained=str(source), d_model=64)
    model = MoETransformer(pretrained=str(source), max_seq_len=32, learning_rate=3e-4)  # fine-tuning options
    assert model.hparams.max_seq_len == 32 and model.hparams.learning_rate == 3e-4
