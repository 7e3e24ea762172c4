"""``lightning-moe upcycle``: dense Llama/Qwen2 checkpoints to Mixtral/Qwen2-MoE that transformers loads.

Every check loads the output with ``AutoModelForCausalLM.from_pretrained`` and compares logits with
the dense model's: ``copy`` with top-2 routing and ``split`` with every expert active must give
the dense logits (fp32, to 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402

from lightning_moe import MoETransformer, cli  # noqa: E402
from lightning_moe.interop.neuron_partition import (  # noqa: E402
    balanced_assignment,
    clustered_partition,
    random_partition,
)
from lightning_moe.interop.upcycle import upcycle  # noqa: E402

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
MOE_CLASS = {"llama": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM"}


def save_dense(directory: Path, family: str, **save_kwargs) -> torch.nn.Module:
    """A random dense model (with random norms and biases, so that each one matters) and a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, rope_parameters=LLAMA3_ROPE))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.2)
            else:
                parameter.normal_(0.0, 0.15)
    model.save_pretrained(directory, **save_kwargs)
    if family == "qwen2":
        # An older config.json form: a top-level rope_theta instead of rope_parameters.
        config = json.loads((directory / "config.json").read_text())
        config.pop("rope_parameters", None)
        config["rope_theta"] = 123456.0
        (directory / "config.json").write_text(json.dumps(config))
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    vocab = {f"w{i}": i for i in range(SIZES["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def dense(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, save_dense(directory, request.param)


TOKENS = torch.tensor([[1, 5, 9, 33, 2, 60, 17, 4, 8, 41, 12, 3], [7, 7, 20, 50, 63, 0, 11, 29, 30, 2, 9, 13]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def run_upcycle(dense_dir: Path, out: Path, *args: str) -> torch.nn.Module:
    assert cli.main(["upcycle", str(dense_dir), str(out), *args]) == 0
    return transformers.AutoModelForCausalLM.from_pretrained(out).eval()


def test_copy_gives_the_dense_logits_with_top_2_routing(dense, tmp_path):
    family, dense_dir, dense_model = dense
    moe = run_upcycle(dense_dir, tmp_path / "moe", "--num-experts", "8", "--top-k", "2", "--method", "copy")
    assert type(moe).__name__ == MOE_CLASS[family]
    assert moe.config.num_experts_per_tok == 2 and moe.config.rope_parameters == dense_model.config.rope_parameters
    torch.testing.assert_close(logits(moe), logits(dense_model), atol=1e-5, rtol=1e-5)
    # The router starts random (std = initializer_range), so tokens spread over the experts.
    router = moe.model.layers[0].mlp.gate.weight.detach()
    assert router.shape == (8, 32) and 0.01 < float(router.std()) < 0.04
    hidden = moe.model.embed_tokens(TOKENS).flatten(0, 1)
    assert len(set(torch.topk(hidden @ router.T, 2).indices[:, 0].tolist())) > 2
    # Tokenizer files travel with the weights.
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "moe").convert_tokens_to_ids("w5") == 5
    # Fine-tuning starts from it: MoETransformer reads it (Llama 3's RoPE scaling; Qwen2-MoE's empty
    # shared expert) with the same logits, and writes it back in the same family.
    ours = MoETransformer.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), logits(dense_model), atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "again")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    assert type(again).__name__ == MOE_CLASS[family]
    torch.testing.assert_close(logits(again), logits(dense_model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("partition", ["random", "clustered"])
def test_split_with_every_expert_active_gives_the_dense_logits(dense, tmp_path, partition):
    family, dense_dir, dense_model = dense
    args = ["--num-experts", "4", "--method", "split", "--partition", partition]
    moe = run_upcycle(dense_dir, tmp_path / "all", *args, "--top-k", "4")
    assert moe.config.num_experts_per_tok == 4
    torch.testing.assert_close(logits(moe), logits(dense_model), atol=1e-5, rtol=1e-5)
    # The check can fail: with two of the four experts per token the layer is no longer the dense FFN.
    sparse = run_upcycle(dense_dir, tmp_path / "top2", *args, "--top-k", "2")
    assert (logits(sparse) - logits(dense_model)).abs().max() > 1e-2


def expert_groups(
    out: Path, family: str, dense_model: torch.nn.Module, layer: int, num_experts: int
) -> list[list[int]]:
    """Recover each expert's neurons by matching its gate rows to the dense gate_proj rows."""
    name = "block_sparse_moe.experts.{}.w1" if family == "llama" else "mlp.experts.{}.gate_proj"
    dense_gate = dense_model.model.layers[layer].mlp.gate_proj.weight
    groups = []
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        for expert in range(num_experts):
            rows = handle.get_tensor(f"model.layers.{layer}.{name.format(expert)}.weight")
            matches = (rows[:, None, :] == dense_gate[None, :, :]).all(-1)  # [M, I]
            assert (matches.sum(1) == 1).all()
            groups.append(matches.int().argmax(1).tolist())
    return groups


def test_split_partitions_cover_every_neuron_once_in_equal_experts(dense, tmp_path):
    family, dense_dir, dense_model = dense
    partitions = {}
    for name, partition, seed in (("random", "random", 0), ("clustered", "clustered", 0), ("again", "clustered", 0)):
        out = tmp_path / name
        upcycle(dense_dir, out, num_experts=4, top_k=2, method="split", partition=partition, seed=seed)
        groups = expert_groups(out, family, dense_model, layer=1, num_experts=4)
        assert [len(group) for group in groups] == [16] * 4
        assert sorted(neuron for group in groups for neuron in group) == list(range(64))
        partitions[name] = [sorted(group) for group in groups]
    assert partitions["clustered"] == partitions["again"]  # deterministic for a seed
    assert partitions["clustered"] != partitions["random"]


def test_sharded_dense_input_and_sharded_output(tmp_path):
    dense_model = save_dense(tmp_path / "dense", "llama", max_shard_size="40KB")
    assert (tmp_path / "dense" / "model.safetensors.index.json").exists()
    upcycle(tmp_path / "dense", tmp_path / "moe", num_experts=4, top_k=2, method="copy", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    torch.testing.assert_close(logits(moe), logits(dense_model), atol=1e-5, rtol=1e-5)


# --- partitions ---------------------------------------------------------------------------------


def test_clustered_partition_recovers_planted_clusters_and_random_does_not():
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    labels = torch.randperm(64, generator=generator) % 4  # 16 neurons per direction, shuffled
    features = directions[labels] + 0.05 * torch.randn(64, 16, generator=generator)
    planted = sorted(sorted(torch.nonzero(labels == c).squeeze(1).tolist()) for c in range(4))
    clustered = clustered_partition(features, 4, torch.Generator().manual_seed(1))
    assert sorted(clustered.tolist()) == planted
    random = random_partition(64, 4, torch.Generator().manual_seed(1))
    assert sorted(random.tolist()) != planted and sorted(random.flatten().tolist()) == list(range(64))


def test_balanced_assignment_fills_every_column_exactly():
    scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [0.0, 1.0]])  # three rows want column 0
    assignment = balanced_assignment(scores, capacity=2)
    assert assignment.tolist() == [0, 0, 1, 1]  # the weakest claim on column 0 moves
    many = balanced_assignment(torch.randn(120, 6, generator=torch.Generator().manual_seed(0)), capacity=20)
    assert torch.bincount(many, minlength=6).tolist() == [20] * 6


# --- errors -------------------------------------------------------------------------------------


def upcycle_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["upcycle", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_clear_errors(tmp_path, capsys):
    dense_dir = tmp_path / "llama"
    save_dense(dense_dir, "llama")
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing")
    assert "is not a directory" in upcycle_error(capsys, missing, out, "--num-experts", "8", "--top-k", "2")
    message = upcycle_error(capsys, str(dense_dir), out, "--num-experts", "6", "--top-k", "2", "--method", "split")
    assert "needs --num-experts to divide the FFN width (intermediate_size 64); 6 does not" in message
    assert "--top-k must lie in [1, --num-experts = 4]" in upcycle_error(
        capsys, str(dense_dir), out, "--num-experts", "4", "--top-k", "5"
    )
    assert "--partition applies to --method split" in upcycle_error(
        capsys, str(dense_dir), out, "--num-experts", "4", "--top-k", "2", "--partition", "clustered"
    )
    gpt2 = tmp_path / "gpt2"
    gpt2_config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    transformers.GPT2LMHeadModel(gpt2_config).save_pretrained(gpt2)
    message = upcycle_error(capsys, str(gpt2), out, "--num-experts", "4", "--top-k", "2")
    assert "holds a 'gpt2' model; upcycling supports dense llama (to Mixtral) and qwen2 (to Qwen2-MoE)" in message
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    message = upcycle_error(capsys, str(dense_dir), str(tmp_path / "full"), "--num-experts", "4", "--top-k", "2")
    assert "exists and is not an empty directory" in message
    biased = tmp_path / "biased"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, attention_bias=True)).save_pretrained(biased)
    message = upcycle_error(capsys, str(biased), out, "--num-experts", "4", "--top-k", "2")
    assert "sets `attention_bias: true`" in message
