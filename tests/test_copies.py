"""Copies that should be identical (replicated tensors, the tied output head): compared a
chunk of rows at a time, summarised in one note, refused in strict mode."""
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner

from ckptkit.cli import main
from ckptkit.convert import megatron_to_hf
from ckptkit.layouts import copies, open_checkpoint
from ckptkit.safe_load import safe_torch_load
from safetensors.torch import load_file

from conftest import fixture_path

REPLICATED = "decoder.layers.1.input_layernorm.weight"  # stage 0 of 6 layers at PP=2
OTHER_REPLICATED = "decoder.layers.2.pre_mlp_layernorm.weight"


def rank_file(checkpoint, tp_rank: int, pp_stage: int):
    return checkpoint / "iter_0000010" / f"mp_rank_{tp_rank:02d}_{pp_stage:03d}" / "model_optim_rng.pt"


def add_to_tensor(path, key: str, amount: float) -> None:
    state = safe_torch_load(path, mmap=False)
    state["model"][key] = state["model"][key] + amount
    torch.save(state, path)


@pytest.fixture
def diverged(tmp_path):
    """The real GPT-2 TP2 PP2 checkpoint with two replicated tensors and the tied head edited."""
    checkpoint = tmp_path / "megatron"
    shutil.copytree(fixture_path("gpt2_tp2pp2", "conv", "torch"), checkpoint)
    add_to_tensor(rank_file(checkpoint, 1, 0), REPLICATED, 0.25)
    add_to_tensor(rank_file(checkpoint, 1, 0), OTHER_REPLICATED, 0.125)
    add_to_tensor(rank_file(checkpoint, 0, 1), "output_layer.weight", 1.0)
    return checkpoint


def test_chunked_comparison_finds_a_difference_in_the_last_chunk():
    reference = torch.zeros(10, 4, dtype=torch.float16)
    copy = reference.clone()
    copy[9, 3] = 0.5
    read = []

    def reader(tensor):
        def rows_of(rows):
            read.append(len(rows))
            return tensor[rows.start: rows.stop]
        return rows_of

    differences = copies.largest_differences(reader(reference), [reader(reference), reader(copy)], (10, 4), 2,
                                             chunk_bytes=24)
    assert differences == [0.0, 0.5]
    assert max(read) == 3  # 24 bytes: 3 rows of 8 bytes, never the whole tensor


def test_diverged_replicas_and_tied_head_give_one_summary_naming_the_largest(diverged):
    with open_checkpoint(diverged) as reader, warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning per tensor
        notes = reader.validate()
        replicated = sum(canonical.rule == "replicated" for canonical in reader.canonical())
    assert len(notes) == 1, notes
    note = notes[0]
    assert f"differ for 3 of {replicated + 1} tensors" in note
    assert "mp_rank_00_001/model_optim_rng.pt: output_layer.weight (tied output head)" in note
    assert "max abs diff 1" in note


def test_a_diverged_replica_converts_with_tp_rank_0s_copy_and_one_note(diverged, tmp_path):
    result = megatron_to_hf(diverged, tmp_path / "hf")
    about_copies = [note for note in result.notes if "should be identical" in note]
    assert len(about_copies) == 1, result.notes
    rank0 = safe_torch_load(rank_file(diverged, 0, 0))["model"][REPLICATED]
    written = load_file(tmp_path / "hf" / "model.safetensors")["transformer.h.1.ln_1.weight"]
    assert torch.equal(written, rank0.to(written.dtype))


def test_strict_refuses_a_diverged_replica_in_one_line_naming_file_and_tensor(diverged, tmp_path):
    result = CliRunner().invoke(main, ["megatron-to-hf", str(diverged), str(tmp_path / "hf"), "--strict"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert "mp_rank_01_000/model_optim_rng.pt" in lines[0] and REPLICATED in lines[0]
    assert "max abs diff 0.25" in lines[0]
    assert not (tmp_path / "hf").exists()


def test_validation_reads_copies_a_chunk_at_a_time(diverged, monkeypatch):
    monkeypatch.setattr(copies, "CHUNK_BYTES", 4096)
    with open_checkpoint(diverged) as reader:
        largest = []
        read = reader.files.read

        def recording_read(tp_rank, pp_stage, stored):
            value = read(tp_rank, pp_stage, stored)
            largest.append(value.numel() * value.element_size())
            return value

        monkeypatch.setattr(reader.files, "read", recording_read)
        reader.validate()
        embedding_bytes = reader.files.chunks(0, 0)[0]["embedding.word_embeddings.weight"].numel() * 4
    assert largest and max(largest) <= 4096 < embedding_bytes


def test_a_conversion_checks_key_sets_and_shapes_first_and_compares_copies_apart(diverged, monkeypatch):
    """The comparison reads tensor data, so a conversion runs it while it writes
    (compare_copies); what validate(compare_copies=False) does before the first write reads none."""
    with open_checkpoint(diverged) as reader:
        reads = []
        read = reader.files.read

        def recording_read(tp_rank, pp_stage, stored):
            reads.append(stored)
            return read(tp_rank, pp_stage, stored)

        monkeypatch.setattr(reader.files, "read", recording_read)
        assert reader.compares_copies_apart
        assert reader.validate(compare_copies=False) == [] and reads == []
        notes = reader.compare_copies()
    assert len(notes) == 1 and "should be identical" in notes[0] and reads
