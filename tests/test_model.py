"""MoETransformer: shapes, causality, grouped-query attention, RoPE, layer layout, losses, configs, training."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoELayer, MoETransformer, collect_aux_loss
from lightning_moe.layers.experts import FeedForward
from lightning_moe.layers.gates import TopKGate
from lightning_moe.modeling import CausalSelfAttention, apply_rotary, moe_layer_layout, rotary_cos_sin
from lightning_moe.modeling.optim import warmup_cosine, weight_decay_groups

TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=32, max_seq_len=32, num_experts=4, top_k=2)


def tiny_model(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(**{**TINY, **overrides})


def test_forward_shapes_and_tied_embeddings():
    model = tiny_model(vocab_size=100)
    logits = model(torch.randint(0, 100, (3, 7)))
    assert logits.shape == (3, 7, 100)
    tied = tiny_model(tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    # A tied head is one parameter, counted once.
    assert tied.num_parameters() == model.num_parameters() - 100 * 32 - 100 * 32 + 256 * 32


def test_causal_a_future_token_does_not_change_earlier_logits():
    model = tiny_model().eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], atol=1e-5, rtol=0)
    assert not torch.allclose(after[:, 9:], before[:, 9:])


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = CausalSelfAttention(d_model=32, n_heads=4, n_kv_heads=2)
    mha = CausalSelfAttention(d_model=32, n_heads=4, n_kv_heads=4)
    assert gqa.kv_proj.weight.shape == (2 * 2 * 8, 32)
    # Query head h of GQA reads key/value head h // (n_heads / n_kv_heads): write those heads out
    # for every query head and the plain multi-head attention must give the same output.
    k_weight, v_weight = gqa.kv_proj.weight.view(2, 2, 8, 32).unbind(0)  # (G, Hd, D) each
    repeated = torch.stack([k_weight.repeat_interleave(2, dim=0), v_weight.repeat_interleave(2, dim=0)])
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
        mha.kv_proj.weight.copy_(repeated.reshape(2 * 4 * 8, 32))
    x = torch.randn(2, 10, 32)
    cos, sin = rotary_cos_sin(10, 8, theta=10000.0)
    torch.testing.assert_close(gqa(x, cos, sin), mha(x, cos, sin), atol=1e-5, rtol=1e-5)
    model = tiny_model(n_kv_heads=2)
    assert model(torch.randint(0, 256, (2, 8))).shape == (2, 8, 256)


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rotary_cos_sin(20, 8, theta=10000.0)

    def score(m: int, n: int) -> torch.Tensor:
        q_m = apply_rotary(q, cos[m : m + 1], sin[m : m + 1])
        k_n = apply_rotary(k, cos[n : n + 1], sin[n : n + 1])
        return (q_m * k_n).sum()

    torch.testing.assert_close(score(3, 1), score(15, 13), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is no rotation
    assert not torch.allclose(score(3, 1), score(3, 2))


@pytest.mark.parametrize(
    "n_layers, first_k_dense, every, expected",
    [
        (4, 0, 1, [True, True, True, True]),
        (4, 0, 2, [False, True, False, True]),  # GLaM: every other layer
        (5, 1, 2, [False, False, True, False, True]),
        (4, 3, 1, [False, False, False, True]),  # DeepSeek: first k dense
        (3, 3, 1, [False, False, False]),  # all dense baseline
    ],
)
def test_layer_layout(n_layers, first_k_dense, every, expected):
    assert moe_layer_layout(n_layers=n_layers, first_k_dense=first_k_dense, moe_every_n_layers=every) == expected
    model = tiny_model(n_layers=n_layers, first_k_dense=first_k_dense, moe_every_n_layers=every)
    assert [isinstance(block.ffn, MoELayer) for block in model.blocks] == expected
    assert all(isinstance(block.ffn, FeedForward) for block, moe in zip(model.blocks, expected) if not moe)


def test_moe_d_ff_sets_expert_width_and_dense_layers_keep_d_ff():
    model = tiny_model(n_layers=2, first_k_dense=1, d_ff=48, moe_d_ff=16)
    assert model.blocks[0].ffn.w_out.in_features == 48
    assert model.blocks[1].ffn.experts.w_out.shape == (4, 16, 32)


def test_training_step_adds_the_aux_loss():
    model = tiny_model()
    tokens = torch.randint(0, 256, (2, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached: logging is skipped
        loss = model.training_step(batch, 0)
    ce, _ = model.language_model_loss(batch)
    aux = collect_aux_loss(model)
    assert aux.item() > 0.01  # two layers, Switch loss ~1 each, coefficient 0.01
    torch.testing.assert_close(loss, ce + aux)

    no_aux = tiny_model(gate_kwargs={"load_balance_coef": 0.0})
    with pytest.warns(UserWarning, match="self.log"):
        loss = no_aux.training_step(batch, 0)
    torch.testing.assert_close(loss, no_aux.language_model_loss(batch)[0])


def test_a_batch_without_targets_has_loss_zero_not_nan():
    """A window inside a long user turn of a chat (assistant-only loss): every target is -100. The
    mean over no token is 0 / 0 in PyTorch; the loss must stay finite (and the training under
    MoEStrategy, which stops on a non-finite loss, go on), with no gradient from it."""
    model = tiny_model()
    tokens = torch.randint(0, 256, (2, 17))
    batch = (tokens[:, :-1], torch.full((2, 16), -100))
    loss, count = model.language_model_loss(batch)
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    half = tokens[:, 1:].clone()
    half[0] = -100  # the mean is over the tokens that count
    mean, count = model.language_model_loss((tokens[:, :-1], half))
    expected = torch.nn.functional.cross_entropy(model(tokens[:, :-1])[1].float(), tokens[1, 1:])
    assert count == 16
    torch.testing.assert_close(mean, expected)


class SmoothedModel(MoETransformer):
    """A user's subclass with an argument of its own."""

    def __init__(self, *, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing


def test_freezing_a_tied_head_by_its_second_name_points_at_the_first():
    with pytest.raises(ValueError, match="`lm_head.weight` is `embed.weight`"):
        tiny_model(tie_embeddings=True, freeze=["*", "!lm_head.weight"])
    assert not tiny_model(tie_embeddings=True, freeze=["embed.weight"]).lm_head.weight.requires_grad


def test_a_subclass_saves_and_reloads_its_own_arguments(tmp_path):
    model = SmoothedModel(label_smoothing=0.2, vocab_size=64, **TINY)
    assert model.hparams.label_smoothing == 0.2 and model.hparams.d_model == TINY["d_model"]
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    tokens = torch.randint(0, 64, (2, 9))
    trainer.fit(model, DataLoader([(tokens[:, :-1], tokens[:, 1:])], batch_size=None))
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    restored = SmoothedModel.load_from_checkpoint(tmp_path / "model.ckpt")
    assert restored.label_smoothing == 0.2 and restored.hparams.num_experts == TINY["num_experts"]


def test_val_loss_is_the_token_weighted_mean_over_batches():
    """Validation batches with different numbers of targets, one with none (loss 0): val_loss is the
    mean over the tokens (the loss of one batch holding them all), not over the batches, and val_ppl
    its exp."""
    model = tiny_model()
    tokens = torch.randint(0, 256, (3, 2, 17), generator=torch.Generator().manual_seed(1))
    targets = tokens[:, :, 1:].clone()
    targets[1] = -100  # no target: a window inside a user turn
    targets[2, :, 1:] = -100  # one target per row
    batches = [(tokens[i, :, :-1], targets[i]) for i in range(3)]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = trainer.validate(model, DataLoader(batches, batch_size=None), verbose=False)[0]
    with torch.no_grad():
        sums = [model.language_model_loss(batch) for batch in batches]
    expected = sum(float(loss) * int(count) for loss, count in sums) / sum(int(count) for _, count in sums)
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_a_training_step_reads_nothing_back_to_the_host(capacity_factor):
    """Forward, loss and backward of a training step stay on the device: on a GPU a read (the token
    count as a Python int, say) would make the host wait for the whole forward at every step. With
    a capacity too, padded (``pad_to_capacity``): every expert runs on exactly its capacity of rows."""
    from lightning_moe.ops.tensor_operations import TensorOperations

    model = tiny_model(capacity_factor=capacity_factor, pad_to_capacity=capacity_factor is not None)
    tokens = torch.randint(0, 256, (2, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    with TensorOperations() as operations, pytest.warns(UserWarning, match="self.log"):
        model.training_step(batch, 0).backward()
    assert operations.read_back == []


@pytest.mark.parametrize(
    "overrides, fields",
    [
        (dict(d_model=30, n_heads=4), ["d_model", "n_heads"]),
        (dict(d_model=12, n_heads=4), ["head width", "d_model", "n_heads"]),
        (dict(n_kv_heads=3), ["n_kv_heads", "n_heads"]),
        (dict(first_k_dense=3), ["first_k_dense", "n_layers"]),
        (dict(moe_every_n_layers=0), ["moe_every_n_layers"]),
        (dict(moe_every_n_layers=3), ["moe_every_n_layers", "first_k_dense"]),
        (dict(top_k=5), ["top_k", "num_experts"]),
        (dict(gate="no_such_gate"), ["gate", "no_such_gate"]),
        (dict(capacity_factor=0.0), ["capacity_factor"]),
        (dict(num_experts=0), ["num_experts"]),
        (dict(learning_rate=0.0), ["learning_rate"]),
        (dict(warmup_steps=-1), ["warmup_steps"]),
        (dict(min_lr_ratio=1.5), ["min_lr_ratio"]),
        (dict(weight_decay=-0.1), ["weight_decay"]),
        (dict(rope_theta=0.0), ["rope_theta"]),
        # The suggested head counts are those whose head width is also even: 96 / 5 suggests no 32.
        (dict(d_model=96, n_heads=5), ["d_model", "n_heads", "[1, 2, 3, 4, 6, 8, 12, 16, 24, 48]"]),
        (dict(tie_embeddings="false"), ["tie_embeddings"]),
        (dict(adam_betas=("0.9", "0.95")), ["adam_betas"]),
    ],
)
def test_bad_configs_raise_value_error_naming_the_field(overrides, fields):
    with pytest.raises(ValueError) as error:
        tiny_model(**overrides)
    message = str(error.value)
    for field in fields:
        assert field in message, message
    # The value is named too.
    for value in overrides.values():
        assert str(value) in message, message


def test_sequence_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model()(torch.zeros(1, 33, dtype=torch.long))


def test_gate_instance_is_copied_into_every_moe_layer():
    gate = TopKGate(top_k=1, load_balance_coef=0.0)
    model = tiny_model(gate=gate)
    gates = [block.ffn.gate for block in model.blocks]
    assert all(isinstance(g, TopKGate) and g.top_k == 1 for g in gates)
    assert gates[0] is not gates[1] and gate.num_experts is None  # the given instance stays unbuilt
    model(torch.randint(0, 256, (2, 8)))
    assert all(int(block.ffn.routed_tokens) == 16 for block in model.blocks)  # one expert per token


def test_weight_decay_groups_exclude_norms_and_embeddings():
    model = tiny_model(tie_embeddings=True)
    decay, no_decay = weight_decay_groups(model, 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed.weight) in no_decay_ids and id(model.norm.weight) in no_decay_ids
    assert id(model.blocks[0].ffn.experts.w_in) in decay_ids and id(model.blocks[0].attn.q_proj.weight) in decay_ids
    assert len(decay_ids) + len(no_decay_ids) == len({id(p) for p in model.parameters()})
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    schedule = dict(warmup_steps=10, total_steps=110.0, min_lr_ratio=0.1)
    assert warmup_cosine(0, **schedule) == pytest.approx(0.1)
    assert warmup_cosine(9, **schedule) == pytest.approx(1.0)
    assert warmup_cosine(10, **schedule) == pytest.approx(1.0)
    assert warmup_cosine(60, **schedule) == pytest.approx(0.55)  # half way: (1 + 0.1) / 2
    assert warmup_cosine(110, **schedule) == pytest.approx(0.1)
    assert warmup_cosine(500, **schedule) == pytest.approx(0.1)
    assert warmup_cosine(500, warmup_steps=0, total_steps=math.inf, min_lr_ratio=0.1) == 1.0


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_loss_falls_on_a_repeated_pattern_and_checkpoint_reloads(tmp_path):
    pattern = torch.tensor(list(b"the quick brown fox "), dtype=torch.long)
    stream = pattern.repeat(4)  # 80 tokens
    windows = torch.stack([stream[i : i + 17] for i in range(0, 32, 2)])  # 16 windows of 17
    loader = DataLoader(TensorDataset(windows[:, :-1], windows[:, 1:]), batch_size=8, shuffle=True)
    model = tiny_model(learning_rate=1e-2, warmup_steps=2, min_lr_ratio=0.5, gate=TopKGate(top_k=2))
    recorder = _LossRecorder()
    trainer = L.Trainer(
        max_steps=20,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[recorder],
    )
    trainer.fit(model, loader)
    assert len(recorder.losses) == 20
    first, last = sum(recorder.losses[:2]) / 2, sum(recorder.losses[-2:]) / 2
    assert last < 0.5 * first, recorder.losses
    logged = trainer.logged_metrics
    assert {"train_loss", "train_ppl", "train/load_balance_loss", "train/ce_loss"} <= set(logged)
    assert float(logged["train_ppl"]) == pytest.approx(math.exp(float(logged["train/ce_loss"])), rel=1e-4)

    # Hyper-parameters are saved, so a checkpoint rebuilds the model, gate instance included.
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    assert model.hparams.gate == {
        "class_path": "lightning_moe.layers.gates.topk.TopKGate",
        "init_args": {"top_k": 2, "normalize": True, "load_balance_coef": 0.01, "load_balance_scope": "local",
                      "z_loss_coef": 0.0, "device_balance_coef": 0.0, "communication_balance_coef": 0.0, "device_capacity_factor": None},
    }
    reloaded = MoETransformer.load_from_checkpoint(path, weights_only=True)  # no pickled module in it
    assert isinstance(reloaded.blocks[0].ffn.gate, TopKGate)
    tokens = windows[:2, :-1]
    torch.testing.assert_close(reloaded.eval()(tokens), model.eval()(tokens))


def test_gate_class_path_dict_must_name_a_gate():
    model = tiny_model(gate={"class_path": "lightning_moe.layers.gates.TopKGate", "init_args": {"top_k": 1}})
    assert model.blocks[0].ffn.gate.top_k == 1
    with pytest.raises(ValueError, match="class_path"):
        tiny_model(gate={"class_path": "torch.nn.Linear", "init_args": {}})
