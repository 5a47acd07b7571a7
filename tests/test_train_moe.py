"""The trainer's mixture-of-experts layers compute what transformers and Megatron-Core compute,
and expert parallelism changes nothing but where the experts live.

Parallel layouts run once each on CPU worker processes over gloo (cached per module);
the TP1 DP1 EP1 reference runs in this process, on the CPU. Tolerances are float32
rounding. The GPU section runs the two-rank layouts again on two GPUs over NCCL
against one GPU; it skips without two GPUs.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch
from click.testing import CliRunner

from ckptkit.convert import reshard
from ckptkit.errors import BadInput
from ckptkit.layouts import open_checkpoint
from ckptkit.safe_load import safe_torch_load
from ckptkit.spec import ModelSpec, canonical_tensors
from ckptkit.train import TrainConfig, train
from ckptkit.train.command import train as train_command
from ckptkit.train.launch import launch, rank_device
from ckptkit.train.logits import megatron_logits
from ckptkit.train.model import GPT
from ckptkit.train.optim import AdamConfig
from ckptkit.train.parallel import Layout, build_groups
from ckptkit.train.trainer import Trainer, build_model
from ckptkit.train.weights import canonical_name, initial_weights, megatron_state_dict, merge_ranks

from conftest import fixture_path, hf_logits, make_hf_model, reference_logits

# ---------------------------------------------------------------------------- against transformers

HF_CASES = {
    "mixtral": ("mixtral", {}),
    # shared expert with its sigmoid gate, layer 0 dense (mlp_only_layers), no renormalisation of the top k
    "qwen2_moe-shared-gate-dense-layer": ("qwen2_moe", {"norm_topk_prob": False}),
    "qwen3_moe-norm-topk": ("qwen3_moe", {"norm_topk_prob": True}),
    "qwen3_moe-no-norm-topk": ("qwen3_moe", {"norm_topk_prob": False}),
}
LOGITS_ATOL = 1e-5


def hf_tokens(batch=2, length=16):
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(0))


@functools.cache
def hf_folder(case: str, root):
    family, config = HF_CASES[case]
    return make_hf_model(root / case, family, **config)


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_moe")


def plain_model_from(folder) -> GPT:
    with open_checkpoint(folder) as reader:
        model = build_model(reader.spec, build_groups(Layout()), reader.spec.vocab_size, reader.tensor,
                            device="cpu", dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("case", HF_CASES)
def test_moe_model_with_transformers_weights_gives_transformers_logits(case, hf_root):
    folder = hf_folder(case, hf_root)
    model = plain_model_from(folder)
    spec = model.spec
    family, config = HF_CASES[case]
    assert spec.num_experts == 4 and spec.moe_router_topk == 2
    assert spec.moe_router_pre_softmax == (not config.get("norm_topk_prob", True))
    if family == "qwen2_moe":
        assert spec.moe_layers == (0, 1, 1) and spec.moe_shared_expert_gate and spec.moe_shared_expert_size == 24
    tokens = hf_tokens()
    with torch.no_grad():
        ours = model(tokens)[..., :spec.vocab_size]
    assert (ours - hf_logits(folder, tokens)).abs().max().item() < LOGITS_ATOL


def test_megatron_logits_at_ep2_equal_transformers_logits(hf_root):
    folder = hf_folder("qwen2_moe-shared-gate-dense-layer", hf_root)
    tokens = hf_tokens()
    ours = megatron_logits(folder, tokens, ep=2)[..., :101]
    assert (ours - hf_logits(folder, tokens)).abs().max().item() < LOGITS_ATOL


# Real Megatron-LM checkpoints (local spec, all-gather token dispatcher, EP2, float32, torch_dist):
# Mixtral-like (4 experts, top-2) and Qwen2-MoE-like (shared expert with gate, layer 0 dense, pre-softmax).
REAL_MOE = ("moe_mixtral_tp1ep2", "moe_qwen2_tp1ep2")


@pytest.mark.parametrize("ep", [None, 1], ids=["in-its-own-ep2-layout", "at-ep1"])
@pytest.mark.parametrize("name", REAL_MOE)
def test_real_megatron_moe_checkpoint_reproduces_megatron_logits(name, ep):
    path = fixture_path(name, "dist")
    with open_checkpoint(path) as reader:
        assert reader.meta.ep == 2 and reader.spec.num_experts == 4
    reference = reference_logits(name)
    vocab = reference["vocab"]
    ours = megatron_logits(path, reference["tokens"], ep=ep)[..., :vocab]
    assert (ours - reference["logits"][..., :vocab].float()).abs().max().item() < 2e-6


# ---------------------------------------------------------------------------- names

# Two dense-free MoE layers after a dense one; shared expert with gate; padded vocabulary 256.
TINY_MOE = ModelSpec(family="qwen2_moe", num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=48, vocab_size=200, max_position_embeddings=32, head_dim=8,
                     position_embedding="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                     add_qkv_bias=False, tied_embeddings=False, num_experts=4, moe_ffn_hidden_size=16,
                     moe_router_topk=2, moe_layers=(0, 1, 1, 1), moe_shared_expert_size=24,
                     moe_shared_expert_gate=True)


def test_plain_moe_model_parameters_are_the_canonical_megatron_names():
    with torch.device("meta"):
        model = GPT(TINY_MOE, padded_vocab_size=256)
    names = [name for name, _ in model.named_parameters()]
    assert sorted(names) == sorted(entry.name for entry in canonical_tensors(TINY_MOE))
    layer = [name.removeprefix("decoder.layers.1.mlp.") for name in names if name.startswith("decoder.layers.1.mlp.")]
    modules = list(dict.fromkeys(name.split(".")[0] for name in layer))
    assert modules == ["router", "experts", "shared_experts"]  # Megatron's MoELayer builds them in this order
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names  # the dense layer keeps its MLP
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight" in names
    assert "decoder.layers.1.mlp.shared_experts.gate_weight" in names


def test_expert_parallel_rank_holds_its_global_experts_under_local_indices():
    # EP rank 1 of 2 with 4 experts holds global experts 2 and 3 as local_experts.0 and .1
    assert (canonical_name(TINY_MOE, "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight", 0, 1,
                           ep_rank=1, ep=2) == "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight")
    config, outputs = parallel("DP2-EP2")
    for out in outputs:
        experts = {name.split(".")[6] for name in out["weights"] if ".local_experts." in name}
        assert experts == {"0", "1"}
    ep1 = next(out for out in outputs if out["coordinates"] == (0, 0, 1))
    fc1 = initial_weights(TINY_MOE, config.seed)("decoder.layers.2.mlp.experts.local_experts.2.linear_fc1.weight")
    assert torch.equal(ep1["initial"]["decoder.layers.2.mlp.experts.local_experts.0.linear_fc1.weight"], fc1)


# ---------------------------------------------------------------------------- parallel layouts

STEPS = 3
LOSS_ATOL = 1e-6
GRAD_ATOL = 1e-6
WEIGHT_ATOL = 1e-5

LAYOUTS = {
    "TP2": dict(tp=2, sequence_parallel=True),  # experts cut over TP (expert tensor parallelism = TP)
    "DP2-EP2": dict(dp=2, ep=2),
    "DP2-EP2-distributed-optimizer": dict(dp=2, ep=2, distributed_optimizer=True),
    "DP4-EP2": dict(dp=4, ep=2),  # two expert-data-parallel replicas of each EP rank
    "TP2xDP2-EP2-sequence-parallel": dict(tp=2, dp=2, ep=2, sequence_parallel=True),
    "TP2xDP2-EP2": dict(tp=2, dp=2, ep=2),
    "PP2xDP2-EP2-recompute": dict(pp=2, dp=2, ep=2, recompute=True),
}


def base_config(device: str = "cpu") -> TrainConfig:
    return TrainConfig(model=TINY_MOE, steps=STEPS, micro_batch_size=2, global_batch_size=8, seq_length=16,
                       make_vocab_size_divisible_by=64, optimizer=AdamConfig(lr=1e-3, warmup_steps=1),
                       device=device, dtype="float32")


def on_cpu(tensors: dict) -> dict:
    return {name: None if tensor is None else tensor.cpu() for name, tensor in tensors.items()}


def run_rank(config: TrainConfig) -> dict:
    """One rank on ``config.device``: its initial weights, step-0 gradients (reduced), then STEPS steps."""
    groups = build_groups(Layout(config.tp, config.pp, config.dp, config.ep))
    trainer = Trainer(config, groups, rank_device(config.device))
    initial = on_cpu(megatron_state_dict(trainer.model))
    first_loss = trainer.forward_backward(0)
    trainer.optimizer.reduce_gradients()
    gradients = {name: parameter.main_grad.clone() for name, parameter in trainer.model.named_parameters()}
    trainer.optimizer.zero_grad()
    result = trainer.run()
    return {"coordinates": (groups.tp_rank, groups.pp_stage, groups.ep_rank), "expert_dp_rank": groups.expert_dp_rank,
            "dp_rank": groups.dp_rank, "first_loss": first_loss, "gradients": on_cpu(gradients), "initial": initial,
            "losses": result.losses, "grad_norms": [r.grad_norm for r in result.records],
            "weights": on_cpu(megatron_state_dict(trainer.model)), "padded": trainer.padded_vocab_size}


def canonical(outputs: list[dict], config: TrainConfig, key: str) -> dict[str, torch.Tensor]:
    """Merge expert-DP rank 0's per-rank tensors (every TP rank, stage and EP rank) into full tensors."""
    by_rank = {out["coordinates"]: out[key] for out in outputs if out["expert_dp_rank"] == 0}
    return merge_ranks(config.model, Layout(config.tp, config.pp, config.dp, config.ep), by_rank,
                       outputs[0]["padded"])


