"""What a training run needs to know: model presets and :class:`TrainConfig`."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, Unsupported
from ..kernels import rope_scaling_parameters
from ..spec import ModelSpec
from .optim import GRAD_ACCUMULATION, AdamConfig

MODEL_PRESETS: dict[str, ModelSpec] = {
    # Small enough to train on a laptop CPU; the same shapes as the real Megatron fixtures' families.
    "gpt2": ModelSpec(family="gpt2", num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=4,
                      ffn_hidden_size=512, vocab_size=1000, max_position_embeddings=1024, head_dim=32),
    "llama": ModelSpec(family="llama", num_layers=4, hidden_size=128, num_attention_heads=8, num_query_groups=2,
                       ffn_hidden_size=352, vocab_size=1000, max_position_embeddings=4096, head_dim=16,
                       position_embedding="rope", normalization="RMSNorm", activation="swiglu",
                       add_bias_linear=False, add_qkv_bias=False, tied_embeddings=False),
    # GPT-2 small (124M parameters with its 50257-token vocabulary).
    "gpt2-124m": ModelSpec(family="gpt2", num_layers=12, hidden_size=768, num_attention_heads=12,
                           num_query_groups=12, ffn_hidden_size=3072, vocab_size=50257,
                           max_position_embeddings=1024, head_dim=64),
}


# What --compile hands to torch.compile: each transformer layer (one compiled graph that every layer
# reuses: quick to compile), or the rank's whole model (embedding, layers, final norm and output layer in
# one graph: the compiler also fuses across layer boundaries; compiling takes longer).
COMPILE_SCOPES = ("layers", "model")


def model_spec(preset: str = "gpt2", config_file: str | Path | None = None) -> ModelSpec:
    """A preset, with any :class:`ModelSpec` fields of a JSON file replacing its values.

    ``{"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16}``
    """
    if preset not in MODEL_PRESETS:
        raise BadInput(f"unknown model {preset!r} (choose from {', '.join(MODEL_PRESETS)})")
    spec = MODEL_PRESETS[preset]
    if config_file is None:
        return spec
    try:
        fields = json.loads(Path(config_file).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BadInput(f"{config_file}: cannot read a JSON model config ({error})") from None
    known = {entry.name for entry in dataclasses.fields(ModelSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BadInput(f"{config_file}: unknown model fields {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dataclasses.replace(spec, **fields)


@dataclass
class TrainConfig:
    """One training run. ``train(TrainConfig(model=MODEL_PRESETS["llama"], tp=2, pp=2, steps=20))``"""

    model: ModelSpec | None = None  # None: the --load checkpoint's architecture (else the "gpt2" preset)
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # expert-parallel size (MoE models): EP divides DP and the number of experts
    steps: int = 10  # total iterations; a loaded checkpoint's iteration counts towards them
    micro_batch_size: int = 2
    global_batch_size: int | None = None  # default: micro_batch_size x dp
    seq_length: int = 64
    seed: int = 1234
    data: str | None = None  # indexed dataset prefix or .jsonl; None: synthetic corpus
    tokenizer: str | None = None  # transformers tokenizer folder for .jsonl data
    save: str | None = None
    save_interval: int | None = None  # also save every N iterations (always at the end)
    load: str | None = None
    log_json: str | None = None
    optimizer: AdamConfig = field(default_factory=AdamConfig)
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    recompute: bool = False
    fused_kernels: bool | None = None  # None: when a GPU and Triton are present
    compile: bool = False  # torch.compile the model (TP1 and EP1 only)
    compile_scope: str = "layers"  # "layers": each transformer layer; "model": the rank's whole model
    compile_mode: str | None = None  # torch.compile's mode: None (default), "reduce-overhead", "max-autotune", ...
    gelu_operator: bool = True  # compiled: bias + GeLU stays the Triton operator (torch.ops.ckptkit.bias_gelu)
    grad_accumulation: str = "batched"  # into float32 main_grad: "batched" (after each backward) or "hooks"
    step_graph: bool = False  # the whole step (every micro-batch, clipping, AdamW) replayed as one CUDA graph
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "float32", "bfloat16"
    device: str = "auto"  # "cpu" (gloo), "cuda" (NCCL, a GPU per rank), "auto": cuda when every rank has a GPU
    make_vocab_size_divisible_by: int = 128
    log_interval: int = 0  # print a line every N steps on rank 0 (0: quiet)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def batch_size(self) -> int:
        return self.global_batch_size or self.micro_batch_size * self.dp

    def num_microbatches(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.dp)

    def check_layout(self) -> None:
        """Refuse parallel sizes that do not fit together whatever the model."""
        for name in ("tp", "pp", "dp", "ep", "steps", "micro_batch_size", "seq_length"):
            if getattr(self, name) < 1:
                raise BadInput(f"{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.compile and (self.tp > 1 or self.ep > 1):
            # Inside a layer, TP and EP call torch.distributed through autograd functions,
            # which this trainer has not run under torch.compile.
            raise Unsupported(f"compiling the layers needs TP=1 and EP=1 (got TP={self.tp}, EP={self.ep}): "
                              "their collectives are not compiled")
        if self.step_graph and (self.world_size > 1 or self.device == "cpu"):
            # One process on one GPU: collectives inside a captured graph have not been tried here.
            raise Unsupported(f"a CUDA graph of the whole step needs one rank on a GPU (got TP={self.tp}, "
                              f"PP={self.pp}, DP={self.dp}, device {self.device})")
        if self.grad_accumulation not in GRAD_ACCUMULATION:
            raise BadInput(f"grad accumulation {self.grad_accumulation!r}: choose {' or '.join(GRAD_ACCUMULATION)}")
        if self.compile_scope not in COMPILE_SCOPES:
            raise BadInput(f"compile scope {self.compile_scope!r}: choose {' or '.join(COMPILE_SCOPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise BadInput(f"device {self.device!r}: choose auto, cpu or cuda")
        if self.dp % self.ep:
            # Megatron's expert grid with expert tensor parallelism = TP: EP x expert-DP = DP.
            raise BadInput(f"EP={self.ep} must divide DP={self.dp}: expert-parallel ranks are data-parallel ranks")

    def check(self, spec: ModelSpec) -> None:
        """Refuse sizes that do not fit together, naming the numbers."""
        self.check_layout()
        if spec.deepseek_features():
            raise Unsupported(f"the trainer does not compute {', '.join(spec.deepseek_features())} "
                              f"(a {spec.family} model): convert it, but train it with Megatron-LM")
        if self.batch_size % (self.micro_batch_size * self.dp):
            raise BadInput(f"global batch {self.batch_size} is not a multiple of micro-batch "
                           f"{self.micro_batch_size} x DP {self.dp}")
        if spec.num_query_groups % self.tp or spec.num_attention_heads % self.tp:
            raise BadInput(f"TP={self.tp} does not divide {spec.num_query_groups} query groups / "
                           f"{spec.num_attention_heads} heads (each rank holds whole query groups)")
        if any(not spec.is_moe_layer(layer) for layer in range(spec.num_layers)) and spec.ffn_hidden_size % self.tp:
            raise BadInput(f"TP={self.tp} does not divide ffn size {spec.ffn_hidden_size}")
        self._check_experts(spec)
        if spec.num_layers % self.pp:
            raise BadInput(f"PP={self.pp} does not divide {spec.num_layers} layers")
        if self.sequence_parallel and self.seq_length % self.tp:
            raise BadInput(f"sequence parallelism needs TP={self.tp} to divide the sequence {self.seq_length}")
        if spec.position_embedding == "learned_absolute" and self.seq_length > spec.max_position_embeddings:
            raise BadInput(f"sequence {self.seq_length} is longer than the {spec.max_position_embeddings} "
                           "learned positions")
        if spec.position_embedding == "rope":
            rope_scaling_parameters(spec.rope_scaling)  # Unsupported for a rope_type other than llama3
        if spec.sliding_window is not None and spec.sliding_window < 1:
            raise BadInput(f"sliding window must be at least 1 token (got {spec.sliding_window})")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise BadInput(f"dtype {self.dtype!r}: choose auto, float32 or bfloat16")

    def _check_experts(self, spec: ModelSpec) -> None:
        if not spec.num_experts:
            if self.ep > 1:
                raise BadInput(f"EP={self.ep} needs a mixture-of-experts model; this {spec.family} model has no experts")
            return
        if spec.num_experts % self.ep:
            raise BadInput(f"EP={self.ep} does not divide {spec.num_experts} experts")
        if not 1 <= spec.moe_router_topk <= spec.num_experts:
            raise BadInput(f"router top-k {spec.moe_router_topk} must be between 1 and {spec.num_experts} experts")
        for size, what in ((spec.moe_ffn_hidden_size, "expert ffn size"),
                           (spec.moe_shared_expert_size, "shared expert ffn size")):
            if size % self.tp:
                raise BadInput(f"TP={self.tp} does not divide {what} {size} (experts are cut over TP)")
