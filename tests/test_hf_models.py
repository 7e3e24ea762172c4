"""Whole transformers models in and out: ``MoETransformer.from_pretrained`` of tiny random Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3 checkpoints gives transformers' logits (fp32), and
``save_pretrained`` writes a directory that ``AutoModelForCausalLM.from_pretrained`` loads with the
same logits; sharded checkpoints, dtypes, models trained from scratch, and the errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_tiny import VARIANTS, hf_config, hf_logits, randomize, save_tiny, token_ids
from transformers import AutoModelForCausalLM

from lightning_moe import MoETransformer
from lightning_moe.layers.gates import SigmoidGate, TopKGate

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every variant saved once: name -> (directory, transformers model)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny(name, root / name) for name in VARIANTS}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_from_pretrained_gives_transformers_logits(checkpoints, variant):
    directory, reference = checkpoints[variant]
    model = MoETransformer.from_pretrained(directory).eval()
    ids = token_ids()
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 11, 64)
    torch.testing.assert_close(logits, hf_logits(reference, ids), **TOLERANCE)
    # Routing is not trivial: every MoE layer used several experts.
    for block in model.blocks:
        if block.is_moe:
            assert int((block.ffn.tokens_per_expert > 0).sum()) >= 3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_pretrained_loads_in_transformers_with_the_same_logits(checkpoints, tmp_path, variant):
    directory, reference = checkpoints[variant]
    model = MoETransformer.from_pretrained(directory).eval()
    model.save_pretrained(tmp_path / "out")
    exported, loading_info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not loading_info["missing_keys"] and not loading_info["unexpected_keys"]
    exported.eval()
    ids = token_ids(seed=4)
    torch.testing.assert_close(hf_logits(exported, ids), hf_logits(reference, ids), **TOLERANCE)
    # config.json keeps the source's fields (what transformers reads back is the same architecture).
    source, written = (json.loads((d / "config.json").read_text()) for d in (directory, tmp_path / "out"))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "rms_norm_eps", "model_type"):
        assert written[key] == source[key], key


def test_family_features_map_onto_the_options(checkpoints):
    """What each family turns into (the docs' table)."""
    mixtral = MoETransformer.from_pretrained(checkpoints["mixtral"][0])
    gate = mixtral.blocks[0].ffn.gate
    assert isinstance(gate, TopKGate) and gate.normalize and gate.load_balance_coef == 0.0
    assert mixtral.hparams.norm_eps == 1e-5 and mixtral.hparams.rope_theta == 1e6

    qwen2 = MoETransformer.from_pretrained(checkpoints["qwen2_moe"][0])
    assert qwen2.moe_layout == [False, True] and qwen2.blocks[1].ffn.shared_expert_gate is not None
    assert qwen2.blocks[0].attn.q_proj.bias is not None and qwen2.blocks[0].attn.out_proj.bias is None
    sparse = MoETransformer.from_pretrained(checkpoints["qwen2_moe_sparse_step"][0])
    assert sparse.moe_layout == [False, True, False] and sparse.blocks[0].attn.q_proj.bias is None

    qwen3 = MoETransformer.from_pretrained(checkpoints["qwen3_moe"][0])
    assert qwen3.blocks[0].attn.qk_norm == "head" and qwen3.blocks[0].attn.head_dim == 16  # not 32 / 4
    tied = MoETransformer.from_pretrained(checkpoints["qwen3_moe_bias_tied"][0])
    assert tied.lm_head.weight is tied.embed.weight and tied.blocks[0].attn.out_proj.bias is not None

    olmoe = MoETransformer.from_pretrained(checkpoints["olmoe"][0])
    assert olmoe.blocks[0].attn.q_norm.weight.shape == (32,) and olmoe.blocks[0].attn.k_norm.weight.shape == (16,)

    deepseek = MoETransformer.from_pretrained(checkpoints["deepseek_v3"][0])
    assert deepseek.moe_layout == [False, True]
    gate = deepseek.blocks[1].ffn.gate
    assert isinstance(gate, SigmoidGate)
    assert (gate.top_k, gate.n_group, gate.topk_group, gate.routed_scaling_factor) == (2, 4, 2, 2.5)
    assert gate.bias_update_rate == 0.0 and gate.expert_bias.abs().sum() > 0
    assert deepseek.blocks[1].ffn.shared_experts.w_out.in_features == 2 * 16
    attention = deepseek.blocks[0].attn
    assert (attention.kv_lora_rank, attention.q_lora_rank, attention.v_head_dim) == (16, 16, 12)
    yarn = MoETransformer.from_pretrained(checkpoints["deepseek_v3_yarn"][0])
    assert yarn.hparams.rope_scaling["rope_type"] == "yarn"
    # DeepSeek's YaRN: mscale(4, 1)^2 = (0.1 ln 4 + 1)^2 on the softmax scale 1/sqrt(16).
    assert yarn.blocks[0].attn.softmax_scale == pytest.approx((0.1 * torch.log(torch.tensor(4.0)).item() + 1) ** 2 / 4)


def test_overrides_reach_the_model(checkpoints):
    directory = checkpoints["deepseek_v3"][0]
    model = MoETransformer.from_pretrained(
        directory, learning_rate=3e-4, max_seq_len=32, gate_kwargs={"bias_update_rate": 1e-3}, load_balance_coef=0.01
    )
    gate = model.blocks[1].ffn.gate
    assert model.hparams.learning_rate == 3e-4 and model.max_seq_len == 32
    assert gate.bias_update_rate == 1e-3 and gate.n_group == 4 and gate.load_balance_coef == 0.01
    assert model.hparams.hf_config["model_type"] == "deepseek_v3"
    with pytest.raises(ValueError, match="max_seq_len"):
        MoETransformer.from_pretrained(directory, max_seq_len=65)
    with pytest.raises(ValueError, match="no_such_argument"):
        MoETransformer.from_pretrained(directory, gate_kwargs={"no_such_argument": 1})


def test_sharded_checkpoint_with_an_index(tmp_path):
    directory, reference = save_tiny("qwen2_moe", tmp_path / "sharded", max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").is_file() and len(list(directory.glob("model-*"))) > 2
    model = MoETransformer.from_pretrained(directory).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(reference, ids), **TOLERANCE)
    model.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(exported, ids), hf_logits(reference, ids), **TOLERANCE)