@functools.cache
def reference() -> dict:
    return run_rank(base_config())


@functools.cache
def parallel(layout: str) -> tuple[TrainConfig, list[dict]]:
    config = dataclasses.replace(base_config(), **LAYOUTS[layout])
    return config, launch(run_rank, config.world_size, config, device="cpu")


def max_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_parallel_forward_loss_equals_ep1(layout):
    config, outputs = parallel(layout)
    for out in outputs:
        assert out["first_loss"] == pytest.approx(reference()["first_loss"], abs=LOSS_ATOL)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if "distributed" not in name])
def test_expert_parallel_gradients_merged_over_ranks_equal_ep1(layout):
    config, outputs = parallel(layout)
    expected = canonical([reference()], base_config(), "gradients")
    assert max_difference(canonical(outputs, config, "gradients"), expected) < GRAD_ATOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_parallel_training_follows_the_ep1_trajectory(layout):
    config, outputs = parallel(layout)
    ref = reference()
    assert outputs[0]["losses"] == pytest.approx(ref["losses"], abs=LOSS_ATOL)
    assert outputs[0]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    expected = canonical([ref], base_config(), "weights")
    assert max_difference(canonical(outputs, config, "weights"), expected) < WEIGHT_ATOL


def test_moe_training_lowers_the_loss_and_trains_every_expert():
    ref = reference()
    assert ref["losses"][-1] < ref["losses"][0]
    experts = [name for name in ref["weights"] if ".local_experts." in name and name.endswith(".weight")]
    assert len(experts) == 3 * 4 * 2  # 3 MoE layers x 4 experts x (fc1, fc2)
    assert all(not torch.equal(ref["weights"][name], ref["initial"][name]) for name in experts)


