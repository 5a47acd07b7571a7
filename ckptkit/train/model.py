"""A GPT in one file: what Megatron-LM's ``GPTModel`` computes with its local layers.

Module and parameter names are Megatron-Core's, so ``model.named_parameters()`` lists
exactly the keys Megatron writes under ``model`` in a per-rank checkpoint
(``embedding.word_embeddings.weight``, ``decoder.layers.0.self_attention.linear_qkv.weight``,
..., ``output_layer.weight``). The model is plain: one process, full tensors.
Parallelism is applied from outside by :mod:`ckptkit.train.parallel`, which swaps
linear layers for tensor-parallel ones and cuts the layer list into pipeline stages;
nothing here changes for it, because every shape is read from the weights
(a tensor-parallel rank's ``linear_qkv`` simply has fewer query groups).

Two styles come from one :class:`~ckptkit.spec.ModelSpec`:

* GPT-2: learned absolute positions, LayerNorm, GeLU (exact erf for ``"gelu"``, tanh
  form for ``"gelu_tanh"``), biases, tied embeddings;
* Llama: rotary positions (rotate-half), RMSNorm, SwiGLU, no biases, grouped-query
  attention, optionally an untied output layer.

and, on top of either, what Llama 3.1, Mistral and Qwen3 add: RoPE's "llama3"
frequency rescaling (``spec.rope_scaling``), a sliding attention window
(``spec.sliding_window``), per-head norms of queries and keys before RoPE
(``spec.qk_layernorm``, Megatron's ``q_layernorm``/``k_layernorm``) and a head size
other than ``hidden / heads`` (``spec.head_dim``, Megatron's ``--kv-channels``).

With ``spec.num_experts`` the MLP of the layers ``spec.is_moe_layer`` names is a
mixture of experts (:class:`MoELayer`: Mixtral, Qwen2-MoE, Qwen3-MoE), as Megatron-Core's
``MoELayer`` computes it with the softmax ``TopKRouter`` and no token dropping.

Blocks are pre-norm: ``x + attention(norm(x))`` then ``x + mlp(norm(x))``. Logits
cover the padded vocabulary (Megatron pads the embedding rows to a multiple of
``make_vocab_size_divisible_by x TP``). No dropout: Megatron's defaults would add it
in training, which would make runs of different layouts differ.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..spec import ModelSpec


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight only) over the last ``size`` values, in float32.

    ``size`` is the hidden size, or the head size for the query and key norms.
    """

    def __init__(self, spec: ModelSpec, fused: bool = False, size: int | None = None):
        super().__init__()
        size = size or spec.hidden_size
        self.rms = spec.normalization == "RMSNorm"
        self.eps = spec.norm_epsilon
        self.fused = fused
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(size))

    def forward(self, x):
        if self.rms:
            return kernels.rms_norm(x, self.weight, self.eps, fused=self.fused)
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, fused=self.fused)


class Linear(nn.Linear):
    """``nn.Linear`` that can leave its bias out, for a fused bias + activation after it."""

    def forward(self, x, add_bias: bool = True):
        return F.linear(x, self.weight, self.bias if add_bias else None)


