"""reshard carries Megatron's optimizer state to the new layout (issue: resume training on
other hardware): from the command line, on the real TP2 DP2 distributed-optimizer run."""
import json

import torch
from click.testing import CliRunner

from ckptkit.cli import main
from ckptkit.safe_load import safe_torch_load

from conftest import run_ckptkit, fixture_path

DISTRIBUTED = ("gpt2do_tp2dp2", "legacy")
BUFFERS = ("param", "exp_avg", "exp_avg_sq")


def rank_file(root, tp_rank, name):
    return safe_torch_load(root / "iter_0000010" / f"mp_rank_{tp_rank:02d}" / name)


def test_reshard_to_another_tp_pp_dp_and_back_returns_every_optimizer_buffer_bit_for_bit(tmp_path):
    source = fixture_path(*DISTRIBUTED)
    run_ckptkit("reshard", source, tmp_path / "tp1pp2dp4", "--tp", 1, "--pp", 2, "--dp", 4)
    assert (tmp_path / "tp1pp2dp4" / "iter_0000010" / "mp_rank_00_001" / "distrib_optim.pt").is_file()
    run_ckptkit("reshard", tmp_path / "tp1pp2dp4", tmp_path / "back", "--tp", 2, "--pp", 1, "--dp", 2)
    for tp_rank in range(2):
        original, returned = rank_file(source, tp_rank, "distrib_optim.pt"), rank_file(tmp_path / "back", tp_rank,
                                                                                        "distrib_optim.pt")
        for key in BUFFERS:
            assert torch.equal(returned[0][(torch.float32, torch.float32)][key],
                               original[0][(torch.float32, torch.float32)][key]), key
        original, returned = rank_file(source, tp_rank, "model_optim_rng.pt"), rank_file(tmp_path / "back", tp_rank,
                                                                                          "model_optim_rng.pt")
        assert returned["optimizer"] == original["optimizer"]
        assert returned["opt_param_scheduler"] == original["opt_param_scheduler"]


def test_distributed_state_becomes_plain_adam_state_on_request(tmp_path):
    run_ckptkit("reshard", fixture_path(*DISTRIBUTED), tmp_path / "plain", "--tp", 1, "--pp", 1,
            "--no-distributed-optimizer")
    state = rank_file(tmp_path / "plain", 0, "model_optim_rng.pt")
    assert not (tmp_path / "plain" / "iter_0000010" / "mp_rank_00" / "distrib_optim.pt").exists()
    assert state["args"].use_distributed_optimizer is False and state["optimizer"]["state"]  # fp32: torch Adam's dict


def test_no_optimizer_drops_the_state_and_says_so(tmp_path):
    result = run_ckptkit("reshard", fixture_path(*DISTRIBUTED), tmp_path / "weights", "--tp", 1, "--pp", 1,
                     "--no-optimizer", "--json")
    assert any("dropped optimizer" in note for note in json.loads(result.stdout)["notes"])
    assert "optimizer" not in rank_file(tmp_path / "weights", 0, "model_optim_rng.pt")
    assert not list((tmp_path / "weights").rglob("distrib_optim.pt"))


def test_dry_run_plans_the_optimizer_files(tmp_path):
    result = run_ckptkit("reshard", fixture_path(*DISTRIBUTED), tmp_path / "out", "--tp", 1, "--pp", 2, "--dp", 4,
                     "--dry-run", "--json")
    plan = json.loads(result.stdout)["plan"]
    assert plan["target"]["optimizer"] == {"distributed": True, "dp": 4}
    assert {f"iter_0000010/mp_rank_00_00{stage}/distrib_optim.pt" for stage in range(2)} <= set(plan["finish_files"])
    assert not (tmp_path / "out").exists()


def test_a_target_naming_without_a_known_parameter_order_is_refused_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(main, ["reshard", str(fixture_path(*DISTRIBUTED)), str(tmp_path / "te"), "--tp", "1",
                                       "--pp", "1", "--naming", "mcore-te"])
    assert result.exit_code == 2 and "optimizer state for the mcore-te naming" in result.output
    assert not (tmp_path / "te").exists()
    planned = CliRunner().invoke(main, ["reshard", str(fixture_path(*DISTRIBUTED)), str(tmp_path / "te"), "--tp", "1",
                                        "--pp", "1", "--naming", "mcore-te", "--dry-run"])
    assert planned.exit_code == 2  # the plan, made before any file is written, refuses it
    run_ckptkit("reshard", fixture_path(*DISTRIBUTED), tmp_path / "te", "--tp", 1, "--pp", 1, "--naming", "mcore-te",
            "--no-optimizer")