def test_expert_data_parallel_replicas_hold_identical_experts_and_ep_ranks_different_ones():
    config, outputs = parallel("DP4-EP2")
    by_dp = {out["dp_rank"]: out["weights"] for out in outputs}
    expert = "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"
    assert torch.equal(by_dp[0][expert], by_dp[2][expert]) and torch.equal(by_dp[1][expert], by_dp[3][expert])
    assert not torch.equal(by_dp[0][expert], by_dp[1][expert])  # global experts 0 and 2
    router = "decoder.layers.1.mlp.router.weight"
    assert all(torch.equal(by_dp[0][router], by_dp[dp][router]) for dp in (1, 2, 3))


# ---------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("sizes,message", [
    (dict(dp=2, ep=4), "EP=4 must divide DP=2"),
    (dict(dp=3, ep=3, global_batch_size=6), "EP=3 does not divide 4 experts"),
])
def test_expert_parallel_sizes_that_do_not_fit_are_refused(sizes, message):
    config = dataclasses.replace(base_config(), **sizes)
    with pytest.raises(BadInput, match=message):
        config.check(TINY_MOE)


def test_expert_parallelism_of_a_dense_model_is_refused():
    dense = dataclasses.replace(TINY_MOE, num_experts=0, moe_layers=None)
    with pytest.raises(BadInput, match="EP=2 needs a mixture-of-experts model"):
        dataclasses.replace(base_config(), model=dense, dp=2, ep=2).check(dense)


