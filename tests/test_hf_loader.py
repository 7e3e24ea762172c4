"""``load_pretrained_weights``: a model built on the meta device reads only the experts it is given
(the right rows, in the given order), each dense tensor once, from single-file, sharded and
transformers' fused 3-D layouts; the counted bytes match; expert parallelism simulated per rank."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import hf_logits, save_tiny, token_ids
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_moe import MoETransformer, is_expert_param
from lightning_moe.interop.hf_load import load_pretrained_weights
from lightning_moe.layers.dispatch import LocalDispatcher

MOE_LAYER = "blocks.1.ffn"  # the deepseek_v3 variant: block 0 dense, block 1 MoE with 8 experts


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    directory, _ = save_tiny("deepseek_v3", tmp_path_factory.mktemp("deepseek") / "ckpt")
    return directory, MoETransformer.from_pretrained(directory)


def _tensor_bytes(directory, keys=None) -> int:
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        return sum(handle.get_tensor(k).numel() * 4 for k in handle.keys() if keys is None or k in keys)


def _expert_keys(expert: int) -> set[str]:
    return {f"model.layers.1.mlp.experts.{expert}.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}


def test_meta_model_reads_only_the_listed_experts(deepseek):
    directory, full = deepseek
    model = MoETransformer.from_pretrained(directory, load_weights=False)
    assert all(p.device.type == "meta" for p in model.parameters())

    report = load_pretrained_weights(model, directory, local_experts={MOE_LAYER: [5, 2]})

    experts = model.blocks[1].ffn.experts
    assert experts.w_in.shape == (2, 32, 32) and experts.num_experts == 2 and model.blocks[1].ffn.num_experts == 8
    torch.testing.assert_close(experts.w_in, full.blocks[1].ffn.experts.w_in[[5, 2]], atol=0, rtol=0)
    torch.testing.assert_close(experts.w_out, full.blocks[1].ffn.experts.w_out[[5, 2]], atol=0, rtol=0)
    assert is_expert_param(experts.w_in) and experts.w_in.requires_grad
    # Every dense tensor as in the full model; nothing left on the meta device.
    full_state = full.state_dict()
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu", name
        if ".experts." not in name:
            torch.testing.assert_close(tensor, full_state[name], atol=0, rtol=0, msg=name)
    assert model.blocks[1].ffn.gate.expert_bias.dtype == torch.float32
    assert type(model.blocks[1].ffn.dispatcher) is LocalDispatcher
    assert model.blocks[1].ffn.tokens_per_expert.device.type == "cpu"

    # Bytes: the whole checkpoint but the six other experts' three projections, exactly.
    others = set().union(*(_expert_keys(e) for e in range(8) if e not in (5, 2)))
    assert report.checkpoint_bytes == _tensor_bytes(directory)
    assert report.bytes_read == report.checkpoint_bytes - _tensor_bytes(directory, others)
    assert report.bytes_read < report.checkpoint_bytes
    assert set(report.unused_keys) == others
    assert report.local_experts == {MOE_LAYER: [5, 2]}


def test_materialised_parameters_keep_their_identity(deepseek):
    directory, _ = deepseek
    model = MoETransformer.from_pretrained(directory)
    w_in, embed = model.blocks[1].ffn.experts.w_in, model.embed.weight
    with torch.no_grad():
        embed.zero_()
    load_pretrained_weights(model, directory, local_experts={MOE_LAYER: [7]})
    assert model.blocks[1].ffn.experts.w_in is w_in and w_in.shape == (1, 32, 32)
    assert model.embed.weight is embed and embed.abs().sum() > 0


def test_all_experts_without_a_list_and_forward_works(deepseek):
    directory, full = deepseek
    model = MoETransformer.from_pretrained(directory, load_weights=False)
    report = load_pretrained_weights(model, directory)
    assert report.bytes_read == report.checkpoint_bytes and report.unused_keys == []
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), full.eval()(ids), atol=0, rtol=0)


def test_tied_embeddings_stay_tied_after_a_meta_load(tmp_path):
    directory, _ = save_tiny("qwen3_moe_bias_tied", tmp_path / "tied")
    model = MoETransformer.from_pretrained(directory, load_weights=False)
    load_pretrained_weights(model, directory)
    assert model.lm_head.weight is model.embed.weight and model.embed.weight.device.type == "cpu"


def test_transformers_fused_expert_layout_is_read_row_by_row(deepseek, tmp_path):
    """A file with transformers' in-memory 3-D layout (``experts.gate_up_proj [E, 2F, D]``)."""
    directory, full = deepseek
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    prefix = "model.layers.1.mlp.experts"
    gate_up = torch.stack([torch.cat([tensors.pop(f"{prefix}.{e}.gate_proj.weight"),
                                      tensors.pop(f"{prefix}.{e}.up_proj.weight")]) for e in range(8)])
    down = torch.stack([tensors.pop(f"{prefix}.{e}.down_proj.weight") for e in range(8)])
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({**tensors, f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down},
              str(fused / "model.safetensors"))
    (fused / "config.json").write_text((directory / "config.json").read_text())

    model = MoETransformer.from_pretrained(fused, load_weights=False)
    report = load_pretrained_weights(model, fused, local_experts={MOE_LAYER: [6, 0, 3]})
    torch.testing.assert_close(model.blocks[1].ffn.experts.w_in, full.blocks[1].ffn.experts.w_in[[6, 0, 3]])
    torch.testing.assert_close(model.blocks[1].ffn.experts.w_out, full.blocks[1].ffn.experts.w_out[[6, 0, 3]])
    # Three of eight rows of each fused tensor were read.
    fused_bytes = (gate_up.numel() + down.numel()) * 4
    assert report.bytes_read == report.checkpoint_bytes - fused_bytes * 5 // 8


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe"])
def test_a_file_of_transformers_in_memory_state_dict_is_read(tmp_path, variant):
    """transformers 5 keeps every family's MoE block as `mlp` in memory (Mixtral's too, which its files
    call `block_sparse_moe`), with fused 3-D experts: a file of that state dict reads the same."""
    directory, reference = save_tiny(variant, tmp_path / "saved")
    fused = tmp_path / "in_memory"
    fused.mkdir()
    (fused / "config.json").write_text((directory / "config.json").read_text())
    state = {key: tensor.contiguous() for key, tensor in reference.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})

    model = MoETransformer.from_pretrained(fused, load_weights=False)
    report = load_pretrained_weights(model, fused)
    assert report.unused_keys == [] and report.bytes_read == report.checkpoint_bytes
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), hf_logits(reference, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_expert_parallel_ranks_split_the_expert_bytes(deepseek, ep_size):
    """Rank r of EP size p reads experts [r*E/p, (r+1)*E/p) and every dense tensor: the ranks' expert
    bytes add up to the checkpoint's expert bytes, the dense bytes are the same on every rank."""
    directory, full = deepseek
    expert_bytes = _tensor_bytes(directory, set().union(*(_expert_keys(e) for e in range(8))))
    reads = []
    for rank in range(ep_size):
        model = MoETransformer.from_pretrained(directory, load_weights=False)
        local = list(range(rank * 8 // ep_size, (rank + 1) * 8 // ep_size))
        reads.append(load_pretrained_weights(model, directory, local_experts={MOE_LAYER: local}).bytes_read)
        torch.testing.assert_close(model.blocks[1].ffn.experts.w_in, full.blocks[1].ffn.experts.w_in[local])
    dense_bytes = _tensor_bytes(directory) - expert_bytes
    assert reads == [dense_bytes + expert_bytes // ep_size] * ep_size


@pytest.mark.parametrize(
    "local_experts, message",
    [
        ({}, r"must name every MoE layer.*missing: \['blocks.1.ffn'\]"),
        ({MOE_LAYER: [1], "blocks.0.ffn": [0]}, r"unknown: \['blocks.0.ffn'\]"),
        ({MOE_LAYER: [1, 1]}, "distinct logical experts"),
        ({MOE_LAYER: [8]}, r"in \[0, 8\)"),
        ({MOE_LAYER: []}, "distinct logical experts"),
    ],
)
def test_bad_local_experts_are_refused(deepseek, local_experts, message):
    model = MoETransformer.from_pretrained(deepseek[0], load_weights=False)
    with pytest.raises(ValueError, match=message):
        load_pretrained_weights(model, deepseek[0], local_experts=local_experts)


def test_every_expert_in_another_order_is_refused_where_the_layer_routes_locally(deepseek):
    """A LocalDispatcher sends expert e's tokens to row e: row i holding expert 7 - i would compute other
    logits, silently."""
    directory, full = deepseek
    model = MoETransformer.from_pretrained(directory, load_weights=False)
    with pytest.raises(ValueError, match=r"order \[7, 6, 5, 4, 3, 2, 1, 0\].*routes locally.*list\(range\(8\)\)"):
        load_pretrained_weights(model, directory, local_experts={MOE_LAYER: list(range(8))[::-1]})
    load_pretrained_weights(model, directory, local_experts={MOE_LAYER: list(range(8))})
    torch.testing.assert_close(model.blocks[1].ffn.experts.w_in, full.blocks[1].ffn.experts.w_in, atol=0, rtol=0)


def test_a_missing_expert_tensor_is_named(deepseek, tmp_path):
    directory, _ = deepseek
    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((directory / "config.json").read_text())
    model = MoETransformer.from_pretrained(broken, load_weights=False)
    load_pretrained_weights(model, broken, local_experts={MOE_LAYER: [0, 1]})  # expert 3 is not needed
    with pytest.raises(ValueError, match=r"lacks \['model.layers.1.mlp.experts.3.up_proj.weight'\]"):
        load_pretrained_weights(MoETransformer.from_pretrained(broken, load_weights=False), broken)


def test_a_shard_listed_in_the_index_but_missing_is_named(tmp_path):
    directory, _ = save_tiny("mixtral", tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (directory / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim} is listed in model.safetensors.index.json but missing"):
        MoETransformer.from_pretrained(directory)


def test_expert_rows_already_sliced_on_the_meta_device(deepseek):
    """What MoEStrategy's sharding leaves when it slices meta experts before loading: local rows."""
    directory, full = deepseek
    model = MoETransformer.from_pretrained(directory, load_weights=False)
    experts = model.blocks[1].ffn.experts
    for parameter in experts.parameters():
        parameter.data = parameter.data.index_select(0, torch.tensor([4, 5], device="meta"))
    load_pretrained_weights(model, directory, local_experts={MOE_LAYER: [4, 5]})
    torch.testing.assert_close(model.blocks[1].ffn.experts.w_out, full.blocks[1].ffn.experts.w_out[[4, 5]])
    with pytest.raises(ValueError, match="fills either all 8 experts or the 3 listed"):
        sliced = MoETransformer.from_pretrained(directory, load_weights=False)
        for parameter in sliced.blocks[1].ffn.experts.parameters():
            parameter.data = parameter.data[:2]
        load_pretrained_weights(sliced, directory, local_experts={MOE_LAYER: [0, 1, 2]})


def test_a_meta_buffer_the_checkpoint_cannot_fill_is_named(deepseek):
    directory, _ = deepseek
    model = MoETransformer.from_pretrained(directory, load_weights=False)
    # A user's own buffer, made on the meta device like the rest of the model: nothing can fill it.
    model.blocks[1].ffn.gate.register_buffer("calibration", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(ValueError, match=r"\['blocks.1.ffn.gate.calibration'\] are on the meta device"):
        load_pretrained_weights(model, directory)
    # Expert groups set on a meta model are not on the meta device: they need no checkpoint.
    other = MoETransformer.from_pretrained(directory, load_weights=False)
    other.blocks[1].ffn.gate.set_expert_groups(torch.arange(8) // 4, max_groups=1)
    assert not other.blocks[1].ffn.gate.expert_group.is_meta
    load_pretrained_weights(other, directory)
