"""Megatron per-rank specifics: virtual pipeline chunks, old QKV orderings, .zip sources, PP=1 names."""
import zipfile

import torch

from ckptkit.convert import hf_to_megatron, megatron_to_hf
from ckptkit.layouts import open_checkpoint
from ckptkit.layouts.megatron_legacy import qkv_to_current
from ckptkit.safe_load import safe_torch_load
from ckptkit.torch_stream import StreamingTorchWriter
from ckptkit.verification import verify

from conftest import assert_same_state, fixture_path, hf_state, make_hf_model


def test_virtual_pipeline_output_places_layers_as_megatron_interleaves_them(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "gpt2", n_layer=8)
    hf_to_megatron(hf_dir, tmp_path / "vpp", tp=2, pp=2, vpp=2)
    state = safe_torch_load(tmp_path / "vpp" / "release" / "mp_rank_01_001" / "model_optim_rng.pt")
    assert "model0" in state and "model1" in state and "model" not in state
    assert "decoder.final_layernorm.weight" in state["model1"]  # last virtual stage = global 6-7
    assert "output_layer.weight" in state["model1"]  # tied head copy
    megatron_to_hf(tmp_path / "vpp", tmp_path / "back")
    assert_same_state(hf_state(hf_dir), hf_state(tmp_path / "back"))


def test_real_vpp_checkpoint_reshards_to_plain_pipeline_bit_identically(tmp_path):
    from ckptkit.convert import reshard

    source = fixture_path("vpp_tp2pp2v2", "conv", "torch")
    reshard(source, tmp_path / "pp4", tp=1, pp=4, vpp=1)
    assert verify(source, tmp_path / "pp4").equivalent


def _rewrite_qkv_order(tmp_path, version):
    """A copy of the real GPT-2 checkpoint with its QKV shards stored in an old ordering."""
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")
    target = tmp_path / f"v{version}"
    for rank_file in sorted(source.glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        state = safe_torch_load(rank_file)
        heads, head_dim = 3, 16  # per TP rank: 6 heads / TP2
        for key, value in list(state["model"].items()):
            if "linear_qkv" in key and isinstance(value, torch.Tensor):
                tail = value.shape[1:]
                per_head = value.reshape(heads, 3, head_dim, *tail)
                old = per_head.transpose(0, 1) if version == 0 else per_head.transpose(1, 2)
                state["model"][key] = old.reshape(value.shape).contiguous()
        state["checkpoint_version"] = float(version)
        out = target / rank_file.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with StreamingTorchWriter(out) as writer:
            writer.finish({key: state[key] for key in ("args", "checkpoint_version", "iteration", "model")})
    (target / "latest_checkpointed_iteration.txt").write_text("10")
    return source, target


def test_checkpoint_version_0_and_1_qkv_orderings_read_as_the_current_one(tmp_path):
    for version in (0, 1):
        source, old = _rewrite_qkv_order(tmp_path, version)
        with open_checkpoint(old) as reader:
            assert reader.meta.checkpoint_version == float(version)
        assert verify(source, old).equivalent, version


def test_qkv_reordering_inverts_the_old_layouts():
    heads, head_dim = 2, 3
    current = torch.arange(heads * 3 * head_dim).float()
    version0 = current.reshape(heads, 3, head_dim).transpose(0, 1).reshape(-1)
    version1 = current.reshape(heads, 3, head_dim).transpose(1, 2).reshape(-1)
    assert torch.equal(qkv_to_current(version0, 0, heads, head_dim), current)
    assert torch.equal(qkv_to_current(version1, 1.0, heads, head_dim), current)


def test_zip_of_a_megatron_checkpoint_is_a_valid_source(tmp_path):
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as opened:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                opened.write(path, f"checkpoint/{path.relative_to(source)}")
    megatron_to_hf(archive, tmp_path / "hf")
    assert verify(source, tmp_path / "hf").equivalent


def test_pipeline_size_one_uses_two_digit_rank_folders(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "gpt2")
    hf_to_megatron(hf_dir, tmp_path / "tp2", tp=2, pp=1)
    folders = sorted(path.name for path in (tmp_path / "tp2" / "release").iterdir())
    assert folders == ["mp_rank_00", "mp_rank_01"]
    assert (tmp_path / "tp2" / "latest_checkpointed_iteration.txt").read_text() == "release"
    args = safe_torch_load(tmp_path / "tp2" / "release" / "mp_rank_00" / "model_optim_rng.pt")["args"]
    assert (args.tensor_model_parallel_size, args.padded_vocab_size, args.vocab_size) == (2, 256, 101)


def test_rope_model_args_keep_megatrons_default_add_position_embedding(tmp_path):
    """Megatron's parser says add_position_embedding=True unless --no-position-embedding, RoPE
    or not, and a resuming run stops when the checkpoint's args disagree with its own."""
    hf_dir = make_hf_model(tmp_path / "hf", "llama")
    hf_to_megatron(hf_dir, tmp_path / "megatron", tp=1, pp=1)
    with open_checkpoint(tmp_path / "megatron") as reader:
        assert reader.meta.args.add_position_embedding is True
        assert reader.spec.position_embedding == "rope"
