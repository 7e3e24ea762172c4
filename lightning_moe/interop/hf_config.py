"""transformers ``config.json`` <-> :class:`~lightning_moe.MoETransformer` keyword arguments.

=================  ==========================================================================
``model_type``     what maps to what (besides sizes, RoPE, norms, tied embeddings)
=================  ==========================================================================
``mixtral``        ``TopKGate(normalize=True)``; every block MoE; ``sliding_window`` caps
                   ``max_seq_len`` (within the window attention is full)
``qwen2_moe``      ``TopKGate(normalize=norm_topk_prob)``; ``qkv_bias`` -> ``attention_bias``;
                   shared expert with its sigmoid gate; ``decoder_sparse_step`` and
                   ``mlp_only_layers`` -> the MoE layer layout
``qwen3_moe``      as Qwen2-MoE without the shared expert; ``qk_norm="head"``; ``head_dim``;
                   ``attention_bias`` on q, k, v and o
``olmoe``          ``TopKGate(normalize=norm_topk_prob)``; ``qk_norm="full"``;
                   ``attention_bias`` on q, k, v and o
``deepseek_v3``    multi-head latent attention; ``rope_interleave``; YaRN; ``first_k_dense_replace``;
                   ``SigmoidGate`` (groups, correction bias, ``routed_scaling_factor``); shared experts
=================  ==========================================================================

Gates start with every aux-loss coefficient at 0 and DeepSeek-V3's bias updates off, so that the
model computes what the checkpoint computes; fine-tuning sets them (``load_balance_coef``,
``z_loss_coef``, ``gate_kwargs``). A config key that is absent takes transformers' default for the
family; the sizes must be present.
"""

from __future__ import annotations

from typing import Any

from lightning_moe.layers.gates import Gate, SigmoidGate, TopKGate
from lightning_moe.modeling.block import moe_layer_layout
from lightning_moe.modeling.rope import ROPE_SCALING_KEYS

#: Supported ``model_type`` values and the transformers class each exports as.
HF_ARCHITECTURES: dict[str, str] = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

#: transformers' defaults for keys a config.json may leave out (the sizes are required).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None},
    "qwen2_moe": {
        "rope_theta": 1e4, "rms_norm_eps": 1e-6, "qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": False, "use_sliding_window": False,
    },
    "qwen3_moe": {
        "rope_theta": 1e4, "rms_norm_eps": 1e-6, "attention_bias": False, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "norm_topk_prob": False, "use_sliding_window": False,
    },
    "olmoe": {"rope_theta": 1e4, "rms_norm_eps": 1e-5, "attention_bias": False, "clip_qkv": None, "norm_topk_prob": False},
    "deepseek_v3": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "rope_interleave": True, "attention_bias": False},
}
#: The value of each architecture argument of MoETransformer that a family without the feature
#: leaves at "off". Every family's arguments start from these, so that every architecture argument
#: has the checkpoint's value, and `pretrained_arguments` refuses an override that differs from it
#: (one it did not see, such as rope_interleave=True on a Mixtral, would silently change the model).
_FEATURES_OFF: dict[str, Any] = dict(
    head_dim=None, attention_bias=False, attention_out_bias=False, qk_norm=None, rope_interleave=False,
    q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None,
    num_shared_experts=0, shared_expert_d_ff=None, shared_expert_gate=False, first_k_dense=0, moe_every_n_layers=1,
    moe_layer_indices=None,
)
#: The ``hidden_act`` names of SiLU in transformers (``ACT2FN["swish"]`` is SiLU too).
_SILU_NAMES = ("silu", "swish")
#: Keys that name the same quantity in different transformers versions (first: what we write).
_ALIASES = {"num_experts": ("num_experts", "num_local_experts"), "dtype": ("dtype", "torch_dtype")}


class _Config:
    """Read access to a config.json dict with the family's defaults and errors that name the key."""

    def __init__(self, config: dict[str, Any], source: str) -> None:
        self.config, self.source = config, source
        self.model_type = config["model_type"]

    def __getitem__(self, key: str) -> Any:
        for alias in _ALIASES.get(key, (key,)):
            if alias in self.config:
                return self.config[alias]
        if key in _DEFAULTS[self.model_type]:
            return _DEFAULTS[self.model_type][key]
        raise ValueError(
            f"{self.source}: config.json of model_type {self.model_type!r} has no `{key}`. "
            f"Save the config with transformers' `save_pretrained`, which writes every field."
        )

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def refuse(self, what: str, fix: str) -> ValueError:
        return ValueError(f"{self.source}: {what} is not supported by MoETransformer. {fix}")