class Embedding(nn.Module):
    """Token embeddings plus, for GPT-2 style models, learned position embeddings."""

    def __init__(self, spec: ModelSpec, padded_vocab_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(padded_vocab_size, spec.hidden_size)
        self.position_embeddings = None
        if spec.position_embedding == "learned_absolute":
            self.position_embeddings = nn.Embedding(spec.max_position_embeddings, spec.hidden_size)

    def forward(self, tokens):
        x = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = x + self.position_embeddings(positions)
        return x


def attention_mask(seq_length: int, sliding_window: int | None, device=None) -> torch.Tensor | None:
    """Boolean ``[seq, seq]`` mask (True: attend) for a sliding window, or None for plain causal.

    Query ``i`` sees keys ``i - W < j <= i``: ``W`` tokens, itself included, as Hugging
    Face's ``sliding_window`` (``masking_utils.sliding_window_overlay``). A window at
    least as long as the sequence is the causal mask, left to SDPA's ``is_causal``.
    """
    if sliding_window is None or sliding_window >= seq_length:
        return None
    positions = torch.arange(seq_length, device=device)
    distance = positions[:, None] - positions[None, :]  # query - key
    return (distance >= 0) & (distance < sliding_window)


class SelfAttention(nn.Module):
    """Causal attention over a fused QKV projection, grouped per query group.

    ``linear_qkv`` rows are ``[q heads of group 0, k_0, v_0, q heads of group 1, ...]``
    (each ``head_dim`` rows), so a rank holding whole groups is just a shorter weight.
    Query head ``g x heads_per_group + j`` attends with key/value head ``g``.
    With ``qk_layernorm``, ``q_layernorm`` and ``k_layernorm`` (weights ``[head_dim]``,
    the same on every tensor-parallel rank) normalise each query and key head before
    RoPE, as Megatron's ``SelfAttention.get_query_key_value_tensors`` does.
    """

    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        self.heads_per_group = spec.heads_per_group
        self.head_dim = spec.head_dim
        self.rope_theta = spec.rope_theta if spec.position_embedding == "rope" else None
        # Checked here so that an unknown rope_type fails when the model is built, not at its first step.
        self.rope_scaling = spec.rope_scaling if kernels.rope_scaling_parameters(spec.rope_scaling) else None
        self.sliding_window = spec.sliding_window
        self.fused = fused
        query_width = spec.num_attention_heads * spec.head_dim
        qkv_rows = (spec.num_attention_heads + 2 * spec.num_query_groups) * spec.head_dim
        # Registered in Megatron's order (linear_proj, linear_qkv, q_layernorm, k_layernorm),
        # so state dicts list keys as its files do.
        self.linear_proj = Linear(query_width, spec.hidden_size, bias=spec.add_bias_linear)
        self.linear_qkv = Linear(spec.hidden_size, qkv_rows, bias=spec.add_qkv_bias)
        self.q_layernorm = Norm(spec, fused, size=spec.head_dim) if spec.qk_layernorm else None
        self.k_layernorm = Norm(spec, fused, size=spec.head_dim) if spec.qk_layernorm else None

    def forward(self, x):
        qkv = self.linear_qkv(x)
        batch, seq = qkv.shape[:2]  # the full sequence even when x is a sequence-parallel slice
        per_group = self.heads_per_group + 2
        groups = qkv.shape[-1] // (per_group * self.head_dim)
        qkv = qkv.view(batch, seq, groups, per_group, self.head_dim)
        query = qkv[:, :, :, : self.heads_per_group].reshape(batch, seq, groups * self.heads_per_group,
                                                              self.head_dim)
        key, value = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if self.q_layernorm is not None:
            query, key = self.q_layernorm(query), self.k_layernorm(key)
        if self.rope_theta is not None:
            cos, sin = kernels.rope_tables(seq, self.head_dim, self.rope_theta, device=x.device,
                                           scaling=self.rope_scaling)
            query = kernels.apply_rope(query, cos, sin, fused=self.fused)
            key = kernels.apply_rope(key, cos, sin, fused=self.fused)
        mask = attention_mask(seq, self.sliding_window, device=x.device)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=mask, is_causal=mask is None,
                                             scale=1.0 / math.sqrt(self.head_dim),
                                             enable_gqa=self.heads_per_group > 1)
        return self.linear_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; SwiGLU's ``fc1`` rows are ``[gate; up]`` and it computes ``silu(gate) * up``.

    ``ffn_hidden_size`` and ``bias`` default to the dense MLP's; an expert passes its own
    (``moe_ffn_hidden_size``, no bias). ``scale`` (one value per token, an expert's
    routing probability) multiplies the activations before ``fc2``, where Megatron's
    ``MLP.forward(per_token_scale=...)`` applies it.
    """

    def __init__(self, spec: ModelSpec, fused: bool = False, ffn_hidden_size: int | None = None,
                 bias: bool | None = None):
        super().__init__()
        ffn = ffn_hidden_size or spec.ffn_hidden_size
        bias = spec.add_bias_linear if bias is None else bias
        self.gated = spec.gated
        self.approximate = "tanh" if spec.activation == "gelu_tanh" else "none"
        self.fused = fused
        # True: bias + GeLU is the operator torch.ops.ckptkit.bias_gelu, which a compiled graph keeps
        # whole (set by build_model for TrainConfig.gelu_operator).
        self.gelu_operator = False
        self.linear_fc1 = Linear(spec.hidden_size, 2 * ffn if self.gated else ffn, bias=bias)
        self.linear_fc2 = Linear(ffn, spec.hidden_size, bias=bias)

    def forward(self, x, scale: torch.Tensor | None = None):
        if self.gated:
            gate, up = self.linear_fc1(x).chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        else:
            hidden = self.linear_fc1(x, add_bias=False)
            if self.gelu_operator:
                hidden = kernels.bias_gelu_operator(hidden, self.linear_fc1.bias, self.approximate)
            else:
                hidden = kernels.bias_gelu(hidden, self.linear_fc1.bias, self.approximate, fused=self.fused)
        if scale is not None:
            hidden = (hidden * scale.unsqueeze(-1)).to(hidden.dtype)
        return self.linear_fc2(hidden)


class Router(nn.Module):
    """Megatron-Core's ``TopKRouter`` with the softmax score function: ``[..., hidden]`` ->
    probabilities and expert indices ``[..., topk]``.

    Logits ``x @ weight^T`` are computed in float32 (``--moe-router-dtype fp32``; the
    same as Megatron's default in a float32 run). By default the top k logits are
    chosen and a softmax is taken over those k (Mixtral; Qwen3-MoE's
    ``norm_topk_prob``); with ``moe_router_pre_softmax`` the softmax runs over every
    expert and the top k probabilities are kept as they are (Qwen2-MoE). Both follow
    ``topk_routing_with_score_function`` in ``megatron/core/transformer/moe/moe_utils.py``.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.topk = spec.moe_router_topk
        self.pre_softmax = spec.moe_router_pre_softmax
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size))

    def forward(self, x):
        logits = F.linear(x.float(), self.weight.float())
        if self.pre_softmax:
            probs, experts = torch.topk(torch.softmax(logits, dim=-1), self.topk, dim=-1)
        else:
            top_logits, experts = torch.topk(logits, self.topk, dim=-1)
            probs = torch.softmax(top_logits, dim=-1)
        return probs, experts


