"""Mixture-of-experts checkpoints in both Megatron formats, at any TP/PP/VPP/EP.

The real checkpoints are Megatron-LM's own, TP1 EP2, float32, with the logits Megatron
computed for them: torch_dist ``moe_*_tp1ep2/dist`` (Mixtral style with every layer MoE, so
keys stacked over layers; Qwen2-MoE style with a dense first layer and a gated shared expert,
and Qwen3-MoE style with q/k norms and a dense first layer, so keys per layer) and per-rank
files ``moe_*_ep2_torch/torch`` (one folder per EP rank, experts under local indices).
"""
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from ckptkit.cli import main
from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.errors import BadInput, Unsupported
from ckptkit.inspection import inspect_checkpoint
from ckptkit.layouts import open_checkpoint, torch_dist
from ckptkit.layouts.megatron_common import TargetLayout
from ckptkit.safe_load import safe_torch_load
from ckptkit.verification import verify

from conftest import assert_same_rank_model, assert_same_state, byte_keys, converted_logits_error, fixture_path, hf_logits, hf_state, make_hf_model, tensor_layout

FLOAT32_LOGITS_ATOL = 1e-5  # a hand merge reaches ~1e-6
REAL = ["moe_mixtral_tp1ep2", "moe_qwen2_tp1ep2"]
# per-rank Mixtral style: moe_optim_ep2 (hidden 32, 4 experts of ffn 16, saved with its optimizer state)
REAL_PER_RANK = {"moe_optim_ep2": "torch_distributed", "moe_qwen2_ep2_torch": "torch"}
REAL_ALL = {"moe_mixtral_tp1ep2": "dist", "moe_qwen2_tp1ep2": "dist", "moe_qwen3_tp1ep2": "dist", **REAL_PER_RANK}
EXPERT_FC1 = "decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight"


def real_dist(name):
    return fixture_path(name, "dist")


def rank_model(path) -> dict:
    return safe_torch_load(path, mmap=False)["model"]


def moe_hf(tmp_path, family="mixtral", **config):
    return make_hf_model(tmp_path / f"hf_{family}", family, num_hidden_layers=4, **config)


# ---------------------------------------------------------------------------- real Megatron files

@pytest.mark.parametrize("name", sorted(REAL_ALL))
def test_real_megatron_moe_reproduces_megatron_logits(name, tmp_path):
    error = converted_logits_error(fixture_path(name, REAL_ALL[name]), name, tmp_path)
    assert error.max().item() < FLOAT32_LOGITS_ATOL


@pytest.mark.parametrize("name", sorted(REAL_PER_RANK))
def test_real_per_rank_moe_rewritten_has_megatrons_folders_keys_shapes_and_extra_state(name, tmp_path):
    source = fixture_path(name, REAL_PER_RANK[name])
    result = reshard(source, tmp_path / "out", tp=1, pp=1)
    assert result.target_layout["ep"] == 2
    real, ours = source / "iter_0000010", tmp_path / "out" / "iter_0000010"
    assert sorted(path.name for path in ours.iterdir()) == sorted(path.name for path in real.iterdir()) == \
        ["mp_rank_00_000", "mp_rank_00_001"]
    for folder in ("mp_rank_00_000", "mp_rank_00_001"):
        assert_same_rank_model(ours / folder / "model_optim_rng.pt", real / folder / "model_optim_rng.pt")


def test_real_per_rank_and_torch_dist_moe_read_as_the_same_experts(tmp_path):
    """Local expert e of EP rank r is global expert 2r + e: the per-rank fixture written as
    torch_dist stores each expert at its global index."""
    source = fixture_path("moe_optim_ep2", "torch_distributed")
    reshard(source, tmp_path / "dist", tp=1, pp=1, format="torch_dist")
    assert verify(source, tmp_path / "dist").equivalent
    ep1 = rank_model(source / "iter_0000010" / "mp_rank_00_001" / "model_optim_rng.pt")
    with open_checkpoint(tmp_path / "dist") as reader:
        assert torch.equal(reader.tensor(EXPERT_FC1.format(layer=1, expert=3)),
                           ep1["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"])