def check_hf_config(config: Any, source: str) -> str:
    """The ``model_type`` of a config.json dict, after checking that it is one we read."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}. MoETransformer reads {sorted(HF_ARCHITECTURES)} "
            f"checkpoints."
        )
    return model_type


def _rope(c: _Config) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from transformers 5's ``rope_parameters`` or the older
    top-level ``rope_theta`` and ``rope_scaling`` (``type`` or ``rope_type``)."""
    parameters = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    theta = float(parameters.pop("rope_theta", c.get("rope_theta", _DEFAULTS[c.model_type]["rope_theta"])))
    rope_type = parameters.pop("rope_type", parameters.pop("type", "default"))
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise c.refuse(f"partial_rotary_factor={parameters['partial_rotary_factor']}", "Every head dimension is rotated.")
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_KEYS:
        raise c.refuse(f"rope_type {rope_type!r}", f"Supported: 'default', {sorted(ROPE_SCALING_KEYS)}.")
    scaling = {"rope_type": rope_type, **{k: v for k, v in parameters.items() if k in ROPE_SCALING_KEYS[rope_type]}}
    if rope_type == "yarn" and scaling.get("factor") is None:
        # transformers' rule when the factor is left out: the ratio of the two context lengths.
        scaling["factor"] = c["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return theta, {k: v for k, v in scaling.items() if v is not None}


def _layout(n_layers: int, moe_flags: list[bool]) -> dict[str, Any]:
    """The fewest layout arguments that give ``moe_flags``."""
    for first_k_dense in range(n_layers + 1):
        for every in range(1, max(2, n_layers - first_k_dense + 1)):
            if moe_layer_layout(n_layers=n_layers, first_k_dense=first_k_dense, moe_every_n_layers=every) == moe_flags:
                return {"first_k_dense": first_k_dense, "moe_every_n_layers": every}
    return {"moe_layer_indices": [index for index, is_moe in enumerate(moe_flags) if is_moe]}


def model_kwargs_from_hf_config(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """:class:`~lightning_moe.MoETransformer` keyword arguments that reproduce a transformers model:
    every architecture argument, those of features the family lacks at their "off" value.

    Args:
        config: the parsed ``config.json``.
        source: where it came from, for error messages.

    Raises:
        ValueError: for another ``model_type`` or a feature the model cannot reproduce (quantized
            weights, an activation other than SiLU, ``clip_qkv``, ...), naming it.
    """
    model_type = check_hf_config(config, source)
    c = _Config(config, source)
    if c.get("quantization_config"):
        method = c.get("quantization_config").get("quant_method", "?")
        raise c.refuse(f"a quantized checkpoint (quant_method {method!r})", "Dequantize it to bf16 first.")
    if c.get("hidden_act", "silu") not in _SILU_NAMES:
        raise c.refuse(f"hidden_act {c.get('hidden_act')!r}", "Only SiLU-gated (SwiGLU) feed-forwards convert.")
    theta, rope_scaling = _rope(c)
    n_layers, n_heads = c["num_hidden_layers"], c["num_attention_heads"]
    kwargs: dict[str, Any] = dict(
        **_FEATURES_OFF,
        vocab_size=c["vocab_size"],
        d_model=c["hidden_size"],
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        max_seq_len=c["max_position_embeddings"],
        rope_theta=theta,
        rope_scaling=rope_scaling,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        norm_eps=float(c["rms_norm_eps"]),
        init_std=float(c.get("initializer_range", 0.02)),
        activation="swiglu",
        top_k=c["num_experts_per_tok"],
    )
    if c.get("head_dim") is not None and model_type != "deepseek_v3":
        kwargs["head_dim"] = c["head_dim"]
    no_aux = dict(load_balance_coef=0.0, z_loss_coef=0.0)

    if model_type == "mixtral":
        kwargs.update(num_experts=c["num_experts"], d_ff=c["intermediate_size"], moe_d_ff=c["intermediate_size"],
                      gate=TopKGate(top_k=kwargs["top_k"], normalize=True, **no_aux))
        window = c["sliding_window"]
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        step, dense = c["decoder_sparse_step"], set(c["mlp_only_layers"])
        flags = [index not in dense and (index + 1) % step == 0 for index in range(n_layers)]
        kwargs.update(
            num_experts=c["num_experts"], d_ff=c["intermediate_size"], moe_d_ff=c["moe_intermediate_size"],
            gate=TopKGate(top_k=kwargs["top_k"], normalize=bool(c["norm_topk_prob"]), **no_aux), **_layout(n_layers, flags),
        )
        if model_type == "qwen2_moe":
            kwargs.update(attention_bias=bool(c["qkv_bias"]))
            if c["shared_expert_intermediate_size"]:  # 0: an empty one (as `lightning-moe upcycle` writes)
                kwargs.update(shared_expert_d_ff=c["shared_expert_intermediate_size"], shared_expert_gate=True)
        else:
            kwargs.update(qk_norm="head", attention_bias=bool(c["attention_bias"]),
                          attention_out_bias=bool(c["attention_bias"]))
        window = c["sliding_window"] if c["use_sliding_window"] else None
    elif model_type == "olmoe":
        if c["clip_qkv"] is not None:
            raise c.refuse(f"clip_qkv={c['clip_qkv']}", "Use a checkpoint trained without query/key/value clipping.")
        if kwargs.get("head_dim") not in (None, c["hidden_size"] // n_heads):
            raise c.refuse(f"head_dim={kwargs['head_dim']}", "OLMoE's query norm spans hidden_size features.")
        kwargs.update(
            num_experts=c["num_experts"], d_ff=c["intermediate_size"], moe_d_ff=c["intermediate_size"], qk_norm="full",
            attention_bias=bool(c["attention_bias"]), attention_out_bias=bool(c["attention_bias"]),
            gate=TopKGate(top_k=kwargs["top_k"], normalize=bool(c["norm_topk_prob"]), **no_aux),
        )
        window = None
    else:
        kwargs.update(_deepseek_v3_kwargs(c, kwargs["top_k"]))
        window = None
    if window:
        # Within the window a sliding-window model attends to every earlier token, as full causal
        # attention does: capping the length keeps the two the same model.
        kwargs["max_seq_len"] = min(kwargs["max_seq_len"], int(window))
    return kwargs


def _deepseek_v3_kwargs(c: _Config, top_k: int) -> dict[str, Any]:
    if c.get("scoring_func", "sigmoid") != "sigmoid" or c.get("topk_method", "noaux_tc") != "noaux_tc":
        raise c.refuse(
            f"scoring_func {c.get('scoring_func')!r} with topk_method {c.get('topk_method')!r}",
            "DeepSeek-V3 routing is scoring_func='sigmoid', topk_method='noaux_tc'.",
        )
    n_heads = c["num_attention_heads"]
    if (c.get("num_key_value_heads") or n_heads) != n_heads:
        raise c.refuse(
            f"num_key_value_heads={c.get('num_key_value_heads')} with {n_heads} heads",
            "Multi-head latent attention gives every head its own keys; set num_key_value_heads = num_attention_heads.",
        )
    n_group, topk_group, num_experts = c["n_group"], c["topk_group"], c["n_routed_experts"]
    gate = SigmoidGate(
        top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=float(c["routed_scaling_factor"]),
        normalize=bool(c["norm_topk_prob"]), bias_update_rate=0.0, sequence_balance_coef=0.0, load_balance_coef=0.0,
        dropped_group_fill=installed_dropped_group_fill(num_experts, n_group, topk_group, top_k),
    )
    shared = c["n_shared_experts"] or 0
    return dict(
        num_experts=num_experts, d_ff=c["intermediate_size"], moe_d_ff=c["moe_intermediate_size"],
        # transformers makes block i MoE when i >= first_k_dense_replace, so a larger value is all-dense.
        first_k_dense=min(c["first_k_dense_replace"], c["num_hidden_layers"]), num_shared_experts=shared,
        shared_expert_d_ff=shared * c["moe_intermediate_size"] or None, gate=gate, n_kv_heads=None,
        q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
        qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"], rope_interleave=bool(c["rope_interleave"]),
        attention_bias=bool(c["attention_bias"]), attention_out_bias=bool(c["attention_bias"]),
    )


def installed_dropped_group_fill(num_experts: int, n_group: int, topk_group: int, top_k: int) -> float:
    """The score the installed transformers gives DeepSeek-V3 experts of dropped groups (0.0 or -inf),
    measured on a tiny router as :func:`lightning_moe.interop.hf._dropped_group_fill` does; ``-inf``
    (transformers >= 5) without transformers or without groups."""
    if n_group <= 1:
        return float("-inf")
    try:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    except ImportError:
        return float("-inf")
    from lightning_moe.interop.hf import _dropped_group_fill

    config = DeepseekV3Config(
        hidden_size=8, num_attention_heads=1, num_key_value_heads=1, n_routed_experts=num_experts, n_group=n_group,
        topk_group=topk_group, num_experts_per_tok=top_k,
    )
    return _dropped_group_fill(DeepseekV3TopkRouter(config))


# ---------------------------------------------------------------------------------------------
# Export: MoETransformer hyper-parameters -> config.json
# ---------------------------------------------------------------------------------------------


def _gate_of(model: Any) -> Gate | None:
    layers = [block.ffn for block in model.blocks if block.is_moe]
    return layers[0].gate if layers else None


def hf_model_type(model: Any) -> str:
    """The family a model exports as: the one it was read from, else the closest one to its options."""
    hp = model.hparams
    if hp.get("hf_config"):
        return hp.hf_config["model_type"]
    if hp.kv_lora_rank is not None or isinstance(_gate_of(model), SigmoidGate):
        return "deepseek_v3"
    if hp.shared_expert_gate:
        return "qwen2_moe"
    return {"head": "qwen3_moe", "full": "olmoe"}.get(hp.qk_norm, "mixtral")


def _shared_d_ff(model: Any) -> int:
    for block in model.blocks:
        if block.is_moe and block.ffn.shared_experts is not None:
            return block.ffn.shared_experts.w_out.in_features
    return 0


def hf_config_fields(model: Any) -> tuple[str, dict[str, Any]]:
    """``(model_type, fields)``: the config.json fields that describe ``model``'s architecture.

    Raises:
        ValueError: naming each option the family cannot express, and how to fix it.
    """
    hp = model.hparams
    model_type = hf_model_type(model)
    gate = _gate_of(model)
    moe_flags = list(model.moe_layout)
    dense_layers = [index for index, is_moe in enumerate(moe_flags) if not is_moe]
    shared_d_ff = _shared_d_ff(model)
    moe_d_ff = hp.moe_d_ff or hp.d_ff
    problems: list[str] = []

    def require(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)

    require(hp.activation == "swiglu", f"activation={hp.activation!r} (needs 'swiglu')")
    require(gate is not None, "no MoE layer")
    wants_sigmoid = model_type == "deepseek_v3"
    require(isinstance(gate, SigmoidGate if wants_sigmoid else TopKGate),
            f"gate {type(gate).__name__} (needs {'SigmoidGate' if wants_sigmoid else 'TopKGate'})")
    require((hp.kv_lora_rank is not None) == wants_sigmoid,
            "multi-head latent attention (kv_lora_rank) only with DeepSeek-V3's sigmoid gate, and DeepSeek-V3 needs it")
    fields: dict[str, Any] = dict(
        vocab_size=hp.vocab_size, hidden_size=hp.d_model, num_hidden_layers=hp.n_layers,
        num_attention_heads=hp.n_heads, num_key_value_heads=hp.n_kv_heads or hp.n_heads, hidden_act="silu",
        rms_norm_eps=hp.norm_eps, tie_word_embeddings=hp.tie_embeddings, initializer_range=hp.init_std,
        num_experts_per_tok=getattr(gate, "top_k", hp.top_k),
    )
    if not hp.get("hf_config"):
        fields["max_position_embeddings"] = hp.max_seq_len
    normalize = getattr(gate, "normalize", None)
    if model_type != "deepseek_v3":
        require(not hp.rope_interleave, "rope_interleave=True")
        # Always written: transformers' Mixtral config leaves a missing head_dim None (its attention
        # then takes hidden_size / heads, but its YaRN setup multiplies by it and fails).
        fields["head_dim"] = model.head_dim
    if model_type in ("mixtral", "olmoe"):
        require(not dense_layers, f"dense blocks {dense_layers} (every block must be MoE)")
        require(shared_d_ff == 0, "shared experts")
        fields.update(intermediate_size=moe_d_ff, num_experts=hp.num_experts)
    if model_type == "mixtral":
        require(normalize is True, "TopKGate(normalize=False) (Mixtral renormalises the top-k weights)")
        require(not (hp.attention_bias or hp.attention_out_bias), "attention biases")
        require(hp.qk_norm is None, f"qk_norm={hp.qk_norm!r}")
        fields["num_local_experts"] = fields.pop("num_experts")
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        fields.update(intermediate_size=hp.d_ff, moe_intermediate_size=moe_d_ff, num_experts=hp.num_experts,
                      norm_topk_prob=bool(normalize), decoder_sparse_step=1, mlp_only_layers=dense_layers)
        if model_type == "qwen2_moe":
            require((shared_d_ff > 0) == bool(hp.shared_expert_gate),
                    "a shared expert without a sigmoid gate, or a gate without one (Qwen2-MoE gates its shared "
                    "expert, or has an empty one)")
            require(not hp.attention_out_bias, "attention_out_bias=True")
            require(hp.qk_norm is None, f"qk_norm={hp.qk_norm!r}")
            fields.update(shared_expert_intermediate_size=shared_d_ff, qkv_bias=hp.attention_bias)
        else:
            require(hp.qk_norm == "head", f"qk_norm={hp.qk_norm!r} (Qwen3-MoE normalises each head: 'head')")
            require(shared_d_ff == 0, "shared experts")
            require(hp.attention_bias == hp.attention_out_bias, "attention_bias != attention_out_bias")
            fields.update(attention_bias=hp.attention_bias)
    elif model_type == "olmoe":
        require(hp.qk_norm == "full", f"qk_norm={hp.qk_norm!r} (OLMoE normalises whole projections: 'full')")
        require(hp.head_dim in (None, hp.d_model // hp.n_heads), f"head_dim={hp.head_dim}")
        require(hp.attention_bias == hp.attention_out_bias, "attention_bias != attention_out_bias")
        fields.update(norm_topk_prob=bool(normalize), attention_bias=hp.attention_bias, clip_qkv=None)
    elif model_type == "deepseek_v3":
        first_k = next((index for index, is_moe in enumerate(moe_flags) if is_moe), len(moe_flags))
        require(all(moe_flags[first_k:]), f"dense blocks {dense_layers} (only the first blocks may be dense)")
        # No shared expert is n_shared_experts=0 (transformers then builds an empty one).
        require(shared_d_ff % moe_d_ff == 0 and not hp.shared_expert_gate,
                "shared experts that are not a whole number of ungated experts")
        require(hp.attention_bias == hp.attention_out_bias, "attention_bias != attention_out_bias")
        if isinstance(gate, SigmoidGate):
            if gate.n_group > 1:  # which value the dropped groups' experts get decides the routing
                installed = installed_dropped_group_fill(hp.num_experts, gate.n_group, gate.topk_group, gate.top_k)
                require(gate.dropped_group_fill == installed,
                        f"dropped_group_fill={gate.dropped_group_fill} (the installed transformers fills dropped "
                        f"groups with {installed})")
            fields.update(n_group=gate.n_group, topk_group=gate.topk_group,
                          routed_scaling_factor=gate.routed_scaling_factor, norm_topk_prob=bool(normalize))
        fields.update(
            intermediate_size=hp.d_ff, moe_intermediate_size=moe_d_ff, n_routed_experts=hp.num_experts,
            n_shared_experts=shared_d_ff // moe_d_ff, first_k_dense_replace=first_k, q_lora_rank=hp.q_lora_rank,
            kv_lora_rank=hp.kv_lora_rank, qk_nope_head_dim=hp.qk_nope_head_dim, qk_rope_head_dim=hp.qk_rope_head_dim,
            v_head_dim=hp.v_head_dim, head_dim=hp.qk_rope_head_dim, rope_interleave=hp.rope_interleave,
            attention_bias=hp.attention_bias, num_key_value_heads=hp.n_heads,
        )
        if hp.qk_rope_head_dim is not None and hp.qk_nope_head_dim is not None:
            fields["qk_head_dim"] = hp.qk_nope_head_dim + hp.qk_rope_head_dim
    if problems:
        raise ValueError(
            f"MoETransformer cannot be written as a transformers {model_type!r} model: "
            + "; ".join(problems)
            + ". Export a model whose options match the family (see docs/finetuning.md), or train one that does."
        )
    return model_type, fields


def hf_config_from_model(model: Any, *, dtype_name: str) -> dict[str, Any]:
    """The ``config.json`` dict of ``model``: the one it was read from (unknown keys kept) updated
    with its architecture, or a new one for a model trained from scratch."""
    model_type, fields = hf_config_fields(model)
    hp = model.hparams
    config = dict(hp.get("hf_config") or {})
    config.update(model_type=model_type, architectures=[HF_ARCHITECTURES[model_type]])
    for key, value in fields.items():
        aliases = _ALIASES.get(key, (key,))
        present = [alias for alias in aliases if alias in config] or [aliases[0]]
        for alias in present:
            config[alias] = value
    for alias in [a for a in _ALIASES["dtype"] if a in config] or ["dtype"]:
        config[alias] = dtype_name
    scaling = dict(hp.rope_scaling or {"rope_type": "default"})
    if "rope_parameters" in config or "rope_theta" not in config:
        config["rope_parameters"] = {"rope_theta": hp.rope_theta, **scaling}
        config.pop("rope_scaling", None)
    else:  # the older layout (top-level rope_theta, rope_scaling with `type`), kept as the source had it
        config["rope_theta"] = hp.rope_theta
        config["rope_scaling"] = None if hp.rope_scaling is None else {"type": scaling.pop("rope_type"), **scaling}
    return config
