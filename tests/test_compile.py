"""MoE layers and MoETransformer under ``torch.compile``.

The grouped GEMM is one opaque operator to the compiler (``lightning_moe::grouped_mm``, its weight
gradient another): ``torch.library.opcheck`` checks their shape functions and autograd against the
eager kernels. Compiled models give the eager model's outputs and gradients for every gate; with a
top-k gate, dropless or with a padded capacity, each block is one graph that the routing of later steps
does not recompile.
Most tests use the ``aot_eager`` backend (the compiler's tracing and autograd partition, without
its kernel compilation time); one trains ``compile_blocks=True`` with the default inductor backend.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch._dynamo
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe import MoETransformer
from lightning_moe.layers.aux_loss import collect_aux_loss
from lightning_moe.ops.grouped_mm import grouped_mm_loop

TINY = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16, num_experts=8, vocab_size=64)


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernel, and the per-group loop
@pytest.mark.parametrize(("width_in", "width_out", "rows_per_group"), [(8, 12, [3, 0, 5, 2]), (5, 7, [1, 4]), (8, 8, [0, 0])])
def test_grouped_mm_operators_agree_with_eager(dtype, width_in, width_out, rows_per_group):
    generator = torch.Generator().manual_seed(0)
    x_NI = torch.randn(sum(rows_per_group), width_in, dtype=dtype, generator=generator, requires_grad=True)
    w_GIO = torch.randn(len(rows_per_group), width_in, width_out, dtype=dtype, generator=generator, requires_grad=True)
    rows_G = torch.tensor(rows_per_group)
    torch.library.opcheck(torch.ops.lightning_moe.grouped_mm.default, (x_NI, w_GIO, rows_G))
    grad_NO = torch.randn(sum(rows_per_group), width_out, dtype=dtype, generator=generator)
    torch.library.opcheck(torch.ops.lightning_moe.grouped_mm_weight_grad.default, (x_NI.detach(), grad_NO, rows_G))

    y_NO = torch.ops.lightning_moe.grouped_mm(x_NI, w_GIO, rows_G)
    expected_NO = grouped_mm_loop(x_NI, w_GIO, rows_G)
    torch.testing.assert_close(y_NO, expected_NO)
    for actual, expected in zip(torch.autograd.grad(y_NO, (x_NI, w_GIO), grad_NO),
                                torch.autograd.grad(expected_NO, (x_NI, w_GIO), grad_NO)):
        torch.testing.assert_close(actual, expected)
    # A group with no rows gets no gradient (not left uninitialised).
    empty = [g for g, rows in enumerate(rows_per_group) if rows == 0]
    assert torch.count_nonzero(torch.ops.lightning_moe.grouped_mm_weight_grad(x_NI.detach(), grad_NO, rows_G)[empty]) == 0


def _outputs_and_grads(model: MoETransformer, input_ids_BT: torch.Tensor, seed: int):
    torch.manual_seed(seed)
    logits_BTV = model(input_ids_BT)
    grads = torch.autograd.grad(logits_BTV.square().mean(), list(model.parameters()), allow_unused=True)
    return logits_BTV.detach(), grads


@pytest.mark.parametrize("options", [
    dict(gate="topk", top_k=2),
    dict(gate="topk", top_k=2, use_grouped_mm=False),
    dict(gate="topk", top_k=2, capacity_factor=1.0),
    dict(gate="noisy_topk", top_k=2),
    dict(gate="dynamic"),
    dict(gate="expert_choice"),
    dict(gate="sigmoid", top_k=2),
    dict(gate="topk", top_k=2, num_shared_experts=1),
], ids=lambda options: "-".join(f"{key}={value}" for key, value in options.items()))
def test_compiled_model_matches_eager_for_every_gate(options):
    """Outputs and gradients of the compiled model equal the eager model's over three steps of other
    inputs (routing that changes; the noisy gate draws the same noise from the same seed)."""
    options = dict(options)
    use_grouped_mm = options.pop("use_grouped_mm", True)
    torch.manual_seed(0)
    model = MoETransformer(**TINY, **options)
    for layer in model.modules():
        if hasattr(layer, "use_grouped_mm"):
            layer.use_grouped_mm = use_grouped_mm
    compiled = torch.compile(model, backend="aot_eager")
    for step in range(3):
        input_ids_BT = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(step))
        expected, expected_grads = _outputs_and_grads(model, input_ids_BT, seed=step)
        actual, actual_grads = _outputs_and_grads(compiled, input_ids_BT, seed=step)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        for name_and_param, got, want in zip(model.named_parameters(), actual_grads, expected_grads):
            assert (got is None) == (want is None), name_and_param[0]
            if want is not None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name_and_param[0])


@pytest.mark.parametrize(("use_grouped_mm", "capacity_factor"), [(True, None), (False, None), (True, 1.0)],
                         ids=["grouped_mm", "loop", "capacity"])
def test_topk_block_is_one_graph_that_routing_does_not_recompile(use_grouped_mm, capacity_factor):
    """The rows per expert change every step; neither the grouped GEMM nor the per-expert loop (whose
    split sizes are read from the device) may put them in the graph or its guards. Under a padded
    capacity (``pad_to_capacity``) every expert runs on exactly its capacity of rows: one graph too."""
    torch.manual_seed(0)
    model = MoETransformer(**TINY, gate="topk", top_k=2, capacity_factor=capacity_factor,
                           pad_to_capacity=capacity_factor is not None)
    block = model.blocks[0]
    block.ffn.experts.use_grouped_mm = use_grouped_mm
    x_BTD = torch.randn(2, 16, TINY["d_model"])
    cos_TR, sin_TR = (torch.ones(16, TINY["d_model"] // TINY["n_heads"] // 2),) * 2
    explanation = torch._dynamo.explain(block)(x_BTD, cos_TR, sin_TR)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(block, backend="aot_eager")
    compiled(x_BTD, cos_TR, sin_TR).sum().backward()
    routed = []
    with torch.compiler.set_stance("fail_on_recompile"):
        for seed in range(3):
            compiled(torch.randn(2, 16, TINY["d_model"], generator=torch.Generator().manual_seed(seed)), cos_TR, sin_TR)
            routed.append(block.ffn.tokens_per_expert.clone())
    assert not all(torch.equal(routed[0], other) for other in routed[1:])  # the routing did change


def test_a_capacity_block_compiles_whole_with_dynamic_shapes():
    """With ``dynamic=True`` the factor and the token count are symbolic: the capacity must stay plain
    arithmetic (an exact decimal fraction of the factor broke the graph there)."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="not causal"):
        model = MoETransformer(**TINY, gate="topk", top_k=2, capacity_factor=1.25, pad_to_capacity=True)
    block = model.blocks[0]
    cos_TR, sin_TR = (torch.ones(16, TINY["d_model"] // TINY["n_heads"] // 2),) * 2
    compiled = torch.compile(block, backend="aot_eager", dynamic=True, fullgraph=True)
    for batch in (2, 3):
        x_BTD = torch.randn(batch, 16, TINY["d_model"])
        torch.testing.assert_close(compiled(x_BTD, cos_TR, sin_TR), block(x_BTD, cos_TR, sin_TR))


def test_compile_blocks_trains_like_the_eager_model(tmp_path):
    """``MoETransformer(compile_blocks=True)`` under a Trainer, with the default (inductor) backend:
    the same losses as the eager model, and checkpoints with the eager model's parameter names."""
    data = torch.randint(0, TINY["vocab_size"], (24, 17), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)
    losses, states = {}, {}
    for compile_blocks in (False, True):
        L.seed_everything(0)
        model = MoETransformer(**TINY, compile_blocks=compile_blocks, warmup_steps=2)
        recorded = []

        class RecordLoss(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                recorded.append(float(outputs["loss"]))

        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordLoss()],
                            default_root_dir=tmp_path)
        trainer.fit(model, loader)
        losses[compile_blocks], states[compile_blocks] = recorded, model.state_dict()
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert states[True].keys() == states[False].keys()
    for name, value in states[False].items():
        torch.testing.assert_close(states[True][name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_compile_blocks_with_gradient_checkpointing_matches_eager(scope):
    """Checkpointed and compiled blocks: the checkpoint is traced inside the graph, so the routing is
    recorded once (not again, differently, in the recomputation) and the gradients, the aux losses'
    included, are the eager model's. With global-batch balancing pooling the micro-batches, the
    recomputation rebuilds the loss from the pool its forward saw, and the pool counts each once."""
    options = dict(gate_kwargs={"load_balance_scope": scope}, load_balance_coef=0.1)
    torch.manual_seed(0)
    eager = MoETransformer(**TINY, **options)
    torch.manual_seed(0)
    compiled = MoETransformer(**TINY, **options, gradient_checkpointing=True, compile_blocks=True)
    for model in (eager, compiled):
        model.configure_optimizers()  # registers the end of each global batch: the micro-batches below pool
    for step in range(2):
        input_ids_BT = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(step))
        expected, actual = (
            torch.autograd.grad(model(input_ids_BT).square().mean() + collect_aux_loss(model), list(model.parameters()))
            for model in (eager, compiled)
        )
        for (name, _), got, want in zip(eager.named_parameters(), actual, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
        for eager_block, compiled_block in zip(eager.blocks, compiled.blocks):
            assert torch.equal(compiled_block.ffn.tokens_per_expert, eager_block.ffn.tokens_per_expert)
            assert compiled_block.ffn.aux_losses.keys() == eager_block.ffn.aux_losses.keys()
            assert torch.equal(compiled_block.ffn.global_batch_load, eager_block.ffn.global_batch_load)
    pooled = int(compiled.blocks[0].ffn.global_batch_load.sum())
    assert pooled == (2 * 2 * 16 * 2 if scope == "global" else 0)  # micro-batches * B * T * top_k


def test_trainer_fits_the_compiled_module():
    """``trainer.fit(torch.compile(model))``, Lightning's own way to compile: Lightning compiles the
    training and validation steps, whose logging runs outside the compiler. The eager model's
    losses, validation loss and perplexity."""
    data = torch.randint(0, TINY["vocab_size"], (32, 17), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=4)
    results = {}
    for compiled in (False, True):
        L.seed_everything(0)
        model = MoETransformer(**TINY, warmup_steps=2)
        recorded = []

        class RecordLoss(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                recorded.append(float(outputs["loss"]))

        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=4, limit_val_batches=2,
                            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[RecordLoss()])
        trainer.fit(torch.compile(model, backend="aot_eager") if compiled else model, loader, loader)
        results[compiled] = (recorded, float(trainer.callback_metrics["val_loss"]), float(trainer.callback_metrics["val_ppl"]))
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-6)