def test_bf16_load_keeps_the_correction_bias_fp32_and_exports_bf16(checkpoints, tmp_path):
    model = MoETransformer.from_pretrained(checkpoints["deepseek_v3"][0], dtype="bfloat16")
    assert model.blocks[1].ffn.experts.w_in.dtype == torch.bfloat16
    assert model.blocks[1].ffn.gate.expert_bias.dtype == torch.float32
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert exported.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert exported.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize(
    "options, family",
    [
        (dict(), "mixtral"),
        # YaRN needs head_dim in config.json (transformers' Mixtral leaves a missing one None).
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}), "mixtral"),
        (dict(num_shared_experts=1, shared_expert_gate=True, first_k_dense=1, attention_bias=True), "qwen2_moe"),
        (dict(qk_norm="head", head_dim=16, moe_d_ff=8), "qwen3_moe"),
        (dict(qk_norm="full", gate_kwargs={"normalize": False}), "olmoe"),
        (dict(gate="sigmoid", kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
              num_shared_experts=1, first_k_dense=1, rope_interleave=True, norm_eps=1e-2), "deepseek_v3"),
    ],
)
def test_a_model_trained_from_scratch_exports_as_the_closest_family(tmp_path, options, family):
    torch.manual_seed(0)
    model = MoETransformer(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2 if "kv_lora_rank" not in
                           options else None, d_ff=16, max_seq_len=32, num_experts=4, top_k=2, **options).eval()
    with torch.no_grad():  # away from zero, so that every weight matters
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(exported, ids), model(ids), **TOLERANCE)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(gate="sigmoid"), "multi-head latent attention"),
        (dict(gate_kwargs={"normalize": False}), "normalize=False"),
        (dict(num_shared_experts=1), "shared experts"),
        (dict(first_k_dense=1), "dense blocks"),
        (dict(activation="gelu"), "activation='gelu'"),
        (dict(gate="expert_choice"), "ExpertChoiceGate"),
        (dict(gate="sigmoid", kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
              gate_kwargs={"n_group": 2, "topk_group": 1, "dropped_group_fill": 0.0}),
         r"dropped_group_fill=0.0 \(the installed transformers fills dropped groups with -inf\)"),
    ],
)
def test_export_names_what_the_family_cannot_express(tmp_path, options, message):
    model = MoETransformer(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=16, max_seq_len=32, num_experts=4,
                           top_k=2, **options)
    with pytest.raises(ValueError, match=message):
        model.save_pretrained(tmp_path / "out")