@pytest.mark.parametrize("name", REAL + ["moe_qwen3_tp1ep2"])
def test_real_moe_rewritten_as_torch_dist_has_megatrons_keys_shapes_chunks_and_extra_state(name, tmp_path):
    source = real_dist(name)
    with open_checkpoint(source) as reader:
        torch_dist.write(reader, tmp_path, TargetLayout(tp=1, pp=1, ep=2, iteration=10, args_base=reader.meta.args))
        real, ours = source / "iter_0000010", tmp_path / "iter_0000010"
        assert tensor_layout(ours) == tensor_layout(real)
        # Per-rank rerun state belongs to the old job (Megatron skips it when the common state has none).
        assert byte_keys(ours) == {key for key in byte_keys(real) if not key.startswith("rerun_state_machine_state/")}
        with open_checkpoint(tmp_path) as back:
            for canonical in reader.canonical():
                assert torch.equal(back.tensor(canonical.name), reader.tensor(canonical.name)), canonical.name


def test_experts_of_layers_of_one_structure_are_stacked_and_of_mixed_layers_keyed_per_layer():
    with open_checkpoint(real_dist("moe_mixtral_tp1ep2")) as stacked, \
            open_checkpoint(real_dist("moe_qwen2_tp1ep2")) as per_layer:
        place = stacked.stored_place(EXPERT_FC1.format(layer=1, expert=3))
        assert (place.key, place.index, place.axes) == \
            ("decoder.layers.mlp.experts.experts.linear_fc1.weight", (1, 3), (2, 4))
        place = per_layer.stored_place(EXPERT_FC1.format(layer=2, expert=3))
        assert (place.key, place.index, place.axes) == \
            ("decoder.layers.2.mlp.experts.experts.linear_fc1.weight", (3,), (4,))
        # The MoE layer's pre-MLP norm keeps the fused name of a linear_fc1 it does not have.
        assert per_layer.stored_key("decoder.layers.1.pre_mlp_layernorm.weight") == \
            "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
        assert per_layer.stored_key("decoder.layers.1.mlp.shared_experts.gate_weight") == \
            "decoder.layers.1.mlp.shared_experts.gate_weight"
        # One _extra_state per expert linear and layer, and per shared-expert and attention linear.
        assert len(stacked.skipped["extra_state"]) == 2 * (2 + 2 * 4)
        assert len(per_layer.skipped["extra_state"]) == 4 + 2 * (2 + 2 * 4 + 2)
        assert (stacked.meta.ep, stacked.meta.etp, per_layer.meta.ep) == (2, 1, 2)


def test_reading_one_expert_reads_only_that_experts_chunks(region_reads):
    seen = region_reads
    with open_checkpoint(real_dist("moe_mixtral_tp1ep2")) as reader:
        chunks = reader.metadata.state_dict_metadata["decoder.layers.mlp.experts.experts.linear_fc1.weight"].chunks
        sizes = {tuple(chunk.offsets): chunk.sizes.numel() for chunk in chunks}
        seen.clear()
        expert = reader.tensor(EXPERT_FC1.format(layer=1, expert=3))
    assert expert.shape == (128, 96)
    assert sorted(seen) == [("decoder.layers.mlp.experts.experts.linear_fc1.weight", (1, 3, rows, 0))
                            for rows in (0, 64)]  # gate and up halves of this expert
    assert sum(sizes[offset] for _, offset in seen) * 4 == expert.numel() * 4  # one expert's bytes, not 8


