"""Fine-tuning controls of MoETransformer: freezing by name pattern, aux-loss and z-loss coefficients,
learning-rate schedules, and per-block gradient checkpointing (same loss and gradients, load counted
once, the forward's aux losses kept)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils.checkpoint

from lightning_moe import MoETransformer, collect_aux_loss
from lightning_moe.layers.aux_loss import moe_layers
from lightning_moe.modeling.optim import LR_SCHEDULES, warmup_constant, warmup_linear

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=32, max_seq_len=32, num_experts=4, top_k=2)


def tiny(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(**{**TINY, **overrides})


def _batch(seed: int = 0):
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_train_only_the_experts():
    model = tiny(freeze=["*", "!*.experts.*"])
    assert _trainable(model) == {f"blocks.{i}.ffn.experts.{w}" for i in range(2) for w in ("w_in", "w_out")}
    optimizer = model.configure_optimizers()["optimizer"]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1]  # the empty no-decay group is dropped

    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = model.blocks[0].ffn.experts.w_in.detach().clone()
    loss, _ = model.language_model_loss(_batch())
    (loss + collect_aux_loss(model)).backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name
    assert not torch.equal(model.blocks[0].ffn.experts.w_in, trained_before)


def test_freeze_the_router_with_a_glob_and_blocks_with_a_regex():
    model = tiny(freeze=["*.gate.weight"])
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"blocks.0.ffn.gate.weight",
                                                                              "blocks.1.ffn.gate.weight"}
    model = tiny(freeze=[r"re:blocks\.0\..*", "*.attn.*"])
    assert all(not name.startswith("blocks.0.") and ".attn." not in name for name in _trainable(model))
    assert "blocks.1.ffn.experts.w_in" in _trainable(model) and "embed.weight" in _trainable(model)
    groups = model.configure_optimizers()["optimizer"].param_groups
    assert sum(len(group["params"]) for group in groups) == len(_trainable(model))


@pytest.mark.parametrize(
    "freeze, message",
    [
        (["*.atn.*"], r"pattern '\*.atn.\*' matches no parameter"),
        (["re:blocks.(["], "not a valid regular expression"),
        ("*.attn.*", "must be a list of name patterns"),
        (["!"], "must be a list of name patterns"),
    ],
)
def test_bad_freeze_patterns_are_refused(freeze, message):
    with pytest.raises(ValueError, match=message):
        tiny(freeze=freeze)


def test_freezing_everything_leaves_nothing_to_optimize():
    with pytest.raises(ValueError, match="every parameter is frozen"):
        tiny(freeze=["*"]).configure_optimizers()


def test_loss_coefficients_override_the_gate():
    model = tiny(load_balance_coef=0.0, z_loss_coef=1e-3, gate_kwargs={"load_balance_coef": 0.5})
    model(_batch()[0])
    for layer in moe_layers(model):
        assert (layer.gate.load_balance_coef, layer.gate.z_loss_coef) == (0.0, 1e-3)
        assert set(layer.aux_losses) == {"z_loss"} and layer.aux_losses["z_loss"].coefficient == 1e-3
    sigmoid = tiny(gate="sigmoid", load_balance_coef=0.01)
    assert all(layer.gate.load_balance_coef == 0.01 for layer in moe_layers(sigmoid))
    with pytest.raises(ValueError, match="`z_loss_coef`=0.001 was given, but gate SigmoidGate has no `z_loss_coef`"):
        tiny(gate="sigmoid", z_loss_coef=1e-3)
    with pytest.raises(ValueError, match="load_balance_coef"):
        tiny(load_balance_coef=-1.0)


def test_learning_rate_schedules():
    schedule = dict(warmup_steps=10, total_steps=110.0, min_lr_ratio=0.1)
    assert warmup_linear(4, **schedule) == pytest.approx(0.5)
    assert warmup_linear(60, **schedule) == pytest.approx(0.55)
    assert warmup_linear(110, **schedule) == pytest.approx(0.1) == warmup_linear(500, **schedule)
    assert warmup_linear(50, warmup_steps=0, total_steps=math.inf, min_lr_ratio=0.1) == 1.0
    assert warmup_constant(4, **schedule) == pytest.approx(0.5)
    assert warmup_constant(10, **schedule) == warmup_constant(10_000, **schedule) == 1.0
    for name, function in LR_SCHEDULES.items():
        scheduler = tiny(lr_schedule=name).configure_optimizers()["lr_scheduler"]["scheduler"]
        assert scheduler.lr_lambdas[0].func is function
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny(lr_schedule="step")


def _loss_and_grads(model, batch):
    model.train()
    loss, _ = model.language_model_loss(batch)
    loss = loss + collect_aux_loss(model)
    aux_before = {id(aux.value) for layer in moe_layers(model) for aux in layer.aux_losses.values()}
    loss.backward(torch.tensor(1.0))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    aux_after = {id(aux.value) for layer in moe_layers(model) for aux in layer.aux_losses.values()}
    return loss.detach(), grads, aux_before, aux_after


@pytest.mark.parametrize(
    "gate_options",
    [
        dict(gate="topk", z_loss_coef=1e-2),
        dict(gate="sigmoid", gate_kwargs={"bias_update_rate": 1e-3, "sequence_balance_coef": 1e-2}),
        dict(gate="noisy_topk"),  # random noise in training: the recomputation must replay it
    ],
)
@pytest.mark.parametrize("early_stop", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_counts_once(gate_options, early_stop):
    """With ``early_stop=False`` the recomputation runs each block to its end, so an MoE layer would
    record its routing a second time if checkpointing did not pause it."""
    batch = _batch()
    reference, checkpointed = tiny(**gate_options), tiny(gradient_checkpointing=True, **gate_options)
    calls = []
    for layer in moe_layers(checkpointed):
        layer.register_forward_pre_hook(lambda module, args: calls.append(module))

    torch.manual_seed(1)
    loss_ref, grads_ref, _, _ = _loss_and_grads(reference, batch)
    torch.manual_seed(1)
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        loss, grads, aux_before, aux_after = _loss_and_grads(checkpointed, batch)

    assert len(calls) == 4  # 2 layers, each run in the forward and again in the backward
    torch.testing.assert_close(loss, loss_ref, atol=0, rtol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(reference.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    assert aux_before == aux_after  # the recomputation did not replace the aux losses
    for ours, theirs in zip(moe_layers(checkpointed), moe_layers(reference)):
        assert torch.equal(ours.tokens_per_expert, theirs.tokens_per_expert)
        assert int(ours.tokens_per_expert.sum()) == 2 * 16 * 2  # B * T * top_k, once
        assert torch.equal(ours.load_since_bias_update, theirs.load_since_bias_update)
        assert ours.record_routing  # restored after the backward


def test_gradient_checkpointing_keeps_the_global_batch_count_of_its_forward():
    """Global-batch balancing pools the accumulated micro-batches: the recomputation of a checkpointed
    block must rebuild the loss with the count its forward had (that micro-batch added once), so the
    accumulated gradients and the pools are those of the model without checkpointing."""
    options = dict(gate_kwargs={"load_balance_scope": "global"}, load_balance_coef=0.1)
    reference, checkpointed = tiny(**options), tiny(gradient_checkpointing=True, **options)
    optimizers = [model.configure_optimizers()["optimizer"] for model in (reference, checkpointed)]
    assert all(layer.pool_micro_batches for layer in moe_layers(checkpointed))
    for micro_batch in range(3):
        _, grads_ref, _, _ = _loss_and_grads(reference, _batch(micro_batch))
        _, grads, _, _ = _loss_and_grads(checkpointed, _batch(micro_batch))
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    for ours, theirs in zip(moe_layers(checkpointed), moe_layers(reference)):
        assert torch.equal(ours.global_batch_load, theirs.global_batch_load)
        assert int(ours.global_batch_load.sum()) == 3 * 2 * 16 * 2  # micro-batches * B * T * top_k, once each
    for optimizer in optimizers:
        optimizer.step()
    assert all(int(layer.global_batch_load.sum()) == 0 for layer in moe_layers(checkpointed))


def test_gradient_checkpointing_is_off_without_gradients():
    model = tiny(gradient_checkpointing=True).eval()
    calls = []
    for layer in moe_layers(model):
        layer.register_forward_pre_hook(lambda module, args: calls.append(module))
    with torch.no_grad():
        model(_batch()[0])
    assert len(calls) == 2
