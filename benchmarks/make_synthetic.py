"""Generate a synthetic GPT or Llama checkpoint with random weights, for benchmarks.

Writes either Megatron per-rank files (any TP/PP/VPP, any naming) or a Hugging Face
safetensors folder, through ckptkit's own streaming writers fed by a reader that makes
up each canonical tensor on demand (seeded by its name, so a given size is the same
bytes every time). Memory stays at about one tensor.

    python benchmarks/make_synthetic.py /work/bench/gpt-1.3b-tp2pp2 --size 1.3b --tp 2 --pp 2 --naming legacy
    python benchmarks/make_synthetic.py /work/bench/gpt-1.3b-hf --size 1.3b --format hf
    python benchmarks/make_synthetic.py /work/bench/llama-hf --size llama3-70b-width --format hf --dtype bf16

``--diverge-copies`` then makes the copies Megatron keeps of some tensors differ (as a
bug in training would): replicated tensors across TP ranks, and the tied output head
from the word embeddings.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptkit.layouts import megatron_legacy  # noqa: E402
from ckptkit.layouts.base import CheckpointMeta, CheckpointReader  # noqa: E402
from ckptkit.layouts.megatron_names import NAMINGS  # noqa: E402
from ckptkit.spec import ModelSpec, canonical_tensors  # noqa: E402

# GPT-2/GPT-3 style shapes (the GPT-3 paper's table 2.1 sizes, GPT-2's vocabulary).
SIZES = {
    "tiny": dict(num_layers=4, hidden_size=256, num_attention_heads=8),
    "125m": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16),
    "2.7b": dict(num_layers=32, hidden_size=2560, num_attention_heads=32),
    "6.7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32),
}
VOCAB_SIZE = 50257
SEQUENCE_LENGTH = 2048
# Llama-3-70B's widths (its config.json: hidden 8192, ffn 28672, 64 heads in 8 KV groups,
# vocabulary 128256, untied head) with 2 layers: every tensor as large as the real model's
# (the embeddings and the head 2.1 GB each in bf16, a fused fc1 0.94 GB), 7.6 GB in all.
LLAMA_SIZES = {
    "llama3-70b-width": dict(num_layers=2, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                             ffn_hidden_size=28672, vocab_size=128256),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def model_spec(size: str) -> ModelSpec:
    """The spec of a size of :data:`SIZES` (GPT) or :data:`LLAMA_SIZES`."""
    if size in LLAMA_SIZES:
        shape = LLAMA_SIZES[size]
        return ModelSpec(family="llama", **shape, max_position_embeddings=8192,
                         head_dim=shape["hidden_size"] // shape["num_attention_heads"], position_embedding="rope",
                         normalization="RMSNorm", activation="swiglu", add_bias_linear=False, add_qkv_bias=False,
                         tied_embeddings=False, rope_theta=500000.0)
    return gpt_spec(size)


def gpt_spec(size: str) -> ModelSpec:
    shape = SIZES[size]
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    return ModelSpec(family="gpt2", num_layers=shape["num_layers"], hidden_size=hidden,
                     num_attention_heads=heads, num_query_groups=heads, ffn_hidden_size=4 * hidden,
                     vocab_size=VOCAB_SIZE, max_position_embeddings=SEQUENCE_LENGTH, head_dim=hidden // heads,
                     activation="gelu", tied_embeddings=True)


class SyntheticReader(CheckpointReader):
    """Canonical tensors of random values, each seeded by its name."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype):
        self.spec = spec
        self.meta = CheckpointMeta(layout="synthetic", path=Path("synthetic"), dtype=dtype)
        self.shapes = {tensor.name: tensor.shape for tensor in canonical_tensors(spec)}

    def tensor(self, name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        values = torch.empty(self.shapes[name], dtype=torch.float32)
        values.normal_(0.0, 0.02, generator=generator)
        return values.to(self.meta.dtype)


def _older_legacy_spellings():
    """The pre-Core naming with the pre-2024 spellings (``input_layernorm``,
    ``post_attention_layernorm``, ``final_layernorm``) written first: the transformers
    script used as the benchmarks' reference knows only those, and no ``_extra_state``
    entries (it fails on them). ckptkit reads both forms."""
    legacy = NAMINGS["legacy"]

    def layernorm_first(spellings):
        return sorted(spellings, key=lambda spelling: "layernorm" not in spelling)

    return dataclasses.replace(
        legacy, layer_names={key: layernorm_first(value) for key, value in legacy.layer_names.items()},
        global_names={key: layernorm_first(value) for key, value in legacy.global_names.items()},
        extra_state_linears=())


def parameter_count(spec: ModelSpec) -> int:
    return sum(torch.Size(tensor.shape).numel() for tensor in canonical_tensors(spec))


def make(out: Path, *, size: str, format: str = "megatron", tp: int = 1, pp: int = 1, vpp: int = 1,
         naming: str = "legacy", dtype: str = "fp16", max_shard_size: str = "5GB") -> Path:
    """Write the synthetic checkpoint into ``out`` (a fresh folder) and return it."""
    spec = model_spec(size)
    reader = SyntheticReader(spec, DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=False)
    if format == "hf":
        from ckptkit.convert import write_hf_folder

        write_hf_folder(reader, out, dtype=reader.meta.dtype, max_shard_size=max_shard_size)
    else:
        target = megatron_legacy.TargetLayout(tp=tp, pp=pp, vpp=vpp, naming=naming, dtype=reader.meta.dtype,
                                              iteration=1000, release=False)
        previous = NAMINGS["legacy"]
        NAMINGS["legacy"] = _older_legacy_spellings()
        try:
            megatron_legacy.write(reader, out, target)
        finally:
            NAMINGS["legacy"] = previous
    return out


def diverge_copies(checkpoint: Path, amount: float = 0.5) -> int:
    """Change, in place, the last value of every replicated tensor on TP ranks 1 and up and of
    the last stage's tied output head on every TP rank; return how many tensors differ now.

    Only those bytes change (torch does not check the zip records' CRC-32 on load, and
    ckptkit reads tensors by offset), so this takes no time at any size.
    """
    edits, diverged = [], 0
    with megatron_legacy.MegatronLegacyReader(checkpoint) as reader:
        tp, head = reader.files.tp, reader.tied_head_location
        copies = [(reader.index[canonical.name], canonical.name, range(1, tp))
                  for canonical in reader.canonical() if canonical.rule == "replicated" and tp > 1]
        if head is not None:
            copies.append((head, "output_layer.weight", range(tp)))
        for location, name, tp_ranks in copies:
            edits += [(reader.files.path(tp_rank, location.pp_stage), reader._shard_at(location, tp_rank, name))
                      for tp_rank in tp_ranks]
            diverged += 1
    for path, stored in edits:
        element = stored.element_size()
        last = stored.untyped_storage()._checkpoint_offset + (stored.storage_offset() + stored.numel() - 1) * element
        with open(path, "r+b") as opened:
            opened.seek(last)
            value = torch.frombuffer(bytearray(opened.read(element)), dtype=stored.dtype) + amount
            opened.seek(last)
            opened.write(value.view(torch.uint8).numpy().tobytes())
    return diverged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=[*SIZES, *LLAMA_SIZES], default="125m")
    parser.add_argument("--format", choices=["megatron", "hf"], default="megatron")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--naming", choices=["legacy", "mcore-local", "mcore-te"], default="legacy")
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--diverge-copies", action="store_true",
                        help="Megatron output: make replicated tensors differ across TP ranks and the tied head "
                        "differ from the embeddings")
    options = parser.parse_args(argv)
    started = time.perf_counter()
    make(options.out, size=options.size, format=options.format, tp=options.tp, pp=options.pp, vpp=options.vpp,
         naming=options.naming, dtype=options.dtype, max_shard_size=options.max_shard_size)
    if options.diverge_copies:
        print(f"{options.out}: copies of {diverge_copies(options.out)} tensors made to differ")
    total = sum(path.stat().st_size for path in options.out.rglob("*") if path.is_file())
    print(f"{options.out}: {parameter_count(model_spec(options.size)) / 1e9:.3f}B parameters, "
          f"{total / 1e9:.2f} GB in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