def test_unsupported_model_type_is_named(tmp_path):
    directory = tmp_path / "llama"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*mixtral"):
        MoETransformer.from_pretrained(directory)


def test_missing_files_are_named(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        MoETransformer.from_pretrained(tmp_path / "nowhere")
    no_config = tmp_path / "no_config"
    shutil.copytree(checkpoints["mixtral"][0], no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MoETransformer.from_pretrained(no_config)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(checkpoints["mixtral"][0], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        MoETransformer.from_pretrained(no_weights)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"intermediate_size": 24}, r"experts\.0\.w1\.weight` has shape \[16, 32\].*\[24, 32\]"),
        ({"num_hidden_layers": 1}, "holds tensors the model has no place for.*model.layers.1"),
        ({"num_local_experts": 5}, r"gate\.weight` has shape \[4, 32\], but `blocks\.0\.ffn\.gate\.weight` needs \[5, 32\]"),
        ({"tie_word_embeddings": True}, "lm_head.weight"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantized checkpoint"),
    ],
)
def test_config_that_does_not_match_the_weights_is_refused(checkpoints, tmp_path, edit, message):
    directory = tmp_path / "edited"
    shutil.copytree(checkpoints["mixtral"][0], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=message):
        MoETransformer.from_pretrained(directory)


def test_a_tied_checkpoint_that_also_stores_the_head_loads_as_transformers_loads_it(checkpoints, tmp_path):
    """Some exporters write ``lm_head.weight`` next to the embedding it is tied to: the same model. (A
    stored head that differs from the embedding is refused above: tying would lose it.)"""
    def add_head(tensors):
        assert "lm_head.weight" not in tensors
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    _loads_like_transformers_with_more_tensors(checkpoints, "qwen3_moe_bias_tied", tmp_path, add_head)


def _loads_like_transformers_with_more_tensors(checkpoints, variant, tmp_path, add) -> None:
    """A copy of ``variant``'s checkpoint whose tensors ``add`` extends loads with transformers' logits."""
    from safetensors.torch import load_file, save_file

    directory = tmp_path / f"{variant}_more"
    shutil.copytree(checkpoints[variant][0], directory)
    tensors = load_file(directory / "model.safetensors")
    add(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(MoETransformer.from_pretrained(directory).eval()(ids),
                                   hf_logits(checkpoints[variant][1], ids), **TOLERANCE)


def test_stored_rotary_frequencies_are_ignored_as_transformers_ignores_them(checkpoints, tmp_path):
    """Older transformers versions and conversion scripts store each layer's `rotary_emb.inv_freq`; the
    frequencies follow from the config."""
    def add_frequencies(tensors):
        for layer in range(2):
            tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1e6 ** -(torch.arange(0, 8, 2) / 8)

    _loads_like_transformers_with_more_tensors(checkpoints, "mixtral", tmp_path, add_frequencies)


def test_swish_is_read_as_the_silu_it_is(checkpoints, tmp_path):
    """transformers' `hidden_act: "swish"` is SiLU (ACT2FN["swish"])."""
    directory = tmp_path / "swish"
    shutil.copytree(checkpoints["mixtral"][0], directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "hidden_act": "swish"}))
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(MoETransformer.from_pretrained(directory).eval()(ids),
                                   hf_logits(checkpoints["mixtral"][1], ids), **TOLERANCE)


