"""The parallel trainer computes what the single-process model computes, for every layout.

Each layout runs once on CPU worker processes over gloo (cached per module); the TP1
PP1 DP1 reference runs in this process, on the CPU. Tolerances are float32 rounding:
the reductions run in another order, nothing else differs.

The GPU section runs every two-rank layout again on two GPUs over NCCL (all of them in
one launch) against the TP1 PP1 DP1 run on one GPU, in float32 with the GPU kernels
the trainer uses there; it skips without two GPUs.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from ckptkit.spec import ModelSpec
from ckptkit.train import TrainConfig
from ckptkit.train.data import GlobalBatches, SyntheticSamples
from ckptkit.train.launch import launch, rank_device
from ckptkit.train.optim import AdamConfig
from ckptkit.train.parallel import Layout, build_groups
from ckptkit.train.trainer import Trainer
from ckptkit.train.weights import megatron_state_dict, merge_ranks

TINY = {
    # Padded vocabulary 256 at TP1 and TP2 (divisible by 64 x TP), so logits have the same width.
    "gpt2": ModelSpec(family="gpt2", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=4,
                      ffn_hidden_size=64, vocab_size=200, max_position_embeddings=32, head_dim=8),
    "llama": ModelSpec(family="llama", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=48, vocab_size=200, max_position_embeddings=32, head_dim=8,
                       position_embedding="rope", normalization="RMSNorm", activation="swiglu",
                       add_bias_linear=False, add_qkv_bias=False, tied_embeddings=False),
    # Qwen3's per-head query/key norms (replicated, each TP rank normalising its own heads), a head_dim
    # twice hidden/heads, plus Llama 3.1's RoPE scaling and a sliding window shorter than the sequence.
    "qwen3": ModelSpec(family="qwen3", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=48, vocab_size=200, max_position_embeddings=32, head_dim=16,
                       position_embedding="rope", normalization="RMSNorm", activation="swiglu",
                       add_bias_linear=False, add_qkv_bias=False, tied_embeddings=False, qk_layernorm=True,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                       sliding_window=6),
}
STEPS = 3
LOSS_ATOL = 1e-6
GRAD_ATOL = 1e-6  # gradients here are ~1e-3..1e-1
WEIGHT_ATOL = 1e-5  # Adam turns 1e-8 gradient differences into ~1e-6 weight differences

LAYOUTS = {
    "TP2": dict(tp=2),
    "PP2": dict(pp=2),
    "TP2xPP2": dict(tp=2, pp=2),
    "DP2": dict(dp=2),
    "TP2-sequence-parallel": dict(tp=2, sequence_parallel=True),
    "TP2xPP2-sequence-parallel-recompute": dict(tp=2, pp=2, sequence_parallel=True, recompute=True),
    "DP2-distributed-optimizer": dict(dp=2, distributed_optimizer=True),
}


def base_config(family: str, device: str = "cpu") -> TrainConfig:
    return TrainConfig(model=TINY[family], steps=STEPS, micro_batch_size=2, global_batch_size=8, seq_length=16,
                       make_vocab_size_divisible_by=64, optimizer=AdamConfig(lr=1e-3, warmup_steps=1),
                       device=device, dtype="float32")


def on_cpu(tensors: dict) -> dict:
    return {name: None if tensor is None else tensor.cpu() for name, tensor in tensors.items()}


def run_rank(config: TrainConfig) -> dict:
    """One rank on ``config.device``: step-0 gradients (reduced), then STEPS steps of training."""
    groups = build_groups(Layout(config.tp, config.pp, config.dp))
    trainer = Trainer(config, groups, rank_device(config.device))
    first_loss = trainer.forward_backward(0)
    trainer.optimizer.reduce_gradients()
    gradients = {name: parameter.main_grad.clone() for name, parameter in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad()
    result = trainer.run()
    return {"coordinates": (groups.tp_rank, groups.pp_stage, groups.dp_rank), "first_loss": first_loss,
            "gradients": on_cpu(gradients), "losses": result.losses,
            "grad_norms": [r.grad_norm for r in result.records], "weights": on_cpu(megatron_state_dict(trainer.model)),
            "padded": trainer.padded_vocab_size}


def canonical(outputs: list[dict], config: TrainConfig, key: str) -> dict[str, torch.Tensor]:
    """Merge DP rank 0's per-rank tensors into canonical full tensors."""
    by_rank = {(out["coordinates"][0], out["coordinates"][1]): out[key]
               for out in outputs if out["coordinates"][2] == 0}
    return merge_ranks(config.model, Layout(config.tp, config.pp, config.dp), by_rank, outputs[0]["padded"])


