"""Master copies rounded to the weights' dtype equal the stored weights: the check that
catches optimizer state attached to the wrong parameter, run by ``verify DIR``; and
``verify A B --optimizer`` compares two states per canonical tensor across layouts."""
import doctest
import importlib
import json
import shutil
import warnings

import torch
from click.testing import CliRunner

from ckptkit.cli import main
from ckptkit.convert import reshard
from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer import OptimizerTarget, parameters, read_optimizer_state, write_optimizer_state
from ckptkit.optimizer.buffers import BufferSettings
from ckptkit.optimizer.distrib_optim import rank_layout
from ckptkit.optimizer.verify import masters_match_weights
from ckptkit.safe_load import safe_torch_load
from ckptkit.verification import verify

from conftest import fixture_path

DISTRIBUTED = ("gpt2do_tp2dp2", "legacy")


def test_every_master_of_the_real_checkpoint_is_its_weight():
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as weights, read_optimizer_state(weights) as state:
        assert masters_match_weights(state, weights) == []


def test_fp32_masters_of_a_bf16_reshard_round_to_its_weights(tmp_path):
    reshard(fixture_path(*DISTRIBUTED), tmp_path / "bf16", tp=1, pp=2, dtype="bf16")
    with warnings.catch_warnings(), read_optimizer_state(fixture_path(*DISTRIBUTED)) as state:
        warnings.simplefilter("ignore")
        write_optimizer_state(state, tmp_path / "bf16", OptimizerTarget(tp=1, pp=2, dp=2, iteration=10,
                                                                       param_dtype=torch.bfloat16))
    with open_checkpoint(tmp_path / "bf16") as weights, read_optimizer_state(weights) as state:
        assert weights.meta.dtype == torch.bfloat16
        assert masters_match_weights(state, weights) == []
        # the masters are fp32: most do not equal their bf16 weight without rounding
        master = state.tensor("decoder.layers.0.mlp.linear_fc1.weight", ("param",))["param"]
        assert (master != weights.tensor("decoder.layers.0.mlp.linear_fc1.weight").float()).float().mean() > 0.9


def test_state_read_in_the_canonical_order_instead_of_megatron_s_is_caught(monkeypatch):
    qkv_first = list(parameters._LAYER_ORDER)
    qkv_first[2:6] = qkv_first[4:6] + qkv_first[2:4]  # linear_qkv before linear_proj, as spec.py lists them
    monkeypatch.setattr(parameters, "_LAYER_ORDER", tuple(qkv_first))
    with open_checkpoint(fixture_path(*DISTRIBUTED)) as weights, read_optimizer_state(weights) as state:
        mismatches = masters_match_weights(state, weights)
    assert any(line.startswith("decoder.layers.0.self_attention.linear_proj.weight:") for line in mismatches)
    assert any("linear_qkv.weight: " in line for line in mismatches)