# ---------------------------------------------------------------------------- checkpoints

def test_a_moe_run_saves_its_optimizer_state_in_the_trainers_own_entry_and_says_so(tmp_path):
    run = dataclasses.replace(base_config(), save=str(tmp_path / "run"), save_interval=1)
    with pytest.warns(UserWarning, match="trainer's own entry .*mixture-of-experts"):  # ckptkit.optimizer refuses MoE
        full = train(run)
    state = safe_torch_load(tmp_path / "run" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")
    adam = state["optimizer"]["ckptkit_adam"]
    assert adam["step"] == 1 and "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in adam["params"]
    resumed = train(dataclasses.replace(base_config(), load=str(tmp_path / "run" / "iter_0000001")))
    assert resumed.losses == full.losses[1:]  # same layout: the trainer's own entry, restored bit for bit
    notes = reshard(tmp_path / "run", tmp_path / "tp2", tp=2, pp=1).notes  # the weights, and a word on the rest
    assert any(note.startswith("no optimizer state carried: ") and "ckptkit's trainer's own" in note for note in notes)


def test_an_expert_parallel_run_saves_a_folder_per_ep_rank_and_resumes_exactly(tmp_path):
    run = dataclasses.replace(base_config(), **LAYOUTS["DP2-EP2-distributed-optimizer"], save=str(tmp_path / "run"),
                              save_interval=1)
    full = train(run)
    saved = tmp_path / "run" / "iter_0000003"
    assert sorted(path.name for path in saved.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    experts = safe_torch_load(saved / "mp_rank_00_001" / "model_optim_rng.pt")["model"]
    assert sorted({name.split(".")[6] for name in experts if ".local_experts." in name}) == ["0", "1"]  # local
    with open_checkpoint(tmp_path / "run") as reader:
        assert (reader.meta.ep, reader.meta.iteration) == (2, 3) and reader.validate() == []
        # global expert 3 lives on EP rank 1 as local expert 1: the EP1 run's expert after three steps
        ep1 = canonical([reference()], base_config(), "weights")
        assert max_difference({name: reader.tensor(name) for name in ep1}, ep1) < WEIGHT_ATOL
    resumed = train(dataclasses.replace(run, load=str(tmp_path / "run" / "iter_0000001"), save=None))
    assert resumed.losses == full.losses[1:]
    assert [r.grad_norm for r in resumed.records] == [r.grad_norm for r in full.records[1:]]


def test_train_command_passes_ep_and_refuses_it_before_starting_workers(tmp_path):
    model_json = tmp_path / "moe.json"
    model_json.write_text(json.dumps({field: value for field, value in dataclasses.asdict(TINY_MOE).items()
                                      if field != "family"}))
    result = CliRunner().invoke(train_command, ["--model", "llama", "--config", str(model_json), "--dp", "2",
                                                "--ep", "4", "--steps", "1"])
    assert result.exit_code != 0 and "EP=4 must divide DP=2" in result.output


# ---------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_moe_model_on_gpu_gives_the_cpu_logits(hf_root):
    model = plain_model_from(hf_folder("qwen2_moe-shared-gate-dense-layer", hf_root))
    tokens = hf_tokens()
    with torch.no_grad():
        cpu = model(tokens)
        gpu = model.cuda()(tokens.cuda()).cpu()
    assert (gpu - cpu).abs().max().item() < 1e-4


def run_rank_of_each(configs: list[TrainConfig]) -> list[dict]:
    """This rank's results for each two-rank configuration in turn (one launch, new groups per run)."""
    return [run_rank(config) for config in configs]


GPU_LAYOUTS = [name for name in LAYOUTS if dataclasses.replace(base_config(), **LAYOUTS[name]).world_size == 2]
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@functools.cache
def gpu_reference() -> dict:
    return run_rank(base_config(device="cuda"))


@functools.cache
def gpu_parallel() -> dict[str, tuple[TrainConfig, list[dict]]]:
    configs = [dataclasses.replace(base_config(device="cuda"), **LAYOUTS[name]) for name in GPU_LAYOUTS]
    per_rank = launch(run_rank_of_each, 2, configs, device="cuda")
    return {name: (config, [ranks[index] for ranks in per_rank])
            for index, (name, config) in enumerate(zip(GPU_LAYOUTS, configs))}


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_expert_parallel_with_nccl_on_two_gpus_gives_the_one_gpu_loss(layout, record_property):
    config, outputs = gpu_parallel()[layout]
    loss = max(abs(out["first_loss"] - gpu_reference()["first_loss"]) for out in outputs)
    record_property("loss_difference", f"{loss:.2e}")
    assert loss < LOSS_ATOL


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("layout", [name for name in GPU_LAYOUTS if "distributed" not in name])
def test_expert_parallel_with_nccl_on_two_gpus_gradients_merged_over_ranks_equal_one_gpu(layout, record_property):
    config, outputs = gpu_parallel()[layout]
    gradients = max_difference(canonical(outputs, config, "gradients"),
                               canonical([gpu_reference()], base_config(), "gradients"))
    record_property("gradient_difference", f"{gradients:.2e}")
    assert gradients < GRAD_ATOL


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_expert_parallel_with_nccl_on_two_gpus_follows_the_one_gpu_trajectory(layout, record_property):
    config, outputs = gpu_parallel()[layout]
    ref = gpu_reference()
    losses = max(abs(a - b) for a, b in zip(outputs[0]["losses"], ref["losses"]))
    weights = max_difference(canonical(outputs, config, "weights"), canonical([ref], base_config(), "weights"))
    record_property("loss_difference_over_steps", f"{losses:.2e}")
    record_property("weight_difference_after_steps", f"{weights:.2e}")
    norms = max(abs(a / b - 1) for a, b in zip(outputs[0]["grad_norms"], ref["grad_norms"]))
    record_property("grad_norm_relative_difference", f"{norms:.2e}")
    assert losses < LOSS_ATOL
    assert outputs[0]["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)
    assert weights < WEIGHT_ATOL


@pytest.mark.gpu
@needs_two_gpus
def test_expert_parallel_with_nccl_on_two_gpus_follows_the_cpu_trajectory():
    config, outputs = gpu_parallel()["DP2-EP2"]
    ref = reference()
    for out in outputs:
        assert out["losses"] == pytest.approx(ref["losses"], abs=1e-4)
        assert out["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-3)