@functools.cache
def reference(family: str) -> list[dict]:
    return [run_rank(base_config(family))]


@functools.cache
def parallel(family: str, layout: str) -> tuple[TrainConfig, list[dict]]:
    config = dataclasses.replace(base_config(family), **LAYOUTS[layout])
    return config, launch(run_rank, config.world_size, config, device="cpu")


def max_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


# The features of "qwen3" live inside the attention, which only tensor parallelism cuts.
LAYOUTS_OF = {"qwen3": ("TP2", "TP2-sequence-parallel")}
CASES = [(family, layout) for family in TINY for layout in LAYOUTS_OF.get(family, LAYOUTS)]
IDS = [f"{family}-{layout}" for family, layout in CASES]


@pytest.mark.parametrize("family,layout", CASES, ids=IDS)
def test_parallel_forward_loss_equals_tp1pp1(family, layout):
    config, outputs = parallel(family, layout)
    expected = reference(family)[0]["first_loss"]
    for out in outputs:  # every rank reports the same global-batch loss
        assert out["first_loss"] == pytest.approx(expected, abs=LOSS_ATOL)


@pytest.mark.parametrize("family,layout", [case for case in CASES if "distributed" not in case[1]],
                         ids=[i for i, case in zip(IDS, CASES) if "distributed" not in case[1]])
def test_parallel_gradients_merged_over_ranks_equal_tp1pp1(family, layout):
    config, outputs = parallel(family, layout)
    expected = canonical(reference(family), base_config(family), "gradients")
    assert max_difference(canonical(outputs, config, "gradients"), expected) < GRAD_ATOL


@pytest.mark.parametrize("family,layout", CASES, ids=IDS)
def test_parallel_training_follows_the_tp1pp1_trajectory(family, layout):
    config, outputs = parallel(family, layout)
    ref = reference(family)[0]
    assert outputs[0]["losses"] == pytest.approx(ref["losses"], abs=LOSS_ATOL)
    assert outputs[0]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    expected = canonical([ref], base_config(family), "weights")
    assert max_difference(canonical(outputs, config, "weights"), expected) < WEIGHT_ATOL


def test_training_lowers_the_loss():
    losses = reference("gpt2")[0]["losses"]
    assert losses[-1] < losses[0]


def test_data_parallel_replicas_hold_identical_weights_after_training():
    config, outputs = parallel("llama", "DP2-distributed-optimizer")
    first, second = (out["weights"] for out in outputs)
    assert all(torch.equal(first[name], second[name]) for name in first if first[name] is not None)


@pytest.mark.parametrize("layout", LAYOUTS_OF["qwen3"])
def test_query_and_key_norms_stay_equal_on_every_tensor_parallel_rank(layout):
    config, outputs = parallel("qwen3", layout)
    first, second = (out["weights"] for out in sorted(outputs, key=lambda out: out["coordinates"]))
    norms = [name for name in first if "q_layernorm" in name or "k_layernorm" in name]
    assert len(norms) == 2 * TINY["qwen3"].num_layers
    assert all(torch.equal(first[name], second[name]) for name in norms)
    assert not torch.equal(first[norms[0]], torch.ones(16))  # trained, not left at their initial ones


def test_tied_output_copy_on_last_stage_stays_equal_to_the_embeddings():
    config, outputs = parallel("gpt2", "TP2xPP2")
    for tp_rank in range(2):
        stage0 = next(o for o in outputs if o["coordinates"] == (tp_rank, 0, 0))["weights"]
        stage1 = next(o for o in outputs if o["coordinates"] == (tp_rank, 1, 0))["weights"]
        assert torch.equal(stage0["embedding.word_embeddings.weight"], stage1["output_layer.weight"])