def test_docstring_example_runs(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(fixture_path(*DISTRIBUTED), tmp_path / "checkpoints" / "gpt2do")
    monkeypatch.chdir(tmp_path)
    results = doctest.testmod(importlib.import_module("ckptkit.optimizer.verify"))
    assert results.attempted > 0 and results.failed == 0


# -- verify DIR and verify A B --optimizer

def ckptkit_cli(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def corrupt_master_copy(root, parameter_name, tp_rank=0):
    """Add 1 to the fp32 master copy of one parameter in a distrib_optim.pt of ``root``
    (a copy of the TP2 DP2 fixture), found through Megatron's layout."""
    path = root / "iter_0000010" / f"mp_rank_{tp_rank:02d}" / "distrib_optim.pt"
    with open_checkpoint(root) as weights:
        layout = rank_layout(weights.spec, tp=2, tp_rank=tp_rank, pp=1, pp_stage=0, vpp=1,
                             padded_vocab_size=weights.meta.padded_vocab_size,
                             settings=BufferSettings.from_args(weights.meta.args))
    slot = next(slot for slot in layout.buffers[0].slots if slot.parameter.name == parameter_name)
    state = safe_torch_load(path, mmap=False)  # the file is rewritten below
    start = layout.buffers[0].stored_offset(slot)
    state[0][(torch.float32, torch.float32)]["param"][start: start + slot.parameter.numel] += 1.0
    torch.save(state, path)


def test_verify_one_checkpoint_names_a_master_copy_that_is_not_its_weight(tmp_path):
    assert verify(fixture_path(*DISTRIBUTED)).equivalent
    shutil.copytree(fixture_path(*DISTRIBUTED), tmp_path / "copy")
    corrupt_master_copy(tmp_path / "copy", "decoder.layers.1.mlp.linear_fc2.weight")
    result = verify(tmp_path / "copy")
    assert not result.equivalent
    assert result.problems == [f"{tmp_path / 'copy'}: optimizer master copy of decoder.layers.1.mlp.linear_fc2.weight: "
                               "8192 of 16384 master values do not round to the stored float32 weight"]
    cli = ckptkit_cli("verify", tmp_path / "copy")
    assert cli.exit_code == 2 and "linear_fc2.weight" in cli.output and "NOT intact" in cli.output


def test_verify_one_checkpoint_reports_a_missing_optimizer_file(tmp_path):
    shutil.copytree(fixture_path(*DISTRIBUTED), tmp_path / "copy")
    (tmp_path / "copy" / "iter_0000010" / "mp_rank_01" / "distrib_optim.pt").unlink()
    result = verify(tmp_path / "copy")
    assert not result.equivalent and any("mp_rank_01/distrib_optim.pt: missing" in line for line in result.problems)


def test_the_optimizer_state_compares_equal_across_layouts_and_kinds(tmp_path):
    source = fixture_path(*DISTRIBUTED)
    reshard(source, tmp_path / "tp1pp2dp4", tp=1, pp=2, dp=4)
    reshard(source, tmp_path / "plain", tp=1, pp=1, distributed_optimizer=False)
    for other in ("tp1pp2dp4", "plain"):
        result = verify(source, tmp_path / other, optimizer=True)
        assert result.equivalent, (result.problems, [row for row in result.optimizer if not row.ok])
        with open_checkpoint(source) as reader:
            assert len(result.optimizer) == 3 * len(reader.canonical())
        assert {row.name.rsplit(" ", 1)[1] for row in result.optimizer} == {"[param]", "[exp_avg]", "[exp_avg_sq]"}
    cli = ckptkit_cli("verify", "--optimizer", source, tmp_path / "tp1pp2dp4")
    assert cli.exit_code == 0
    assert "28 tensors, max |a-b| = 0; 84 optimizer state tensors, max |a-b| = 0" in " ".join(cli.output.split())


class Perturbed:
    """The state of ``inner`` with ``exp_avg`` of one canonical tensor moved by ``delta``."""

    def __init__(self, inner, name, delta):
        self.inner, self.name, self.delta = inner, name, delta
        self.spec, self.info, self.padded_vocab_size = inner.spec, inner.info, inner.padded_vocab_size

    def canonical(self):
        return self.inner.canonical()

    def tensor(self, name, keys=("param", "exp_avg", "exp_avg_sq")):
        values = self.inner.tensor(name, keys)
        if name == self.name and "exp_avg" in values:
            values["exp_avg"] = values["exp_avg"] + self.delta
        return values


def test_moments_that_differ_are_named_and_atol_decides(tmp_path):
    source = fixture_path(*DISTRIBUTED)
    reshard(source, tmp_path / "moved", tp=1, pp=1, optimizer=False)
    with warnings.catch_warnings(), read_optimizer_state(source) as state:
        warnings.simplefilter("ignore")
        write_optimizer_state(Perturbed(state, "decoder.layers.0.mlp.linear_fc1.weight", 1e-6), tmp_path / "moved",
                              OptimizerTarget(tp=1, dp=2, iteration=10))
    exact = verify(source, tmp_path / "moved", optimizer=True)
    assert not exact.equivalent
    assert [row.name for row in exact.optimizer if not row.ok] == ["decoder.layers.0.mlp.linear_fc1.weight [exp_avg]"]
    assert verify(source, tmp_path / "moved", optimizer=True, atol=1e-5).equivalent
    cli = ckptkit_cli("verify", "--optimizer", source, tmp_path / "moved")
    assert cli.exit_code == 1 and "84 optimizer state tensors, max |a-b| = 1e-06" in " ".join(cli.output.split())
    as_json = ckptkit_cli("verify", "--optimizer", source, tmp_path / "moved", "--json")
    assert [row["name"] for row in json.loads(as_json.stdout)["optimizer"] if row["status"] == "different"] == [
        "decoder.layers.0.mlp.linear_fc1.weight [exp_avg]"]


def test_a_checkpoint_without_state_does_not_compare_equal_with_optimizer(tmp_path):
    reshard(fixture_path(*DISTRIBUTED), tmp_path / "weights", tp=1, pp=1, optimizer=False)
    result = verify(fixture_path(*DISTRIBUTED), tmp_path / "weights", optimizer=True)
    assert not result.equivalent
    assert result.problems == [f"optimizer state of B not read: {tmp_path / 'weights'}/iter_0000010/mp_rank_00/"
                               "model_optim_rng.pt: no optimizer state (saved with --no-save-optim)"]
    assert verify(fixture_path(*DISTRIBUTED), tmp_path / "weights").equivalent  # the weights alone
