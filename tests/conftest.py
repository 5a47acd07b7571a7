"""Shared fixtures: the real Megatron-LM checkpoints and small named model factories."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from ckptkit.layouts.base import CheckpointMeta, CheckpointReader

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_path(*parts) -> Path:
    """A fixture under tests/fixtures, or under CKPTKIT_EXTRA_FIXTURES (fixtures not committed yet)."""
    path = FIXTURES.joinpath(*parts)
    extra = os.environ.get("CKPTKIT_EXTRA_FIXTURES")
    if not path.exists() and extra and Path(extra).joinpath(*parts).exists():
        path = Path(extra).joinpath(*parts)
    if not path.exists():
        pytest.skip(f"fixture {path} not present")
    return path


def reference_logits(name: str) -> dict:
    return torch.load(fixture_path(name, "logits.pt"), weights_only=True)


def make_hf_model(folder: Path, family: str = "gpt2", seed: int = 0, dtype=torch.float32, **config) -> Path:
    """A randomly initialised transformers model saved as safetensors (the HF side's ground truth)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    defaults = {
        "gpt2": dict(n_layer=2, n_embd=32, n_head=4, n_inner=64, n_positions=32, vocab_size=101,
                     activation_function="gelu", bos_token_id=None, eos_token_id=None),
        "llama": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, intermediate_size=48, max_position_embeddings=32, vocab_size=101,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
        "qwen2": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, max_position_embeddings=32, vocab_size=101,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
        "mistral": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=8, intermediate_size=48, max_position_embeddings=32, vocab_size=101,
                        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, sliding_window=None),
        # Qwen3: head_dim 16 is not hidden / heads (8), as in the real Qwen3 models
        "qwen3": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=48, max_position_embeddings=32, vocab_size=101,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
        "phi3": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=48, max_position_embeddings=32, original_max_position_embeddings=32,
                     vocab_size=101, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                     pad_token_id=None),
        **MOE_FACTORY_DEFAULTS,
        **DEEPSEEK_FACTORY_DEFAULTS,
    }[family].copy()  # a copy: the MoE defaults are shared module-level dicts
    defaults.update(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **defaults))
    # Make every parameter non-trivial (norm weights are ones, biases zeros at init), and
    # DeepSeek-V3's expert bias (a saved buffer, zeros at init).
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.add_(torch.randn_like(buffer) * 0.02)
    model = model.to(dtype)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # float32 in any model, as transformers keeps it
            buffer.data = buffer.data.float()
    model.save_pretrained(folder)
    return folder


class RandomReader(CheckpointReader):
    """Random canonical tensors of a spec (seeded by name): a source for ckptkit's writers
    where no Hugging Face class exists (T5) or none holds the model (BERT without its binary
    head). What it makes checks that ckptkit keeps every tensor, not that it is right."""

    def __init__(self, spec):
        from ckptkit.spec import canonical_tensors

        self.spec = spec
        self.meta = CheckpointMeta(layout="random", path=Path("random"), dtype=torch.float32)
        self.shapes = {tensor.name: tensor.shape for tensor in canonical_tensors(spec)}

    def tensor(self, name):
        generator = torch.Generator().manual_seed(sum(map(ord, name)))
        return torch.randn(self.shapes[name], generator=generator)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def converted_logits_error(source, fixture_name: str, workdir: Path) -> torch.Tensor:
    """|logits of source converted to HF - logits Megatron computed|, over the real vocabulary."""
    from ckptkit.convert import megatron_to_hf

    megatron_to_hf(source, workdir / "hf")
    reference = reference_logits(fixture_name)
    vocab = reference["vocab"]
    ours = hf_logits(workdir / "hf", reference["tokens"])[..., :vocab]
    return (ours - reference["logits"][..., :vocab].float()).abs()


def hf_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture
def copy_fixture(tmp_path):
    """Copy a fixture folder into tmp_path (tests may damage their copy)."""

    def copy(*parts) -> Path:
        source = fixture_path(*parts)
        target = tmp_path / "src" / source.name
        shutil.copytree(source, target)
        return target

    return copy


# DeepSeek: MLA with every head size distinct (q_lora 24, kv_lora 16, nope 8, rope 4, v 12),
# layer 0 dense, 8 routed experts in 4 groups of which 2 are chosen, top-4, 2 shared experts.
_DEEPSEEK_COMMON = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=48, moe_intermediate_size=16, n_shared_experts=2, first_k_dense_replace=1,
                        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                        max_position_embeddings=32, vocab_size=101, tie_word_embeddings=False, bos_token_id=None,
                        eos_token_id=None)