def test_hf_to_torch_dist_reads_and_writes_one_expert_at_a_time(tmp_path, monkeypatch):
    """The writer asks the source for one canonical tensor at a time, an expert alone; each
    stored chunk lies within one expert."""
    hf_dir = moe_hf(tmp_path, num_local_experts=8)
    with open_checkpoint(hf_dir) as reader:
        requested = []
        read = reader.tensor
        monkeypatch.setattr(reader, "tensor", lambda name: requested.append(name) or read(name))
        torch_dist.write(reader, tmp_path / "dist", TargetLayout(tp=2, ep=4))
        assert sorted(requested) == sorted(canonical.name for canonical in reader.canonical())
    entry = tensor_layout(tmp_path / "dist" / "release")["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert entry[0] == (4, 8, 48, 32)
    assert all(sizes[:2] == (1, 1) for _, sizes in entry[2]) and len(entry[2]) == 4 * 8 * 4  # layer, expert, box


# ---------------------------------------------------------------------------- round trips

CASES = [  # (format, TP, PP, VPP, EP)
    ("torch", 1, 1, 1, 2),
    ("torch", 2, 2, 1, 2),
    ("torch", 2, 2, 1, 4),
    ("torch", 1, 2, 2, 4),
    ("torch_dist", 2, 2, 1, 4),
    ("torch_dist", 1, 4, 1, 2),
]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("fmt,tp,pp,vpp,ep", CASES)
def test_hf_to_megatron_and_back_is_bit_identical_at_any_tp_pp_vpp_ep(family, fmt, tp, pp, vpp, ep, tmp_path):
    hf_dir = moe_hf(tmp_path, family)
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=tp, pp=pp, vpp=vpp, ep=ep, format=fmt,
                   make_vocab_size_divisible_by=8)
    megatron_to_hf(tmp_path / "megatron", tmp_path / "back")
    assert_same_state(hf_state(hf_dir), hf_state(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == \
        json.loads((hf_dir / "config.json").read_text())["architectures"]


def test_per_rank_files_hold_the_stage_and_their_experts_under_local_indices(tmp_path):
    hf_dir = moe_hf(tmp_path, "qwen2_moe")
    result = hf_to_megatron(hf_dir, tmp_path / "megatron", tp=2, pp=2, ep=2)
    folders = sorted(path.split("/")[1] for path in result.files if path.endswith(".pt"))
    assert folders == [f"mp_rank_{tp:02d}_{pp:03d}_{ep:03d}" for tp in range(2) for pp in range(2) for ep in range(2)]
    release = tmp_path / "megatron" / "release"
    ep0, ep1 = (rank_model(release / f"mp_rank_01_001_{ep:03d}" / "model_optim_rng.pt") for ep in range(2))
    assert set(ep0) == set(ep1)  # the same names: local expert indices on every EP rank
    layer = "decoder.layers.1."  # global layer 3 (stage 1 of PP2 holds layers 2-3)
    assert {f"{layer}mlp.router.weight", f"{layer}mlp.shared_experts.gate_weight",
            f"{layer}mlp.shared_experts.linear_fc1.weight", f"{layer}mlp.shared_experts.linear_fc2.weight",
            f"{layer}mlp.shared_experts.linear_fc1._extra_state", f"{layer}pre_mlp_layernorm.weight"} <= set(ep0)
    experts = sorted(key for key in ep0 if ".local_experts." in key and key.startswith(layer))
    assert experts == [f"{layer}mlp.experts.local_experts.{e}.{linear}.{kind}" for e in range(2)
                       for linear in ("linear_fc1", "linear_fc2") for kind in ("_extra_state", "weight")]
    # EP rank 1's local expert 0 is global expert 2; TP rank 1 holds the second half of each.
    with open_checkpoint(hf_dir) as hf:
        full = hf.tensor(EXPERT_FC1.format(layer=3, expert=2))
    gate, up = full.chunk(2)
    assert torch.equal(ep1[f"{layer}mlp.experts.local_experts.0.linear_fc1.weight"],
                       torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    # Non-expert tensors are copies on every EP rank.
    assert torch.equal(ep0[f"{layer}mlp.router.weight"], ep1[f"{layer}mlp.router.weight"])


def test_megatron_args_record_expert_parallel_sizes(tmp_path):
    hf_dir = moe_hf(tmp_path)
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=2, pp=1, ep=4)
    with open_checkpoint(tmp_path / "megatron") as reader:
        args = reader.meta.args
        assert (args.expert_model_parallel_size, args.expert_tensor_parallel_size) == (4, 2)
        # Megatron takes the EP ranks out of the data-parallel ones: TP x DP = ETP x EP x expert DP.
        assert (args.data_parallel_size, args.world_size) == (4, 8)
        assert (reader.meta.ep, reader.meta.etp, args.num_experts, args.moe_layer_freq) == (4, 2, 4, 1)


@pytest.mark.parametrize("target", [dict(tp=1, pp=1, ep=1, format="torch"), dict(tp=1, pp=1, ep=4, format="torch"),
                                    dict(tp=2, pp=1, ep=1, format="torch_dist")])
@pytest.mark.parametrize("name", sorted(REAL_ALL))
def test_real_moe_reshards_to_other_ep_and_format_keeping_every_tensor(name, target, tmp_path):
    source = fixture_path(name, REAL_ALL[name])
    if "qwen" in name:
        target = {**target, "tp": 1}  # 3 query groups
    # the optimizer state of moe_optim_ep2 needs DP ranks for 4 EP ranks (the source runs at DP 2)
    result = reshard(source, tmp_path / "out", dp=4, **target)
    assert result.target_layout["ep"] == target["ep"]
    assert verify(source, tmp_path / "out").equivalent
    back = reshard(tmp_path / "out", tmp_path / "again", tp=1, pp=1, ep=2,
                   format="torch" if target["format"] == "torch_dist" else "torch_dist")
    assert back.target_layout["ep"] == 2
    assert verify(source, tmp_path / "again").equivalent


def test_reshard_keeps_the_sources_ep_by_default(tmp_path):
    result = reshard(real_dist("moe_mixtral_tp1ep2"), tmp_path / "out", tp=1, pp=2, format="torch")
    assert result.target_layout["ep"] == 2
    assert sorted(path.split("/")[1] for path in result.files if path.endswith(".pt")) == \
        ["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000", "mp_rank_00_001_001"]


def test_transformer_engine_naming_spells_a_moe_layers_norm_as_its_own_module(tmp_path):
    hf_dir = moe_hf(tmp_path, "qwen2_moe")
    for fmt in ("torch", "torch_dist"):
        hf_to_megatron(hf_dir, tmp_path / fmt, tp=1, pp=1, ep=2, format=fmt, naming="mcore-te")
        megatron_to_hf(tmp_path / fmt, tmp_path / f"{fmt}_back")
        assert_same_state(hf_state(hf_dir), hf_state(tmp_path / f"{fmt}_back"))
    model = rank_model(tmp_path / "torch" / "release" / "mp_rank_00_001" / "model_optim_rng.pt")
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in model  # dense layer 0: fused
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in model  # MoE layer: its own module
    keys = tensor_layout(tmp_path / "torch_dist" / "release")
    assert {"decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.1.pre_mlp_layernorm.weight"} <= set(keys)


def test_grouped_gemm_expert_names_are_read(tmp_path):
    hf_dir = moe_hf(tmp_path)
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1, ep=2)
    for path in (tmp_path / "megatron" / "release").glob("*/model_optim_rng.pt"):
        state = safe_torch_load(path, mmap=False)
        renamed = {}
        for key, value in state["model"].items():
            if ".local_experts." in key:
                prefix, rest = key.split("mlp.experts.local_experts.")
                expert, linear, kind = rest.split(".")
                key = f"{prefix}mlp.experts.{linear}.{kind}{expert}" if kind == "weight" else \
                    f"{prefix}mlp.experts.{linear}._extra_state"
            renamed[key] = value
        state["model"] = renamed
        torch.save(state, path)
    megatron_to_hf(tmp_path / "megatron", tmp_path / "back")
    assert_same_state(hf_state(hf_dir), hf_state(tmp_path / "back"))


def test_expert_tensor_parallel_size_other_than_tp_is_written_as_torch_dist(tmp_path):
    hf_dir = moe_hf(tmp_path)
    hf_to_megatron(hf_dir, tmp_path / "dist", tp=2, pp=1, ep=2, etp=1, format="torch_dist")
    keys = tensor_layout(tmp_path / "dist" / "release")
    assert keys["decoder.layers.mlp.experts.experts.linear_fc2.weight"][2][0] == ((0, 0, 0, 0), (1, 1, 32, 24))
    assert keys["decoder.layers.self_attention.linear_proj.weight"][2][0] == ((0, 0, 0), (1, 32, 16))
    with open_checkpoint(tmp_path / "dist") as reader:
        assert (reader.meta.tp, reader.meta.etp, reader.meta.args.expert_tensor_parallel_size) == (2, 1, 1)
    megatron_to_hf(tmp_path / "dist", tmp_path / "back")
    assert_same_state(hf_state(hf_dir), hf_state(tmp_path / "back"))
    with pytest.raises(Unsupported, match=r"ETP=1 other than TP=2: .* write torch_dist"):
        reshard(tmp_path / "dist", tmp_path / "torch", tp=2, pp=1, format="torch")  # keeps the source's ETP
    reshard(tmp_path / "dist", tmp_path / "torch", tp=2, pp=1, etp=2, format="torch")
    assert verify(tmp_path / "dist", tmp_path / "torch").equivalent


# ---------------------------------------------------------------------------- refusals and checks

@pytest.mark.parametrize("sizes, message", [
    (dict(ep=3), "EP=3 does not divide 4 experts"),
    (dict(tp=2, etp=5, format="torch_dist"), "ETP=5 does not divide expert ffn size 24"),
    (dict(tp=2, etp=1), "ETP=1 other than TP=2"),
])
def test_expert_parallel_sizes_that_do_not_fit_are_refused_in_one_line(sizes, message, tmp_path):
    hf_dir = moe_hf(tmp_path)
    with pytest.raises((BadInput, Unsupported), match=message) as error:
        hf_to_megatron(hf_dir, tmp_path / "out", **{"tp": 1, "pp": 1, **sizes})
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_expert_parallelism_of_a_dense_model_is_refused(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama")
    with pytest.raises(BadInput, match="EP=2: expert parallelism needs a mixture-of-experts model"):
        hf_to_megatron(hf_dir, tmp_path / "out", tp=1, pp=1, ep=2)


def test_missing_expert_parallel_rank_folder_is_named(tmp_path):
    hf_dir = moe_hf(tmp_path)
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=2, ep=2)
    shutil.rmtree(tmp_path / "megatron" / "release" / "mp_rank_00_001_001")
    with pytest.raises(BadInput, match=r"mp_rank_00_001_001: rank folder missing \(args say TP=1, PP=2, EP=2\)"):
        open_checkpoint(tmp_path / "megatron")


def test_a_local_expert_index_beyond_the_ranks_share_is_refused_naming_file_and_key(tmp_path):
    hf_dir = moe_hf(tmp_path)
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1, ep=2)
    path = tmp_path / "megatron" / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = safe_torch_load(path, mmap=False)
    state["model"] = {key.replace("local_experts.1.", "local_experts.2."): value for key, value in state["model"].items()}
    torch.save(state, path)
    with pytest.raises(BadInput, match=r"mp_rank_00_001/model_optim_rng.pt: decoder.layers.0.mlp.experts.local_experts"
                                       r".2.linear_fc1.weight names local expert 2; EP=2 ranks of 4 experts hold 2"):
        open_checkpoint(tmp_path / "megatron")


