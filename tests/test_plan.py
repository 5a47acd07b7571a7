"""A conversion is planned from metadata before anything is read or written: --dry-run shows
that plan, and what a real run writes is exactly what it planned."""
import json

import pytest
from click.testing import CliRunner

from ckptkit.cli import main
from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.layouts.megatron_legacy import MegatronLegacyReader

from conftest import fixture_path, make_hf_model

GPT2_PER_RANK = ("gpt2_tp2pp2", "conv", "torch")


def written_files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_dry_run_reads_no_tensor_data_and_writes_nothing(tmp_path, monkeypatch):
    def no_tensor_reads(self, name):
        raise AssertionError(f"{name} was read by a dry run")

    monkeypatch.setattr(MegatronLegacyReader, "tensor", no_tensor_reads)
    result = reshard(fixture_path(*GPT2_PER_RANK), tmp_path / "out", tp=1, pp=3, dry_run=True)
    assert not (tmp_path / "out").exists() and result.files == []
    assert [entry["path"] for entry in result.plan["files"]] == [
        f"iter_0000010/mp_rank_00_00{stage}/model_optim_rng.pt" for stage in range(3)]
    assert result.plan["finish_files"] == ["latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2)])
def test_per_rank_output_is_exactly_the_planned_files(tp, pp, tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama", num_hidden_layers=2)
    planned = hf_to_megatron(hf_dir, tmp_path / "plan", tp=tp, pp=pp, dry_run=True).plan
    result = hf_to_megatron(hf_dir, tmp_path / "out", tp=tp, pp=pp)
    expected = sorted([entry["path"] for entry in planned["files"]] + planned["finish_files"])
    assert written_files(tmp_path / "out") == expected == sorted(result.files)


def test_hugging_face_output_is_exactly_the_planned_shards_and_files(tmp_path):
    source = fixture_path(*GPT2_PER_RANK)
    planned = megatron_to_hf(source, tmp_path / "plan", max_shard_size="300KB", dry_run=True).plan
    megatron_to_hf(source, tmp_path / "out", max_shard_size="300KB")
    shards = [entry["path"] for entry in planned["files"]]
    assert len(shards) > 1 and written_files(tmp_path / "out") == sorted(shards + planned["finish_files"])
    for entry in planned["files"]:  # a shard is its tensors plus a small JSON header
        assert 0 <= (tmp_path / "out" / entry["path"]).stat().st_size - entry["bytes"] < 16_384


def test_torch_dist_plan_is_one_folder_of_data_files_for_one_process(tmp_path):
    result = reshard(fixture_path(*GPT2_PER_RANK), tmp_path / "out", tp=2, pp=1, format="torch_dist", dry_run=True)
    assert result.plan["splittable"] is False
    assert [entry["path"] for entry in result.plan["files"]] == ["iter_0000010/*.distcp"]


def test_cli_dry_run_prints_the_plan_as_json(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["reshard", str(fixture_path(*GPT2_PER_RANK)), str(tmp_path / "out"),
                                  "--tp", "1", "--pp", "1", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]
    assert plan["target"]["tp"] == 1 and len(plan["files"]) == 1
    assert "decoder.layers.5.mlp.linear_fc2.weight" in plan["files"][0]["tensors"]
    assert not (tmp_path / "out").exists()
    table = runner.invoke(main, ["reshard", str(fixture_path(*GPT2_PER_RANK)), str(tmp_path / "out"),
                                 "--tp", "1", "--pp", "1", "--dry-run"])
    assert "dry run: nothing written" in table.output and "model_optim_rng.pt" in table.output