def test_rank_files_use_megatron_local_names_with_stage_local_layer_indices():
    config, outputs = parallel("gpt2", "TP2xPP2")
    stage0 = next(o for o in outputs if o["coordinates"] == (0, 0, 0))["weights"]
    stage1 = next(o for o in outputs if o["coordinates"] == (0, 1, 0))["weights"]
    layers = lambda state: sorted({int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")})
    assert layers(stage0) == layers(stage1) == [0, 1]
    assert "embedding.word_embeddings.weight" in stage0 and "embedding.position_embeddings.weight" in stage0
    assert "output_layer.weight" not in stage0 and "decoder.final_layernorm.weight" not in stage0
    assert "embedding.word_embeddings.weight" not in stage1
    assert {"decoder.final_layernorm.weight", "output_layer.weight", "output_layer._extra_state"} <= set(stage1)
    assert stage0["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (48, 32)  # 2 of 4 heads
    assert stage0["embedding.word_embeddings.weight"].shape == (128, 32)  # half of the padded 256


def test_tied_single_stage_rank_has_no_output_layer_weight():
    weights = reference("gpt2")[0]["weights"]
    assert "output_layer.weight" not in weights
    assert "embedding.word_embeddings.weight" in weights


def test_untied_llama_rank_holds_its_own_output_layer():
    weights = reference("llama")[0]["weights"]
    assert weights["output_layer.weight"].shape == (256, 32)
    assert not torch.equal(weights["output_layer.weight"], weights["embedding.word_embeddings.weight"])


@pytest.mark.parametrize("dp,micro_batch_size", [(1, 8), (1, 2), (2, 1), (4, 2)])
def test_every_layout_sees_the_same_global_batch(dp, micro_batch_size):
    batches = GlobalBatches(SyntheticSamples(vocab_size=50, seq_length=6, seed=3), global_batch_size=8, seed=3)
    for step in (0, 5):
        per_rank = [batches.microbatches(step, dp_rank, dp, micro_batch_size) for dp_rank in range(dp)]
        # Megatron's order: micro-batch m of DP rank d holds rows (m x DP + d) x B ...
        rows = [per_rank[d][m] for m in range(len(per_rank[0])) for d in range(dp)]
        assert torch.equal(torch.cat(rows), batches.global_batch(step))


# ---------------------------------------------------------------------------- two GPUs over NCCL

# The CPU tolerances hold: float32 on GPUs differs between layouts no more than on the CPU.
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
GPU_CASES = [case for case in CASES if dataclasses.replace(base_config(case[0]), **LAYOUTS[case[1]]).world_size == 2]
GPU_IDS = [f"{family}-{layout}" for family, layout in GPU_CASES]


def gpu_config(family: str, layout: str | None = None) -> TrainConfig:
    return dataclasses.replace(base_config(family, device="cuda"), **(LAYOUTS[layout] if layout else {}))


def run_rank_of_each(configs: list[TrainConfig]) -> list[dict]:
    """This rank's results for each two-rank run in turn (one launch, one NCCL world, new groups per run)."""
    return [run_rank(config) for config in configs]


@functools.cache
def gpu_reference(family: str) -> dict:
    return run_rank(gpu_config(family))


@functools.cache
def gpu_parallel() -> dict[tuple[str, str], tuple[TrainConfig, list[dict]]]:
    configs = [gpu_config(family, layout) for family, layout in GPU_CASES]
    per_rank = launch(run_rank_of_each, 2, configs, device="cuda")
    return {case: (config, [ranks[index] for ranks in per_rank])
            for index, (case, config) in enumerate(zip(GPU_CASES, configs))}


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("family,layout", GPU_CASES, ids=GPU_IDS)
def test_nccl_on_two_gpus_forward_loss_equals_one_gpu(family, layout, record_property):
    config, outputs = gpu_parallel()[(family, layout)]
    difference = max(abs(out["first_loss"] - gpu_reference(family)["first_loss"]) for out in outputs)
    record_property("loss_difference", f"{difference:.2e}")
    assert difference < LOSS_ATOL


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("family,layout", [case for case in GPU_CASES if "distributed" not in case[1]],
                         ids=[i for i, case in zip(GPU_IDS, GPU_CASES) if "distributed" not in case[1]])
def test_nccl_on_two_gpus_gradients_merged_over_ranks_equal_one_gpu(family, layout, record_property):
    config, outputs = gpu_parallel()[(family, layout)]
    expected = canonical([gpu_reference(family)], gpu_config(family), "gradients")
    difference = max_difference(canonical(outputs, config, "gradients"), expected)
    record_property("gradient_difference", f"{difference:.2e}")
    assert difference < GRAD_ATOL


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("family,layout", GPU_CASES, ids=GPU_IDS)
def test_nccl_on_two_gpus_training_follows_the_one_gpu_trajectory(family, layout, record_property):
    config, outputs = gpu_parallel()[(family, layout)]
    ref = gpu_reference(family)
    losses = max(abs(a - b) for a, b in zip(outputs[0]["losses"], ref["losses"]))
    weights = max_difference(canonical(outputs, config, "weights"), canonical([ref], gpu_config(family), "weights"))
    record_property("loss_difference_over_steps", f"{losses:.2e}")
    record_property("weight_difference_after_steps", f"{weights:.2e}")
    norms = max(abs(a / b - 1) for a, b in zip(outputs[0]["grad_norms"], ref["grad_norms"]))
    record_property("grad_norm_relative_difference", f"{norms:.2e}")
    assert losses < LOSS_ATOL
    assert outputs[0]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert weights < WEIGHT_ATOL
