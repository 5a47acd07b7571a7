"""``verify --logits``: run two checkpoints on the same tokens and compare their logits.

A Megatron checkpoint (any layout ckptkit reads) runs on the in-repo model in its own
TP/PP layout (:func:`ckptkit.train.logits.megatron_logits`, processes spawned as
needed); a Hugging Face folder runs through transformers. The first ``vocab_size``
columns are compared (padding columns exist only on the Megatron side).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BadInput, Unsupported
from .layouts import detect_layout, open_checkpoint

HF_LAYOUTS = ("hf-safetensors", "hf-bin")


@dataclass
class LogitsComparison:
    a: str
    b: str
    runner_a: str
    runner_b: str
    tokens: list
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    reference_scale: float  # max |logits of b|, what rtol is relative to

    @property
    def equivalent(self) -> bool:
        return self.max_abs_diff <= self.atol + self.rtol * self.reference_scale

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "runner_a": self.runner_a, "runner_b": self.runner_b,
                "tokens_shape": [len(self.tokens), len(self.tokens[0]) if self.tokens else 0],
                "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff,
                "atol": self.atol, "rtol": self.rtol, "equivalent": self.equivalent}


def checkpoint_logits(path, tokens: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits ``[batch, seq, vocab]`` (float32) and a word for what ran them."""
    layout = detect_layout(path).name
    if layout in HF_LAYOUTS:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
        with torch.no_grad():
            return model(tokens).logits.float(), "transformers"
    from .train.logits import megatron_logits

    with open_checkpoint(path) as reader:
        where = f"ckptkit model at TP{reader.meta.tp} PP{reader.meta.pp * reader.meta.vpp}"
    return megatron_logits(path, tokens), where


def default_tokens(vocab_size: int, batch: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def compare_logits(a, b, *, tokens: torch.Tensor | None = None, atol: float = 1e-4, rtol: float = 0.0,
                   seq_length: int = 32, batch: int = 2, seed: int = 0) -> LogitsComparison:
    """Run ``a`` and ``b`` on the same tokens; equivalent when max|a-b| <= atol + rtol x max|b|.

    >>> compare_logits("megatron_tp2pp2/", "hf/", atol=1e-4).equivalent
    True
    """
    with open_checkpoint(a) as reader_a, open_checkpoint(b) as reader_b:
        for reader in (reader_a, reader_b):
            if reader.spec.model_kind != "decoder":
                # the in-repo model (ckptkit/train/model.py) and AutoModelForCausalLM are decoders
                raise Unsupported(f"{reader.meta.path}: verify --logits runs GPT models only; this is a Megatron "
                                  f"{reader.spec.model_kind} model ({reader.spec.family or 'unknown'})")
        vocab = min(reader_a.spec.vocab_size, reader_b.spec.vocab_size)
        positions = min(reader_a.spec.max_position_embeddings, reader_b.spec.max_position_embeddings)
    if tokens is None:
        tokens = default_tokens(vocab, batch, min(seq_length, positions), seed)
    if int(tokens.max()) >= vocab:
        raise BadInput(f"token id {int(tokens.max())} is outside the vocabulary ({vocab})")
    logits_a, runner_a = checkpoint_logits(a, tokens)
    logits_b, runner_b = checkpoint_logits(b, tokens)
    logits_a, logits_b = logits_a[..., :vocab], logits_b[..., :vocab]
    difference = (logits_a - logits_b).abs()
    scale = logits_b.abs().max().item()
    result = LogitsComparison(str(a), str(b), runner_a, runner_b, tokens.tolist(), difference.max().item(),
                              (difference / logits_b.abs().clamp_min(1e-6)).max().item(), atol, rtol, scale)
    return result


def load_tokens(path) -> torch.Tensor:
    """Tokens from a ``.pt`` file (a tensor, or a dict with ``tokens``) or a JSON list of lists."""
    path = Path(path)
    if path.suffix == ".json":
        import json
        return torch.tensor(json.loads(path.read_text()), dtype=torch.long)
    from .safe_load import safe_torch_load
    loaded = safe_torch_load(path, mmap=False)
    tokens = loaded["tokens"] if isinstance(loaded, dict) else loaded
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise BadInput(f"{path}: expected a [batch, seq] tensor of token ids")
    return tokens.long()
