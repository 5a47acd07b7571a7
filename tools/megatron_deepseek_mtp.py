"""Megatron-LM's multi-token prediction (MTP) head computed with transformers' modules from a
Hugging Face folder in the Hub's layout (transformers itself computes no MTP head). Used by
tests/test_deepseek.py and tools/megatron_deepseek.py.

    logits = mtp_logits(Path("hf"), tokens)   # [batch, seq, vocab], depth 0
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F


def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))


def mtp_logits(folder: Path, tokens: torch.Tensor, depth: int = 0) -> torch.Tensor:
    """Megatron's MTP head on a Hub-layout folder: the next token's embedding (the last position
    gets token 0, as Megatron's roll_tensor fills it) and the main model's final-normed hidden
    state, each RMS-normed (enorm, hnorm), concatenated [embedding, hidden], projected (eh_proj),
    through the transformer layer ``model.layers.{N + depth}`` at positions 0..s-1, normed
    (shared_head.norm) and projected by the shared head."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    layers, eps = config.num_hidden_layers, config.rms_norm_eps
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    config.num_hidden_layers = layers + depth + 1  # so transformers loads the MTP layer's transformer layer
    with_mtp = AutoModelForCausalLM.from_pretrained(folder, config=config, attn_implementation="eager").eval()
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    hub = f"model.layers.{layers + depth}."
    batch, length = tokens.shape
    with torch.no_grad():
        hidden = model.model(tokens).last_hidden_state
        following = torch.roll(tokens, -1, dims=-1)
        following[:, -1] = 0
        embedded = model.model.embed_tokens(following)
        x = F.linear(torch.cat([_rms(embedded, state[hub + "enorm.weight"], eps),
                                _rms(hidden, state[hub + "hnorm.weight"], eps)], dim=-1), state[hub + "eh_proj.weight"])
        positions = torch.arange(length).unsqueeze(0).expand(batch, length)
        mask = torch.full((length, length), float("-inf")).triu(1)[None, None].expand(batch, 1, length, length)
        out = with_mtp.model.layers[layers + depth](x, attention_mask=mask, position_ids=positions,
                                                    position_embeddings=with_mtp.model.rotary_emb(x, positions))
        out = out[0] if isinstance(out, tuple) else out
        return F.linear(_rms(out, state[hub + "shared_head.norm.weight"], eps),
                        state[hub + "shared_head.head.weight"]).float()