def test_an_architecture_override_that_disagrees_with_the_weights_is_refused(checkpoints):
    with pytest.raises(ValueError, match="`moe_d_ff`=8 differs from the checkpoint's 16"):
        MoETransformer.from_pretrained(checkpoints["mixtral"][0], moe_d_ff=8)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_an_override_of_a_feature_the_family_lacks_is_refused(checkpoints, variant):
    """`rope_interleave=True` fits every weight shape (no load-time check sees it) but rotates other
    feature pairs: it must be refused by both entry points, not give other logits."""
    directory = checkpoints[variant][0]
    message = r"`rope_interleave`=True differs from the checkpoint's False"
    with pytest.raises(ValueError, match=message):
        MoETransformer.from_pretrained(directory, rope_interleave=True)
    with pytest.raises(ValueError, match=message):
        MoETransformer(pretrained=str(directory), rope_interleave=True)
    # An override that describes the same model passes: head_dim=None is d_model // n_heads.
    config = json.loads((directory / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if "kv_lora_rank" not in config:  # multi-head latent attention has its own head widths
        assert MoETransformer.from_pretrained(directory, head_dim=head_dim).head_dim == head_dim


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_config_gives_every_architecture_argument(checkpoints, variant):
    """Every MoETransformer argument that is not a fine-tuning option comes from config.json, so that an
    override of any of them is compared with the checkpoint (a new architecture argument must be added
    to the config translation, or here if it is a fine-tuning option)."""
    from lightning_moe.interop.hf_config import model_kwargs_from_hf_config
    from lightning_moe.modeling.pretrained_io import init_defaults

    finetuning_options = {
        "learning_rate", "weight_decay", "warmup_steps", "min_lr_ratio", "adam_betas", "lr_schedule", "freeze",
        "load_balance_coef", "z_loss_coef", "gradient_checkpointing", "compile_blocks", "capacity_factor",
        "pad_to_capacity", "gate_kwargs", "hf_config", "hf_source", "pretrained",
    }
    config = json.loads((checkpoints[variant][0] / "config.json").read_text())
    kwargs = model_kwargs_from_hf_config(config)
    assert set(init_defaults(MoETransformer)) - finetuning_options - set(kwargs) == set()


def test_sliding_window_caps_the_sequence_length(tmp_path):
    config = hf_config("mixtral")
    config.sliding_window = 12
    reference = randomize(AutoModelForCausalLM.from_config(config))
    reference.save_pretrained(tmp_path)
    model = MoETransformer.from_pretrained(tmp_path).eval()
    assert model.max_seq_len == 12
    ids = token_ids(length=12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(reference, ids), **TOLERANCE)


def test_the_older_config_layout_of_hub_checkpoints(checkpoints, tmp_path):
    """Hub config.json files written by transformers 4 keep `rope_theta` and `rope_scaling` (with `type`)
    at the top level and `torch_dtype`: they read the same, and export keeps their layout."""
    source, reference = checkpoints["deepseek_v3_yarn"]
    directory = tmp_path / "legacy"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    config["torch_dtype"] = config.pop("dtype")
    (directory / "config.json").write_text(json.dumps(config))

    model = MoETransformer.from_pretrained(directory).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_logits(reference, ids), **TOLERANCE)
    model.save_pretrained(tmp_path / "out", dtype=torch.float32)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "rope_parameters" not in written and written["rope_scaling"]["type"] == "yarn"
    assert written["torch_dtype"] == "float32" and "dtype" not in written
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(hf_logits(exported, ids), hf_logits(reference, ids), **TOLERANCE)