def test_copies_of_non_expert_tensors_on_other_ep_ranks_are_compared(tmp_path):
    hf_dir = moe_hf(tmp_path)
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1, ep=2)
    path = tmp_path / "megatron" / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    state = safe_torch_load(path, mmap=False)
    state["model"]["decoder.layers.1.mlp.router.weight"] += 0.5
    torch.save(state, path)
    with open_checkpoint(tmp_path / "megatron") as reader:
        [note] = reader.validate()
    assert "mp_rank_00_001/model_optim_rng.pt: replicated tensor decoder.layers.1.mlp.router.weight differs " \
           "across EP ranks (max abs diff 0.5 against EP rank 0's copy)" in note
    with open_checkpoint(tmp_path / "megatron", strict=True) as reader, \
            pytest.raises(BadInput, match="differs across EP ranks"):
        reader.validate()


def test_dry_run_plans_a_file_per_tp_pp_and_ep_rank(tmp_path):
    hf_dir = moe_hf(tmp_path)
    result = CliRunner().invoke(main, ["hf-to-megatron", str(hf_dir), str(tmp_path / "out"), "--tp", "2",
                                       "--pp", "1", "--ep", "2", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert (plan["target"]["ep"], plan["target"]["etp"]) == (2, 2)
    assert [entry["path"] for entry in plan["files"]] == [
        f"release/mp_rank_{tp:02d}_{ep:03d}/model_optim_rng.pt" for ep in range(2) for tp in range(2)]
    expert = EXPERT_FC1.format(layer=0, expert=3)
    assert [expert in entry["tensors"] for entry in plan["files"]] == [False, False, True, True]
    assert not (tmp_path / "out").exists()


def test_inspect_shows_ep_etp_and_the_experts_of_each_ep_rank(tmp_path):
    info = inspect_checkpoint(real_dist("moe_qwen2_tp1ep2"))
    assert (info.layout["ep"], info.layout["etp"]) == (2, 1)
    assert info.experts_per_ep_rank == [[0, 1], [2, 3]]
    placed = {tensor.name: tensor.ep_rank for tensor in info.tensors}
    assert placed[EXPERT_FC1.format(layer=2, expert=3)] == 1 and placed["decoder.layers.2.mlp.router.weight"] is None
    result = CliRunner().invoke(main, ["inspect", str(real_dist("moe_qwen2_tp1ep2")), "--no-tensors"])
    assert result.exit_code == 0, result.output
    assert "EP=2 ETP=1" in result.output and "experts 2-3" in result.output


def test_converted_moe_logits_match_transformers_after_an_ep_round_trip(tmp_path):
    hf_dir = moe_hf(tmp_path, "qwen3_moe")
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=2, pp=2, ep=4, format="torch_dist")
    reshard(tmp_path / "megatron", tmp_path / "torch", tp=1, pp=4, ep=2, format="torch")
    megatron_to_hf(tmp_path / "torch", tmp_path / "back")
    tokens = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(hf_dir, tokens), hf_logits(tmp_path / "back", tokens))
