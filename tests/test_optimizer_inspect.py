"""inspect says what optimizer state a checkpoint holds: its kind, where it lives and how it
is sharded, the step, the DP size it is laid out for and the dtypes, from metadata."""
import doctest
import importlib
import json
import shutil

from click.testing import CliRunner

from ckptkit.cli import main
from ckptkit.convert import hf_to_megatron, reshard
from ckptkit.inspection import inspect_checkpoint

from conftest import fixture_path, make_hf_model

DISTRIBUTED = ("gpt2do_tp2dp2", "legacy")


def test_the_real_distributed_optimizer_state_is_described_in_the_table_and_the_json():
    summary = inspect_checkpoint(fixture_path(*DISTRIBUTED)).optimizer
    assert (summary.kind, summary.step, summary.dp) == ("distributed", 10.0, 2)
    assert summary.sharding == "distrib_optim.pt per TP/PP rank (every DP shard)"
    assert summary.dtypes == {"weights": "float32", "master params": "float32", "moments": "float32",
                              "grad buffers": "float32"}
    result = CliRunner().invoke(main, ["inspect", str(fixture_path(*DISTRIBUTED)), "--json", "--no-tensors"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["optimizer"]["kind"] == "distributed"
    table = CliRunner().invoke(main, ["inspect", str(fixture_path(*DISTRIBUTED)), "--no-tensors"]).output
    assert "│ optimizer          │ distributed; step 10; DP=2; distrib_optim.pt" in table


def test_a_plain_adam_state_of_bf16_weights_keeps_its_fp32_masters_beside_the_weights(tmp_path):
    reshard(fixture_path(*DISTRIBUTED), tmp_path / "plain", tp=1, pp=1, dtype="bf16", dp=4,
            distributed_optimizer=False)
    summary = inspect_checkpoint(tmp_path / "plain").optimizer
    assert (summary.kind, summary.step, summary.dp) == ("non-distributed", 10.0, 4)
    assert summary.sharding == "model_optim_rng.pt per TP/PP rank (masters in fp32_from_fp16_params)"
    assert summary.dtypes == {"weights": "bfloat16", "master params": "float32", "moments": "float32"}


def test_an_optimizer_saved_before_its_first_step_is_fresh_and_empty():
    summary = inspect_checkpoint(fixture_path("llama_tp2pp2", "conv", "torch")).optimizer
    assert (summary.kind, summary.step, summary.dp) == ("fresh-empty", None, 1)
    assert "no master copies or moments" in summary.note


def test_a_fresh_state_written_by_hf_to_megatron_is_at_step_0(tmp_path):
    hf = make_hf_model(tmp_path / "hf", "llama")
    hf_to_megatron(hf, tmp_path / "out", tp=2, pp=1, dtype="bf16", optimizer="fresh", dp=8,
                   distributed_optimizer=True, megatron_args="--lr 1e-4")
    summary = inspect_checkpoint(tmp_path / "out").optimizer
    assert (summary.kind, summary.step, summary.dp, summary.dtypes["grad buffers"]) == ("distributed", 0, 8, "float32")


def test_checkpoints_without_optimizer_state_say_why(tmp_path):
    reshard(fixture_path(*DISTRIBUTED), tmp_path / "weights", tp=1, pp=1, optimizer=False)
    assert inspect_checkpoint(tmp_path / "weights").optimizer.note == "no optimizer entry (saved with --no-save-optim)"
    torch_dist = inspect_checkpoint(fixture_path("llama_tp2pp2", "dist")).optimizer
    assert (torch_dist.kind, torch_dist.note) == ("none", "no optimizer entries (saved with --no-save-optim)")
    hf = inspect_checkpoint(make_hf_model(tmp_path / "hf", "gpt2")).optimizer
    assert (hf.kind, hf.note) == ("none", "a hf-safetensors checkpoint holds no optimizer state")


def test_docstring_example_runs(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(fixture_path(*DISTRIBUTED), tmp_path / "checkpoints" / "gpt2do")
    monkeypatch.chdir(tmp_path)
    results = doctest.testmod(importlib.import_module("ckptkit.optimizer.summary"))
    assert results.attempted > 0 and results.failed == 0
