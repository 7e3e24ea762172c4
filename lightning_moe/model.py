"""``MoETransformer``: a decoder-only Mixture-of-Experts language model as a LightningModule.

The model holds no collectives: expert parallelism is applied from outside by
:class:`~lightning_moe.MoEStrategy`, which swaps each MoE layer's dispatcher.

Shape legend: ``B`` batch, ``T`` sequence length, ``D`` model width, ``V`` vocabulary, ``R`` rotary
frequencies.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import nn

from lightning_moe.layers.aux_loss import collect_aux_loss, collect_aux_losses
from lightning_moe.layers.balancing import register_global_batch_end
from lightning_moe.layers.experts import FeedForward
from lightning_moe.layers.gates import ExpertChoiceGate, Gate
from lightning_moe.layers.moe import MoELayer
from lightning_moe.modeling.block import NORM_EPS, DecoderBlock, moe_layer_layout
from lightning_moe.modeling.pretrained_io import PretrainedIO, init_defaults
from lightning_moe.modeling.build import build_attention, override_gate_coefficients
from lightning_moe.modeling.checkpointing import checkpointed_call, compiled_checkpointed_call
from lightning_moe.modeling.config import OWNER, check_transformer_config, gate_from_hparam, gate_to_hparam
from lightning_moe.modeling.freeze import freeze_by_pattern
from lightning_moe.modeling.optim import LR_SCHEDULES, weight_decay_groups
from lightning_moe.modeling.options import check_architecture_options, check_finetuning_options
from lightning_moe.modeling.rope import rotary_cos_sin


class MoETransformer(PretrainedIO, L.LightningModule):
    """A decoder-only language model whose feed-forward layers are Mixtures of Experts.

    Token embedding, ``n_layers`` pre-norm blocks (RMSNorm, causal attention with RoPE and optional
    grouped-query attention, then an MoE or dense feed-forward), a final RMSNorm and an output
    projection (optionally tied to the embedding). ``training_step`` minimises the next-token
    cross-entropy plus the weighted auxiliary losses of every MoE layer; AdamW with linear warmup
    and a cosine, linear or constant schedule.

    The architecture options after ``init_std`` (attention biases, query/key norms, head width,
    scaled RoPE, multi-head latent attention, an explicit MoE layer list) let the model reproduce
    Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3: :meth:`from_pretrained` reads a
    transformers checkpoint directory into it and :meth:`save_pretrained` writes one back (see
    docs/finetuning.md). Their defaults give the from-scratch architecture.

    Args:
        vocab_size: vocabulary size (256 for bytes).
        d_model: model width.
        n_layers: number of blocks.
        n_heads: query heads; ``d_model / n_heads`` must be even (RoPE) unless ``head_dim`` is set.
        n_kv_heads: key/value heads for grouped-query attention (Ainslie et al. 2023); ``None`` is
            ``n_heads`` (multi-head attention).
        d_ff: hidden width of the dense feed-forward layers.
        max_seq_len: longest sequence the model accepts.
        rope_theta: RoPE base (Su et al. 2021).
        tie_embeddings: share the output projection with the token embedding (Press & Wolf 2017).
        num_experts: routed experts per MoE layer.
        gate: gate name (``"topk"``, ...) or a :class:`~lightning_moe.layers.gates.Gate` instance
            (``class_path`` in YAML); each MoE layer gets its own copy. Checkpoints store an
            instance as a ``{"class_path", "init_args"}`` dict, which is accepted here too.
        top_k: experts per token, for named gates that take it.
        gate_kwargs: further keyword arguments of a named gate.
        activation: ``"swiglu"`` or ``"gelu"`` for every feed-forward.
        num_shared_experts: shared experts per MoE layer (DeepSeekMoE).
        shared_expert_d_ff: hidden width of the shared FFN; ``num_shared_experts * moe_d_ff`` by default.
        shared_expert_gate: sigmoid-gate the shared FFN (Qwen2-MoE).
        capacity_factor: ``None`` for dropless routing, else the expert capacity factor.
        pad_to_capacity: with a ``capacity_factor``, every expert runs on exactly its capacity of rows
            (see :class:`~lightning_moe.MoELayer`): static shapes, for more expert work.
        moe_d_ff: hidden width of each routed expert; ``d_ff`` by default (smaller for fine-grained experts).
        moe_every_n_layers: every n-th block after the dense ones is MoE (GLaM uses 2).
        first_k_dense: the first k blocks have a dense FFN (DeepSeek-V3 uses 3).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay of matrices (not of norms, biases, embeddings).
        warmup_steps: optimizer steps of linear warmup.
        min_lr_ratio: final learning rate of the cosine or linear decay, as a fraction of ``learning_rate``.
        adam_betas: AdamW betas.
        init_std: standard deviation of the normal initialisation of every weight matrix.
        head_dim: width of each attention head; ``d_model / n_heads`` by default (Qwen3-MoE sets it).
        attention_bias: biases on the query, key and value projections (on the two down-projections
            with multi-head latent attention).
        attention_out_bias: a bias on the attention output projection.
        qk_norm: ``None``; ``"head"`` for an RMSNorm over each head's queries and keys (Qwen3-MoE);
            ``"full"`` for one over the whole query and key projections (OLMoE).
        norm_eps: epsilon of every RMSNorm but the latent ones of multi-head latent attention, which
            use 1e-6 as DeepSeek-V3 and transformers do.
        rope_scaling: ``None`` for plain RoPE; ``{"rope_type": "linear", "factor": s}``, a YaRN dict
            (``{"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
            "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}``) or Llama 3's
            (``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}``): the keys of transformers' ``rope_parameters``.
            With multi-head latent attention, ``mscale_all_dim`` also multiplies the softmax scale by
            ``mscale**2`` as DeepSeek-V3 does.
        rope_interleave: rotate adjacent feature pairs instead of the two halves of a head (DeepSeek).
        q_lora_rank: query latent width of multi-head latent attention; ``None`` projects queries directly.
        kv_lora_rank: key/value latent width; setting it turns every block's attention into multi-head
            latent attention (DeepSeek-V2/V3) with the three head widths below.
        qk_nope_head_dim: per-head query/key features without position (MLA).
        qk_rope_head_dim: rotary query/key features per head (MLA).
        v_head_dim: per-head value width (MLA).
        moe_layer_indices: the blocks with an MoE feed-forward, replacing ``first_k_dense`` and
            ``moe_every_n_layers`` (which must then stay 0 and 1).
        lr_schedule: after warmup, ``"cosine"`` (to ``min_lr_ratio``), ``"linear"`` (to
            ``min_lr_ratio``) or ``"constant"``.
        load_balance_coef: when set, replaces the load-balancing loss coefficient of every MoE gate
            (``0.0`` turns it off); the gate must have one.
        z_loss_coef: when set, replaces the router z-loss coefficient of every MoE gate.
        freeze: parameter-name patterns to freeze (see
            :func:`~lightning_moe.modeling.freeze.freeze_by_pattern`): ``["*.attn.*"]``,
            ``["*", "!*.experts.*"]`` (train only the routed experts), ``["*.gate.weight"]``. Frozen
            parameters are left out of the optimizer.
        gradient_checkpointing: recompute each block's activations in the backward instead of keeping them.
        compile_blocks: compile each block with ``torch.compile`` (as torchtitan does: one graph per block,
            compiled once and reused by every block of the same shapes), on its first call. The routing
            changes nothing in the graphs: no recompilation from step to step. The parameter names and
            checkpoints are those of the uncompiled model.
        hf_config: the transformers ``config.json`` the model was read from (set by
            :meth:`from_pretrained`; :meth:`save_pretrained` writes it back).
        hf_source: the checkpoint directory the model was read from (its tokenizer files are copied on export).
        pretrained: a local transformers checkpoint directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
            DeepSeek-V3) to fine-tune: the architecture comes from its ``config.json`` (leave the
            architecture arguments out; one set to another value is an error), the other arguments
            are the fine-tuning options, and the weights are read when training starts (under
            :class:`~lightning_moe.MoEStrategy` each rank reads only its own experts). The way to
            fine-tune from a YAML recipe; ``MoETransformer.from_pretrained(path)`` reads them at once.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        n_kv_heads: int | None = None,
        d_ff: int = 512,
        max_seq_len: int = 1024,
        rope_theta: float = 10000.0,
        tie_embeddings: bool = False,
        num_experts: int = 8,
        gate: str | Gate = "topk",
        top_k: int = 2,
        gate_kwargs: dict[str, Any] | None = None,
        activation: str = "swiglu",
        num_shared_experts: int = 0,
        shared_expert_d_ff: int | None = None,
        shared_expert_gate: bool = False,
        capacity_factor: float | None = None,
        pad_to_capacity: bool = False,
        moe_d_ff: int | None = None,
        moe_every_n_layers: int = 1,
        first_k_dense: int = 0,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        init_std: float = 0.02,
        head_dim: int | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = NORM_EPS,
        rope_scaling: dict[str, Any] | None = None,
        rope_interleave: bool = False,
        q_lora_rank: int | None = None,
        kv_lora_rank: int | None = None,
        qk_nope_head_dim: int | None = None,
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        moe_layer_indices: list[int] | None = None,
        lr_schedule: str = "cosine",
        load_balance_coef: float | None = None,
        z_loss_coef: float | None = None,
        freeze: list[str] | None = None,
        gradient_checkpointing: bool = False,
        compile_blocks: bool = False,
        hf_config: dict[str, Any] | None = None,
        hf_source: str | None = None,
        pretrained: str | None = None,
    ) -> None:
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        if pretrained is not None:
            # The checkpoint's architecture, built on the meta device: no memory is used until the
            # weights are read (`configure_model`, or each rank's own experts under MoEStrategy).
            from lightning_moe.interop.hf_model import pretrained_arguments

            given = {name: value for name, value in arguments.items() if name != "pretrained"}
            resolved = pretrained_arguments(pretrained, given, init_defaults(MoETransformer))
            with torch.device("meta"):
                MoETransformer.__init__(self, **resolved)
            self._pretrained_source = self.hparams.hf_source
            return
        super().__init__()
        adam_betas = tuple(adam_betas)
        gate = gate_from_hparam(gate)
        if gate == "expert_choice" or isinstance(gate, ExpertChoiceGate):
            rank_zero_warn(
                f"{OWNER}: gate='expert_choice' is not causal: its experts choose among every token of the batch, "
                f"so a position's logits depend on later tokens (and on the other sequences). The training loss is "
                f"then optimistic, and generating one token at a time routes differently from training. Use "
                f"'topk' or 'sigmoid' for a language model you will sample from."
            )
        elif capacity_factor is not None:
            rank_zero_warn(
                f"{OWNER}: capacity_factor={capacity_factor!r} is not causal: an expert over capacity drops "
                f"assignments in priority order over the whole batch (GShard), so a position's logits can depend on "
                f"later tokens (and on the other sequences). The training loss is then slightly optimistic, and "
                f"generating one token at a time routes differently from training. Use capacity_factor=None "
                f"(dropless) for a language model you will sample from."
            )
        check_transformer_config(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            d_ff=d_ff,
            moe_d_ff=moe_d_ff,
            max_seq_len=max_seq_len,
            num_experts=num_experts,
            top_k=top_k,
            moe_every_n_layers=moe_every_n_layers,
            first_k_dense=first_k_dense,
            rope_theta=rope_theta,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            adam_betas=adam_betas,
            init_std=init_std,
            head_width_given=head_dim is not None or kv_lora_rank is not None,
        )
        mla_dims = dict(
            q_lora_rank=q_lora_rank,
            qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim,
            v_head_dim=v_head_dim,
        )
        check_architecture_options(
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            attention_bias=attention_bias,
            attention_out_bias=attention_out_bias,
            tie_embeddings=tie_embeddings,
            qk_norm=qk_norm,
            norm_eps=norm_eps,
            rope_scaling=rope_scaling,
            rope_interleave=rope_interleave,
            kv_lora_rank=kv_lora_rank,
            mla_dims=mla_dims,
            moe_layer_indices=moe_layer_indices,
            first_k_dense=first_k_dense,
            moe_every_n_layers=moe_every_n_layers,
        )
        check_finetuning_options(
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
            freeze=freeze,
            lr_schedule=lr_schedule,
            gradient_checkpointing=gradient_checkpointing,
            compile_blocks=compile_blocks,
            hf_config=hf_config,
            hf_source=hf_source,
        )
        # NOTE: the arguments are saved explicitly (not read from the call frames), so that a model built
        # with `pretrained` saves the resolved architecture: its checkpoints load without the source.
        # What LightningCLI adds (`_class_path`, `_instantiator`) is kept: its `--ckpt_path` reads the
        # class from them.
        from_cli = {key: value for key, value in (_given_hyperparameters.get() or {}).items() if key.startswith("_")}
        # A subclass's own `__init__` arguments (the frames that called this one), as Lightning's
        # `save_hyperparameters()` collects them, so that `load_from_checkpoint` rebuilds the subclass.
        subclass = {}
        for frame_arguments in collect_init_args(inspect.currentframe().f_back, [], classes=(MoETransformer,)):
            subclass.update(frame_arguments)
        self.save_hyperparameters(
            {**subclass, **arguments, "adam_betas": adam_betas, "gate": gate_to_hparam(gate), **from_cli}
        )
        del self.hparams["pretrained"]
        self.max_seq_len, self.rope_theta, self.rope_scaling = max_seq_len, rope_theta, rope_scaling
        self.head_dim = head_dim or d_model // n_heads
        #: Width of the rotated part of each query and key head.
        self.rotary_dim = qk_rope_head_dim if kv_lora_rank is not None else self.head_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.compile_blocks = compile_blocks
        #: Whether each block's feed-forward is an MoE layer.
        self.moe_layout = moe_layer_layout(
            n_layers=n_layers,
            first_k_dense=first_k_dense,
            moe_every_n_layers=moe_every_n_layers,
            moe_layer_indices=moe_layer_indices,
        )

        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=init_std)
        blocks = []
        for is_moe in self.moe_layout:
            if is_moe:
                feed_forward: nn.Module = MoELayer(
                    d_model=d_model,
                    d_ff=moe_d_ff or d_ff,
                    num_experts=num_experts,
                    gate=gate,
                    top_k=top_k,
                    gate_kwargs=gate_kwargs,
                    activation=activation,
                    num_shared_experts=num_shared_experts,
                    shared_expert_d_ff=shared_expert_d_ff,
                    shared_expert_gate=shared_expert_gate,
                    capacity_factor=capacity_factor,
                    pad_to_capacity=pad_to_capacity,
                    init_std=init_std,
                )
                override_gate_coefficients(feed_forward.gate, load_balance_coef, z_loss_coef)
            else:
                feed_forward = FeedForward(d_model=d_model, d_ff=d_ff, activation=activation, init_std=init_std)
            # NOTE: the attention is created after the feed-forward, the order the from-scratch
            # model always drew its initial weights in (so that a seed gives the same model).
            blocks.append(DecoderBlock(d_model=d_model, attention=build_attention(self.hparams),
                                       feed_forward=feed_forward,
                                       norm_eps=norm_eps))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=init_std)
        if freeze:
            freeze_by_pattern(self, freeze, owner=f"{OWNER} `freeze`")
        if compile_blocks:
            for block in self.blocks:
                # In place (`nn.Module.compile`): the module tree, its parameter names and its state dict
                # stay those of the uncompiled model, so checkpoints do not depend on the flag.
                block.compile()
        self._eval_loss_sum: torch.Tensor | None = None
        self._eval_tokens = 0
        #: The checkpoint directory whose weights are still to be read (a model built with `pretrained`).
        self._pretrained_source: str | None = None

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` for token ids ``[B, T]``."""
        if input_ids_BT.dim() != 2:
            raise ValueError(f"{OWNER} expects token ids of shape [batch, seq_len], got {tuple(input_ids_BT.shape)}.")
        seq_len = input_ids_BT.shape[1]
        if seq_len > self.max_seq_len:
            raise ValueError(
                f"{OWNER}: sequence length {seq_len} exceeds `max_seq_len` ({self.max_seq_len}). "
                f"Raise `max_seq_len` or shorten the data's `seq_len`."
            )
        cos_TR, sin_TR = rotary_cos_sin(
            seq_len, self.rotary_dim, theta=self.rope_theta, rope_scaling=self.rope_scaling, device=input_ids_BT.device
        )
        x_BTD = self.embed(input_ids_BT)
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        checkpointed = compiled_checkpointed_call if self.compile_blocks else checkpointed_call
        for block in self.blocks:
            x_BTD = checkpointed(block, x_BTD, cos_TR, sin_TR) if checkpointing else block(x_BTD, cos_TR, sin_TR)
        return self.lm_head(self.norm(x_BTD))  # (B, T, V)

    def language_model_loss(self, batch: Any) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy of a batch ``(inputs [B, T], targets [B, T])``, and its token count.

        Targets equal to -100 are ignored (padding, and the user turns of a chat): a batch with none
        left has loss 0 (a window inside a long user turn), not NaN.
        """
        loss, tokens = self._next_token_loss(batch)
        return loss, int(tokens)

    def _next_token_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`language_model_loss` with the token count left on the device (a 0-d tensor): reading
        it would make the host wait for the forward at every step, on a GPU."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(
                f"{OWNER} expects batches of (input_ids, target_ids), each [batch, seq_len], got "
                f"{type(batch).__name__}. "
                f"Use a lightning_moe data module or yield such pairs."
            )
        input_ids_BT, target_ids_BT = batch
        logits_BTV = self(input_ids_BT)
        # Cross-entropy in fp32: bf16 log-softmax over a large vocabulary loses precision. The sum over
        # at least one token: PyTorch's mean over no target is 0 / 0.
        tokens = (target_ids_BT != -100).sum()
        loss_sum = F.cross_entropy(
            logits_BTV.flatten(0, 1).float(), target_ids_BT.flatten(), ignore_index=-100, reduction="sum"
        )
        return loss_sum / tokens.clamp(min=1), tokens

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ce_loss, _ = self._next_token_loss(batch)
        aux_loss = collect_aux_loss(self)
        loss = ce_loss + aux_loss
        self._log_training(loss, ce_loss.detach(), aux_loss.detach())
        return loss

    # NOTE: logging runs outside the compiler: `trainer.fit(torch.compile(model))` makes Lightning
    # compile the steps, and torch 2.13's compiler fails inside `LightningModule.log`.
    @torch.compiler.disable
    def _log_training(self, loss: torch.Tensor, ce_loss: torch.Tensor, aux_loss: torch.Tensor) -> None:
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_ppl", torch.exp(ce_loss))
        self.log("train/ce_loss", ce_loss)
        self.log("train/weighted_aux_loss", aux_loss)
        for name, value in collect_aux_losses(self).items():
            self.log(f"train/{name}", value)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_loss_sum, self._eval_tokens = None, 0

    def on_test_epoch_start(self) -> None:
        self._eval_loss_sum, self._eval_tokens = None, 0

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _evaluation_step(self, batch: Any, stage: str) -> None:
        loss, tokens = self._next_token_loss(batch)
        weighted = loss.detach() * tokens
        self._eval_loss_sum = weighted if self._eval_loss_sum is None else self._eval_loss_sum + weighted
        self._eval_tokens += tokens

    def _log_evaluation(self, stage: str) -> None:
        """Log the token-weighted mean loss over every rank's evaluation tokens (``{stage}_loss``) and
        its ``exp`` (``{stage}_ppl``).

        NOTE: a mean of per-batch means would weight a batch of few targets like a full one, and a
        batch with none (a window inside a long user turn of a chat, loss 0) would pull the loss
        down; averaging each rank's ``exp(loss)`` would overstate the perplexity (Jensen). The sums
        are reduced instead. Every rank joins the reduction, even one that evaluated no batch.
        """
        device = self.device if self._eval_loss_sum is None else self._eval_loss_sum.device
        loss_sum = torch.zeros((), device=device) if self._eval_loss_sum is None else self._eval_loss_sum.float()
        tokens = torch.as_tensor(self._eval_tokens, dtype=loss_sum.dtype, device=device)  # 0, or a sum on the device
        totals = torch.stack([loss_sum, tokens])
        if self._trainer is not None and self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        if totals[1] > 0:
            # Identical on every rank already; `sync_dist` averages equal values (a no-op) and keeps
            # Lightning's check for unsynced epoch-level metrics quiet.
            mean_loss = totals[0] / totals[1]
            self.log(f"{stage}_loss", mean_loss, prog_bar=True, sync_dist=True)
            self.log(f"{stage}_ppl", torch.exp(mean_loss), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hparams = self.hparams
        groups = [group for group in weight_decay_groups(self, hparams.weight_decay) if group["params"]]
        if not groups:
            raise ValueError(
                f"{OWNER}: every parameter is frozen (`freeze`={hparams.freeze!r}), so there is nothing to train. "
                f"Unfreeze some with a '!pattern'."
            )
        optimizer = torch.optim.AdamW(groups, lr=hparams.learning_rate, betas=tuple(hparams.adam_betas))
        # Each step ends a global batch: bias-balanced gates update (Wang et al. 2024), and global
        # load-balancing losses pool the micro-batches of gradient accumulation until then.
        register_global_batch_end(optimizer, self)
        total_steps = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        schedule = functools.partial(
            LR_SCHEDULES[hparams.lr_schedule],
            warmup_steps=hparams.warmup_steps,
            total_steps=float(total_steps),
            min_lr_ratio=hparams.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def num_parameters(self, *, active: bool = False) -> int:
        """Parameter count; ``active=True`` counts only ``top_k`` of each layer's routed experts
        (the parameters one token passes through)."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if not active:
            return total
        for block in self.blocks:
            if block.is_moe:
                experts = block.ffn.experts
                per_expert = (experts.w_in.numel() + experts.w_out.numel()) // experts.num_experts
                used = getattr(block.ffn.gate, "top_k", self.hparams.top_k)
                total -= per_expert * (experts.num_experts - min(used, experts.num_experts))
        return total