class Experts(nn.Module):
    """The experts this process holds: ``local_experts.{i}`` is global expert ``first_expert + i``
    (Megatron's ``SequentialMLP``).

    ``forward(x, probs, experts)`` gives, for every token, the sum over its chosen
    experts held here of ``prob x expert(token)``, accumulated in float32 in expert
    order. The plain model holds every expert (``first_expert`` 0); expert parallelism
    (:mod:`ckptkit.train.parallel.experts`) gives each rank a contiguous block of them.
    """

    def __init__(self, spec: ModelSpec, fused: bool = False, num_local_experts: int | None = None,
                 first_expert: int = 0, ffn_hidden_size: int | None = None):
        super().__init__()
        self.first_expert = first_expert
        count = spec.num_experts if num_local_experts is None else num_local_experts
        ffn = ffn_hidden_size or spec.moe_ffn_hidden_size
        self.local_experts = nn.ModuleList(MLP(spec, fused, ffn, bias=False) for _ in range(count))

    def forward(self, x, probs, experts):
        return self.compute(x, probs, experts).to(x.dtype)

    def compute(self, x, probs, experts):
        """``[..., hidden]`` float32 contributions of the local experts (before any reduction)."""
        tokens = x.reshape(-1, x.shape[-1])
        probs, experts = probs.reshape(tokens.shape[0], -1), experts.reshape(tokens.shape[0], -1)
        out = torch.zeros(tokens.shape, dtype=torch.float32, device=x.device)
        for index, expert in enumerate(self.local_experts):
            rows, slots = torch.nonzero(experts == self.first_expert + index, as_tuple=True)
            if rows.numel():
                out = out.index_add(0, rows, expert(tokens[rows], probs[rows, slots]).float())
        return out.view(*x.shape[:-1], -1)


