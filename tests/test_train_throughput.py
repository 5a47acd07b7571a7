"""The trainer's throughput options compute what the plain path computes.

* ``grad_accumulation="batched"`` adds each micro-batch's gradients to the float32
  ``main_grad`` buffers after its backward instead of by a hook per parameter: the same
  adds, so the same numbers, in every layout;
* ``gelu_operator`` keeps bias + GeLU as the operator ``torch.ops.ckptkit.bias_gelu``
  inside a compiled model: it trains as the eager model;
* ``step_graph`` replays the whole step as one CUDA graph: on a GPU it trains as the
  steps launched one operation at a time (skipped without a GPU), and it is refused
  where it cannot run.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ckptkit import kernels
from ckptkit.errors import BadInput, Unsupported
from ckptkit.spec import ModelSpec
from ckptkit.train import TrainConfig
from ckptkit.train.launch import launch
from ckptkit.train.optim import AdamConfig
from ckptkit.train.trainer import run_training

GPT2 = ModelSpec(family="gpt2", num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=4,
                 ffn_hidden_size=64, vocab_size=200, max_position_embeddings=32, head_dim=8)
needs_gpu = pytest.mark.skipif(not kernels.fused_available(), reason="needs a CUDA GPU and Triton")


def config(**changes) -> TrainConfig:
    base = TrainConfig(model=GPT2, steps=3, micro_batch_size=2, global_batch_size=8, seq_length=16,
                       make_vocab_size_divisible_by=64, optimizer=AdamConfig(lr=1e-3, warmup_steps=1),
                       device="cpu", dtype="float32")
    return dataclasses.replace(base, **changes)


def trajectory(run_config: TrainConfig) -> tuple[list[float], list[float]]:
    if run_config.world_size == 1:
        result = run_training(run_config, run_config.device)
    else:
        result = launch(run_training, run_config.world_size, run_config, "cpu", device="cpu")[0]
    return result.losses, [record.grad_norm for record in result.records]


# ---------------------------------------------------------------------------- batched accumulation

@pytest.mark.parametrize("layout", [dict(), dict(pp=2), dict(tp=2, dp=2, distributed_optimizer=True)],
                         ids=["TP1", "PP2", "TP2xDP2-distributed-optimizer"])
def test_batched_gradient_accumulation_gives_the_hooks_numbers(layout):
    hooks = trajectory(config(**layout, grad_accumulation="hooks"))
    batched = trajectory(config(**layout, grad_accumulation="batched"))
    assert batched == hooks  # the same float32 adds, in the same order per parameter


def test_reference_gradient_accumulator_adds_each_gradient_to_its_run():
    main = torch.zeros(10)
    accumulator = kernels.gradient_accumulator([3, 2, 5], [0, 3, 5], main)
    accumulator.add([torch.ones(3), None, torch.arange(5.0)])
    accumulator.add([torch.ones(3), None, torch.arange(5.0)])
    assert main.tolist() == [2, 2, 2, 0, 0, 0, 2, 4, 6, 8]


def test_unknown_grad_accumulation_is_refused():
    with pytest.raises(BadInput, match="grad accumulation 'per-tensor'"):
        config(grad_accumulation="per-tensor").check_layout()


# ---------------------------------------------------------------------------- GeLU operator

@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_operator_is_gelu_of_x_plus_bias_with_its_gradients(with_bias, approximate):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 24, generator=generator, dtype=torch.float64)
    bias = torch.randn(24, generator=generator, dtype=torch.float64) if with_bias else None
    grad = torch.randn(6, 5, 24, generator=generator, dtype=torch.float64)

    def output_and_grads(function):
        leaves = [x.clone().requires_grad_()] + ([bias.clone().requires_grad_()] if with_bias else [])
        output = function(leaves[0], leaves[1] if with_bias else None)
        output.backward(grad)
        return [output.detach()] + [leaf.grad for leaf in leaves]

    ours = output_and_grads(lambda a, b: kernels.bias_gelu_operator(a, b, approximate))
    expected = output_and_grads(lambda a, b: torch.nn.functional.gelu(a if b is None else a + b,
                                                                      approximate=approximate))
    for mine, theirs in zip(ours, expected, strict=True):
        assert (mine - theirs).abs().max().item() < 1e-12


def test_bias_gelu_operator_passes_torch_operator_checks():
    x = torch.randn(3, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.ckptkit.bias_gelu, (x, torch.randn(8, requires_grad=True), "none"))
    torch.library.opcheck(torch.ops.ckptkit.bias_gelu, (x, None, "tanh"))


def test_compiled_model_with_the_gelu_operator_trains_as_the_eager_model():
    run = config(global_batch_size=4, steps=2)
    eager = trajectory(run)
    compiled = trajectory(dataclasses.replace(run, compile=True, compile_scope="model", gelu_operator=True))
    assert compiled[0] == pytest.approx(eager[0], abs=1e-5)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-4)


# ---------------------------------------------------------------------------- CUDA graph of the step

@pytest.mark.parametrize("sizes", [dict(tp=2), dict(dp=2), dict(device="cpu")])
def test_step_graph_is_refused_off_a_single_gpu_rank(sizes):
    with pytest.raises(Unsupported, match="CUDA graph of the whole step needs one rank on a GPU"):
        config(step_graph=True, **sizes).check_layout()


@needs_gpu
@pytest.mark.parametrize("changes", [dict(grad_accumulation="hooks"), dict(grad_accumulation="batched")],
                         ids=["hooks", "batched"])
def test_step_graph_on_a_gpu_trains_as_the_steps_launched_one_by_one(changes):
    # Five steps of four micro-batches: the first step eager, the second captured, three replays
    # (each with its own tokens and learning rate, read from device memory).
    run = config(device="cuda", steps=5, fused_kernels=True, optimizer=AdamConfig(lr=1e-3, warmup_steps=2),
                 **changes)
    launched = trajectory(run)
    replayed = trajectory(dataclasses.replace(run, step_graph=True))
    assert replayed[0] == pytest.approx(launched[0], abs=1e-6)
    assert replayed[1] == pytest.approx(launched[1], rel=1e-5)


@needs_gpu
def test_compiled_model_with_the_triton_gelu_operator_on_a_gpu_trains_as_the_eager_model():
    run = config(device="cuda", global_batch_size=4, steps=3)
    eager = trajectory(dataclasses.replace(run, fused_kernels=False))
    compiled = trajectory(dataclasses.replace(run, fused_kernels=True, compile=True, compile_scope="model",
                                              gelu_operator=True, grad_accumulation="batched"))
    assert compiled[0] == pytest.approx(eager[0], abs=1e-5)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-4)
