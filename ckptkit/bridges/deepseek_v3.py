"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; R1, Kimi K2, Moonlight) and DeepSeek-V2
(``DeepseekV2ForCausalLM``): multi-latent attention (MLA) and DeepSeek's mixture of experts.

Attention, Hugging Face <-> Megatron-Core (``--multi-latent-attention``, local spec), weights
unchanged::

    q_a_proj            linear_q_down_proj      (q_lora_rank; without it q_proj <-> linear_q_proj)
    q_a_layernorm       q_layernorm
    q_b_proj            linear_q_up_proj        per head [qk_nope_head_dim; qk_rope_head_dim] rows
    kv_a_proj_with_mqa  linear_kv_down_proj     [kv_lora_rank; qk_rope_head_dim] rows
    kv_a_layernorm      kv_layernorm
    kv_b_proj           linear_kv_up_proj       per head [qk_nope_head_dim; v_head_dim] rows
    o_proj              linear_proj

Both rotate the rotary dims as interleaved pairs (transformers' ``rope_interleave``,
Megatron's ``mla_rotary_interleaved``), so no row is permuted. YaRN is Megatron's MLA YaRN
(``--rope-type yarn --rotary-scaling-factor F --mscale M --mscale-all-dim A``), whose
original length 4096 and betas 32/1 are fixed (:mod:`ckptkit.megatron_args`).

Routing. V3: sigmoid scores; ``e_score_correction_bias`` (Megatron's expert bias) is added
for the choice only; the top-k come from the best ``topk_group`` of ``n_group`` groups,
each group scored by the sum of its top 2; the chosen weights are renormalised and scaled
by ``routed_scaling_factor``. Megatron scores a group by the sum of its top ``topk //
group_topk`` (megatron/core/transformer/moe/moe_utils.py, ``group_limited_topk``) and
renormalises the chosen sigmoid weights whenever k > 1: the two agree when
``num_experts_per_tok // topk_group == 2`` and ``norm_topk_prob == (k > 1)``. V2: a softmax
over all experts, the top k unrenormalised (``topk_method: greedy``; Megatron's
``--moe-router-pre-softmax``), scaled by ``routed_scaling_factor``; ``group_limited_greedy``
scores a group by its best expert, which Megatron does when ``topk // topk_group == 1``.

``n_shared_experts`` experts of ``moe_intermediate_size`` form one shared expert without a
gate; the first ``first_k_dense_replace`` layers are dense MLPs of ``intermediate_size``.
``e_score_correction_bias`` is float32 whatever the model's dtype, as Megatron keeps its expert
bias (transformers keeps it so too); the router weight is in the model's dtype, as Megatron
trains it (transformers upcasts both on load).

Multi-token prediction (V3's ``num_nextn_predict_layers``, Megatron's ``--mtp-num-layers``):
the Hub keeps depth D as one more layer, ``model.layers.{num_hidden_layers + D}``, which
transformers does not load. Megatron <-> Hub::

    mtp.layers.D.enorm / hnorm              model.layers.{N+D}.enorm / hnorm
    mtp.layers.D.eh_proj                    model.layers.{N+D}.eh_proj     [hidden, 2 x hidden]
    mtp.layers.D.transformer_layer.*        model.layers.{N+D}.self_attn.*, mlp.*, the two norms
    mtp.layers.D.final_layernorm            model.layers.{N+D}.shared_head.norm
    embedding / output_layer (shared)       model.layers.{N+D}.embed_tokens / shared_head.head (copies)

A folder whose config declares MTP layers without their weights (what transformers saves) is
read without them, with a note.
"""
from __future__ import annotations

import torch

from ..errors import BadInput, Unsupported
from ..spec import MTP, MTP_LAYER, ModelSpec
from .base import Bridge, HfMapping, first_problem, halves, halves_back, same, same_back
from .llama import IGNORABLE, llama_like_mappings, llama_like_problem, rope_theta
from .moe import expert_mappings, refuse_zero

LAYER, HF_LAYER = "decoder.layers.{layer}.", "model.layers.{layer}."
_ATTENTION, _HF_ATTENTION = LAYER + "self_attention.", HF_LAYER + "self_attn."
_MLP = HF_LAYER + "mlp."
YARN_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _yarn(config: dict) -> dict | None:
    """The config's rotary scaling in the spec's form: None or a complete YaRN dict."""
    scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise Unsupported(f"RoPE scaling {kind!r} is not supported for {config.get('model_type')} (supported: yarn)")
    defaults = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}
    values = {name: scaling.get(name, defaults.get(name)) for name in YARN_FIELDS}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise Unsupported(f"yarn RoPE scaling lacks {', '.join(missing)}")
    yarn = {"rope_type": "yarn", **{name: float(value) for name, value in values.items()}}
    yarn["original_max_position_embeddings"] = int(values["original_max_position_embeddings"])
    return yarn


def _dense_layers(config: dict) -> tuple[int, ...] | None:
    """``first_k_dense_replace`` as the spec's MoE-layer pattern: the first k layers dense.
    (DeepSeek's own code also reads ``moe_layer_freq``, every layer in its configs; transformers
    does not: another value is refused.)"""
    if config.get("moe_layer_freq", 1) != 1:
        raise Unsupported(f"moe_layer_freq {config['moe_layer_freq']}: transformers makes every layer after "
                          "first_k_dense_replace a MoE layer")
    first_moe, layers = config.get("first_k_dense_replace") or 0, config["num_hidden_layers"]
    pattern = tuple(int(layer >= first_moe) for layer in range(layers))
    return None if all(pattern) else pattern


def _refuse_biases(config: dict) -> None:
    for name in ("attention_bias", "mlp_bias"):
        if config.get(name):
            raise Unsupported(f"{name}={config[name]}: DeepSeek's projections have no biases here")


def _common_spec(config: dict, family: str, rope_scaling: dict | None, **routing) -> ModelSpec:
    """The spec of a DeepSeek config: MLA attention, experts and dense first layers."""
    if config.get("hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {config.get('hidden_act')!r}; only SwiGLU (silu) is supported")
    _refuse_biases(config)
    refuse_zero(config, "n_routed_experts")
    heads = config["num_attention_heads"]
    experts = config["n_routed_experts"]
    return ModelSpec(
        family=family, num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
        num_attention_heads=heads, num_query_groups=heads, ffn_hidden_size=config["intermediate_size"],
        vocab_size=config["vocab_size"], max_position_embeddings=config.get("max_position_embeddings", 2048),
        head_dim=config["v_head_dim"], position_embedding="rope", normalization="RMSNorm",
        norm_epsilon=config.get("rms_norm_eps", 1e-6), activation="swiglu", add_bias_linear=False,
        add_qkv_bias=False, tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_theta=rope_theta(config), rope_scaling=rope_scaling, multi_latent_attention=True,
        q_lora_rank=config.get("q_lora_rank") or 0, kv_lora_rank=config["kv_lora_rank"],
        qk_head_dim=config["qk_nope_head_dim"], qk_pos_emb_head_dim=config["qk_rope_head_dim"], num_experts=experts,
        moe_ffn_hidden_size=config["moe_intermediate_size"], moe_router_topk=config["num_experts_per_tok"],
        moe_layers=_dense_layers(config),
        moe_shared_expert_size=(config.get("n_shared_experts") or 0) * config["moe_intermediate_size"],
        moe_router_topk_scaling_factor=float(config.get("routed_scaling_factor") or 1.0), **routing)


def _groups(config: dict, scored_by: int, how: str) -> dict:
    """``n_group``/``topk_group`` as Megatron's group-limited routing, when Megatron scores a
    group the way this family does (by the sum of its top ``scored_by``: ``topk //
    group_topk`` in Megatron)."""
    groups, chosen, topk = config.get("n_group") or 1, config.get("topk_group") or 1, config["num_experts_per_tok"]
    if groups <= 1 or chosen >= groups:
        return {}  # every group is chosen: plain top-k
    if topk // chosen != scored_by:
        raise Unsupported(f"n_group {groups}, topk_group {chosen} with {topk} experts per token: {how}, Megatron "
                          f"by the sum of its top num_experts_per_tok // topk_group = {topk // chosen}")
    return {"moe_router_num_groups": groups, "moe_router_group_topk": chosen}


def _v3_spec(config: dict) -> ModelSpec:
    if not config.get("rope_interleave", True):
        raise Unsupported("rope_interleave false: Megatron's MLA rotates the rotary dims as interleaved pairs")
    if config.get("scoring_func", "sigmoid") != "sigmoid" or config.get("topk_method", "noaux_tc") != "noaux_tc":
        raise Unsupported(f"scoring_func {config.get('scoring_func')!r} with topk_method "
                          f"{config.get('topk_method')!r}: DeepseekV3 routes by sigmoid scores (noaux_tc)")
    topk = config["num_experts_per_tok"]
    if bool(config.get("norm_topk_prob", True)) != (topk > 1):
        raise Unsupported(f"norm_topk_prob {config.get('norm_topk_prob')} with {topk} experts per token: Megatron "
                          "renormalises the chosen sigmoid weights exactly when more than one is chosen")
    refuse_zero(config, "n_shared_experts")
    return _common_spec(config, "deepseek_v3", _yarn(config), moe_router_score_function="sigmoid",
                        moe_router_expert_bias=True, mtp_num_layers=config.get("num_nextn_predict_layers") or 0,
                        **_groups(config, 2, "DeepseekV3 scores a group by the sum of its top 2"))


def _v2_spec(config: dict) -> ModelSpec:
    method = config.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise Unsupported(f"topk_method {method!r} (greedy or group_limited_greedy are supported)")
    if config.get("scoring_func", "softmax") != "softmax":
        raise Unsupported(f"scoring_func {config.get('scoring_func')!r}: DeepseekV2 routes by a softmax")
    if config.get("norm_topk_prob"):
        raise Unsupported("norm_topk_prob true: transformers' DeepseekV2 does not renormalise the chosen weights "
                          "while DeepSeek's own code does; refused as ambiguous")
    groups = _groups(config, 1, "DeepseekV2 scores a group by its best expert") \
        if method == "group_limited_greedy" else {}
    return _common_spec(config, "deepseek_v2", _yarn(config), moe_router_score_function="softmax",
                        moe_router_pre_softmax=True, **groups)


def deepseek_problem(spec: ModelSpec) -> str | None:
    """Why a spec is not a DeepSeek model at all (MLA, experts, an ungated shared expert, dense
    layers only before the first MoE layer)."""
    pattern = spec.moe_layers or (1,) * spec.num_layers
    basic = llama_like_problem(spec, moe=True, mla=True) or first_problem(
        (spec.multi_latent_attention, "no multi-latent attention"),
        (spec.num_experts > 0, "no mixture of experts"))
    return basic or first_problem(
        (not spec.add_bias_linear and not spec.add_qkv_bias, "linear biases"),
        (spec.sliding_window is None, "a sliding window"),
        (list(pattern) == sorted(pattern), "a dense layer after a MoE layer"),
        (bool(spec.moe_shared_expert_size), "no shared expert"),
        (not spec.moe_shared_expert_gate, "a gated shared expert"),
        (spec.moe_shared_expert_size % spec.moe_ffn_hidden_size == 0,
         f"a shared expert of {spec.moe_shared_expert_size}, not a multiple of the expert size "
         f"{spec.moe_ffn_hidden_size}"),
    )


def _v3_mismatch(spec: ModelSpec) -> str | None:
    groups_ok = not spec.moe_router_num_groups or spec.moe_router_topk // spec.moe_router_group_topk == 2
    return deepseek_problem(spec) or first_problem(
        (spec.moe_router_score_function == "sigmoid", f"{spec.moe_router_score_function} router scores"),
        (spec.moe_router_expert_bias, "no expert bias"),
        (groups_ok, f"groups scored by their top {spec.moe_router_topk // max(1, spec.moe_router_group_topk)} "
                    "(DeepseekV3: top 2)"),
        (spec.rope_scaling is None or spec.rope_scaling["rope_type"] == "yarn", "RoPE scaling other than yarn"),
        (not spec.mtp_num_layers or not spec.tied_embeddings, "multi-token prediction with tied embeddings"),
    )


def _v2_mismatch(spec: ModelSpec) -> str | None:
    groups_ok = not spec.moe_router_num_groups or spec.moe_router_topk // spec.moe_router_group_topk == 1
    return deepseek_problem(spec) or first_problem(
        (spec.moe_router_score_function == "softmax", f"{spec.moe_router_score_function} router scores"),
        (spec.moe_router_pre_softmax, "top-k before the softmax"),
        (not spec.moe_router_expert_bias, "an expert bias"),
        (groups_ok, "groups scored by more than their best expert"),
        (spec.rope_scaling is None or spec.rope_scaling["rope_type"] == "yarn", "RoPE scaling other than yarn"),
        (not spec.mtp_num_layers, "multi-token prediction layers"),
    )


def _common_config(spec: ModelSpec, dtype: torch.dtype, bridge: Bridge) -> dict:
    bridge.check(spec)
    pattern = spec.moe_layers or (1,) * spec.num_layers
    config = {
        "architectures": [bridge.architecture], "model_type": bridge.model_type,
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "intermediate_size": spec.ffn_hidden_size,
        "moe_intermediate_size": spec.moe_ffn_hidden_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads, "num_key_value_heads": spec.num_attention_heads,
        "n_shared_experts": spec.moe_shared_expert_size // spec.moe_ffn_hidden_size,
        "n_routed_experts": spec.num_experts, "routed_scaling_factor": spec.moe_router_topk_scaling_factor,
        "kv_lora_rank": spec.kv_lora_rank, "q_lora_rank": spec.q_lora_rank or None,
        "qk_rope_head_dim": spec.qk_pos_emb_head_dim, "v_head_dim": spec.head_dim,
        "qk_nope_head_dim": spec.qk_head_dim, "num_experts_per_tok": spec.moe_router_topk,
        "first_k_dense_replace": pattern.index(1), "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": spec.norm_epsilon,
        "rope_theta": spec.rope_theta, "tie_word_embeddings": spec.tied_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if spec.moe_router_num_groups:
        config.update(n_group=spec.moe_router_num_groups, topk_group=spec.moe_router_group_topk)
    if spec.rope_scaling:
        config["rope_scaling"] = dict(spec.rope_scaling)
    return config


def _v3_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    config = _common_config(spec, dtype, DEEPSEEK_V3)
    config.setdefault("n_group", 1)
    config.setdefault("topk_group", 1)
    config.update(norm_topk_prob=spec.moe_router_topk > 1, rope_interleave=True,
                  num_nextn_predict_layers=spec.mtp_num_layers)
    return config


def _v2_config(spec: ModelSpec, dtype: torch.dtype) -> dict:
    config = _common_config(spec, dtype, DEEPSEEK_V2)
    config.update(topk_method="group_limited_greedy" if spec.moe_router_num_groups else "greedy",
                  norm_topk_prob=False, mlp_bias=False)
    return config


def mla_mappings() -> list[HfMapping]:
    """MLA's projections and norms, one HF tensor each, unchanged (see the module docstring)."""
    pairs = {"linear_q_down_proj": "q_a_proj", "q_layernorm": "q_a_layernorm", "linear_q_up_proj": "q_b_proj",
             "linear_q_proj": "q_proj", "linear_kv_down_proj": "kv_a_proj_with_mqa",
             "kv_layernorm": "kv_a_layernorm", "linear_kv_up_proj": "kv_b_proj"}
    return [HfMapping(f"{_ATTENTION}{ours}.weight", (f"{_HF_ATTENTION}{theirs}.weight",), same, same_back)
            for ours, theirs in pairs.items()]


def shared_expert_mappings() -> list[HfMapping]:
    shared, hf_shared = LAYER + "mlp.shared_experts.", _MLP + "shared_experts."
    return [HfMapping(shared + "linear_fc1.weight", (hf_shared + "gate_proj.weight", hf_shared + "up_proj.weight"),
                      halves, halves_back),
            HfMapping(shared + "linear_fc2.weight", (hf_shared + "down_proj.weight",), same, same_back)]


def _mappings(spec: ModelSpec) -> list[HfMapping]:
    router, *experts = expert_mappings(_MLP + "gate.weight", _MLP + "experts.{expert}.", "gate_proj.weight",
                                       "up_proj.weight", "down_proj.weight")
    mappings = [
        *llama_like_mappings(spec), *mla_mappings(),
        router,
        HfMapping(LAYER + "mlp.router.expert_bias", (_MLP + "gate.e_score_correction_bias",), same, same_back,
                  hf_dtype=torch.float32),
        *experts, *shared_expert_mappings(),
    ]
    return mappings if not spec.mtp_num_layers else _with_mtp(mappings, spec)


def _copies(mapping: HfMapping, extra_names: list[str]) -> HfMapping:
    """``mapping`` also writing its tensor under ``extra_names`` (the MTP layers' copies of the
    embedding and head), and reading it back only where every copy is the same."""
    def to_hf(tensor, spec):
        first = mapping.to_hf(tensor, spec)
        return first + first[:1] * len(extra_names)

    def from_hf(tensors, spec):
        for name, copy in zip(extra_names, tensors[1:]):
            if not torch.equal(copy, tensors[0]):
                raise BadInput(f"{name} differs from {mapping.hf_names[0]}: Megatron's multi-token prediction "
                               "layers share the model's embedding and output head")
        return mapping.from_hf(tensors[:1], spec)

    return HfMapping(mapping.canonical, mapping.hf_names + tuple(extra_names), to_hf, from_hf, mapping.hf_dtype)


def _with_mtp(mappings: list[HfMapping], spec: ModelSpec) -> list[HfMapping]:
    """The mappings plus every multi-token prediction depth's (see the module docstring)."""
    hub_layers = [f"model.layers.{spec.num_layers + depth}." for depth in range(spec.mtp_num_layers)]
    shared = {"embedding.word_embeddings.weight": "embed_tokens.weight",
              "output_layer.weight": "shared_head.head.weight"}
    result = [_copies(mapping, [layer + shared[mapping.canonical] for layer in hub_layers])
              if mapping.canonical in shared else mapping for mapping in mappings]
    for depth, hub in enumerate(hub_layers):
        ours = MTP.format(depth=depth)
        own = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
               "final_layernorm.weight": "shared_head.norm.weight"}
        result += [HfMapping(ours + name, (hub + theirs,), same, same_back) for name, theirs in own.items()]
        result += [HfMapping(mapping.canonical.replace(LAYER, ours + MTP_LAYER),
                             tuple(name.replace(HF_LAYER, hub) for name in mapping.hf_names),
                             mapping.to_hf, mapping.from_hf, mapping.hf_dtype)
                   for mapping in mappings if mapping.canonical.startswith(LAYER)]
    return result


DEEPSEEK_V3 = Bridge("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", _v3_spec, _v3_config, _mappings,
                     _v3_mismatch, lambda spec: _v3_mismatch(spec) is None, IGNORABLE)
DEEPSEEK_V2 = Bridge("deepseek_v2", "DeepseekV2ForCausalLM", "deepseek_v2", _v2_spec, _v2_config, _mappings,
                     _v2_mismatch, lambda spec: _v2_mismatch(spec) is None, IGNORABLE)