class SharedExpert(MLP):
    """The shared expert (Megatron's ``SharedExpertMLP``): an MLP every token goes through,
    scaled by ``sigmoid(x @ gate_weight^T)`` when ``moe_shared_expert_gate`` (Qwen2-MoE)."""

    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__(spec, fused, spec.moe_shared_expert_size, bias=False)
        self.gate_weight = nn.Parameter(torch.empty(1, spec.hidden_size)) if spec.moe_shared_expert_gate else None

    def forward(self, x):
        out = super().forward(x)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(x, self.gate_weight))
        return out


class MoELayer(nn.Module):
    """``router`` -> the chosen experts' weighted sum (+ ``shared_experts``), Megatron's ``MoELayer``.

    Every token goes to its top-k experts; none is dropped (Megatron's dropless default,
    no capacity factor). The auxiliary load-balancing loss is not added: Megatron's
    default ``moe_aux_loss_coeff`` is 0.
    """

    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        self.router = Router(spec)
        self.experts = Experts(spec, fused)
        self.shared_experts = SharedExpert(spec, fused) if spec.moe_shared_expert_size else None

    def forward(self, x):
        probs, experts = self.router(x)
        out = self.experts(x, probs, experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class TransformerLayer(nn.Module):
    def __init__(self, spec: ModelSpec, fused: bool = False, layer: int = 0):
        super().__init__()
        self.input_layernorm = Norm(spec, fused)
        self.self_attention = SelfAttention(spec, fused)
        self.pre_mlp_layernorm = Norm(spec, fused)
        self.mlp = MoELayer(spec, fused) if spec.is_moe_layer(layer) else MLP(spec, fused)

    def forward(self, x):
        x = x + self.self_attention(self.input_layernorm(x))
        return x + self.mlp(self.pre_mlp_layernorm(x))


class TransformerBlock(nn.Module):
    def __init__(self, spec: ModelSpec, fused: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(spec, fused, layer) for layer in range(spec.num_layers))
        self.final_layernorm = Norm(spec, fused)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x if self.final_layernorm is None else self.final_layernorm(x)


class GPT(nn.Module):
    """Tokens ``[batch, seq]`` -> logits ``[batch, seq, padded_vocab]``.

    A pipeline stage is the same module with parts removed (see
    :func:`ckptkit.train.parallel.pipeline.keep_stage`): without ``embedding`` it takes
    hidden states ``[batch, seq, hidden]``, without ``output_layer`` (or with
    ``output_in_loss``) it returns them.
    With tied embeddings ``output_layer.weight`` *is* the embedding parameter (named
    once, under ``embedding``), as in nanoGPT.
    """

    def __init__(self, spec: ModelSpec, padded_vocab_size: int | None = None, fused_kernels: bool = False):
        super().__init__()
        self.spec = spec
        self.padded_vocab_size = padded_vocab_size or spec.vocab_size
        self.embedding = Embedding(spec, self.padded_vocab_size)
        self.decoder = TransformerBlock(spec, fused_kernels)
        self.output_layer = Linear(spec.hidden_size, self.padded_vocab_size, bias=False)
        # True: forward stops before the output layer, which the loss applies itself
        # (kernels.linear_cross_entropy, the trainer's choice on one tensor-parallel rank).
        self.output_in_loss = False
        if spec.tied_embeddings:
            tie_embeddings(self)

    def forward(self, inputs):
        x = self.embedding(inputs) if self.embedding is not None else inputs
        x = self.decoder(x)
        return x if self.output_layer is None or self.output_in_loss else self.output_layer(x)


def tie_embeddings(model: GPT) -> None:
    """Make the output layer use the embedding matrix (only when both live in this stage)."""
    if model.embedding is not None and model.output_layer is not None:
        model.output_layer.weight = model.embedding.word_embeddings.weight