DEEPSEEK_FACTORY_DEFAULTS = {
    "deepseek_v3": dict(_DEEPSEEK_COMMON, n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, num_nextn_predict_layers=0),
    "deepseek_v2": dict(_DEEPSEEK_COMMON, n_routed_experts=4, num_experts_per_tok=2, topk_method="greedy",
                        routed_scaling_factor=1.5),
}

MOE_FACTORY_DEFAULTS = {
    "mixtral": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
                    vocab_size=101, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                    sliding_window=None),
    "qwen2_moe": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], decoder_sparse_step=1,
                      max_position_embeddings=32, vocab_size=101, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=None),
    "qwen3_moe": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1,
                      max_position_embeddings=32, vocab_size=101, tie_word_embeddings=False, bos_token_id=None,
                      eos_token_id=None),
}


@pytest.fixture
def region_reads(monkeypatch):
    """``(key, chunk offsets)`` of every torch_dist chunk read while the test runs."""
    from ckptkit.layouts import torch_dist

    seen = []
    original = torch_dist._DistFiles.read_data

    def spy(self, plan, planner):
        seen.extend((item.storage_index.fqn, tuple(item.storage_index.offset))
                    for item in plan.items if item.storage_index.offset is not None)
        return original(self, plan, planner)

    monkeypatch.setattr(torch_dist._DistFiles, "read_data", spy)
    return seen


def tensor_layout(folder) -> dict:
    """Every tensor key of a torch_dist folder -> (global shape, dtype, sorted chunk boxes)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ckptkit.layouts import torch_dist

    metadata = torch_dist.read_dcp_metadata(folder)
    return {key: (tuple(entry.size), entry.properties.dtype,
                  sorted((tuple(chunk.offsets), tuple(chunk.sizes)) for chunk in entry.chunks))
            for key, entry in metadata.state_dict_metadata.items() if isinstance(entry, TensorStorageMetadata)}


def byte_keys(folder) -> set:
    """Every bytes entry (ShardedObject) key of a torch_dist folder."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ckptkit.layouts import torch_dist

    metadata = torch_dist.read_dcp_metadata(folder)
    return {key for key, entry in metadata.state_dict_metadata.items() if not isinstance(entry, TensorStorageMetadata)}


def assert_same_rank_model(ours: Path, theirs: Path) -> None:
    """The ``model`` entries of two per-rank ``model_optim_rng.pt`` files hold the same keys and
    bit-identical tensors of the same dtypes and shapes (None ``_extra_state`` on both sides)."""
    from ckptkit.safe_load import safe_torch_load

    mine = safe_torch_load(ours, mmap=False)["model"]
    real = safe_torch_load(theirs, mmap=False)["model"]
    assert set(mine) == set(real)
    for key, value in real.items():
        if value is None:
            assert mine[key] is None, key  # _extra_state of the local implementation
        else:
            assert (mine[key].dtype, mine[key].shape) == (value.dtype, value.shape), key
            assert torch.equal(mine[key], value), key


def run_ckptkit(*args):
    """``ckptkit ARGS...`` in process; fails the test with the command's output unless it exits 0."""
    from click.testing import CliRunner
    from ckptkit.cli import main
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result


def optimizer_values(path):
    """A checkpoint's optimizer info and, per canonical tensor, its full state (param, exp_avg, ...)."""
    from ckptkit.optimizer import read_optimizer_state
    with read_optimizer_state(path) as state:
        return state.info, {tensor.name: state.tensor(tensor.name) for tensor in state.canonical()}


def megatron_chunks(reader):
    """Every model chunk of a per-rank checkpoint: ``(ChunkPlace, the chunk's saved state dict)``,
    TP ranks within pipeline stages, virtual chunks (``model0``, ``model1``, ...) in order."""
    from ckptkit.optimizer.parameters import ChunkPlace
    meta = reader.meta
    for pp_stage in range(meta.pp):
        for tp_rank in range(meta.tp):
            state = reader.rank_state(tp_rank, pp_stage)
            chunks = [state["model"]] if "model" in state else [state[f"model{c}"] for c in range(meta.vpp)]
            for chunk, model in enumerate(chunks):
                yield ChunkPlace(meta.tp, tp_rank, meta.pp, pp_stage, meta.vpp, chunk), model
