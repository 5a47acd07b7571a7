"""The command line: every command works on the real fixture, prints JSON on request,
exits 0 only on success, and explains itself in --help with an example."""
import importlib
import json
import pkgutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import ckptkit.commands
from ckptkit.cli import main

from conftest import fixture_path, make_hf_model

COMMANDS = ["inspect", "megatron-to-hf", "hf-to-megatron", "reshard", "verify", "demo"]


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_shows_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.output and f"ckptkit {command}" in result.output


def test_inspect_json_describes_layout_family_and_partitioning():
    result = run("inspect", fixture_path("gpt2_tp2pp2", "conv", "torch"), "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["layout"]["layout"] == "megatron-legacy" and info["layout"]["tp"] == 2
    assert info["layout"]["iteration"] == 10 and info["layout"]["checkpoint_version"] == 3.0
    assert info["family"] == "gpt2" and info["num_parameters"] == 773376
    qkv = next(t for t in info["tensors"] if t["name"] == "decoder.layers.0.self_attention.linear_qkv.weight")
    assert qkv["rule"] == "qkv" and qkv["shape"] == [288, 96] and qkv["shard_shape"] == [144, 96]


def test_convert_reshard_and_verify_from_the_command_line(tmp_path):
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")
    assert run("megatron-to-hf", source, tmp_path / "hf", "--json").exit_code == 0
    assert run("reshard", source, tmp_path / "tp1pp2", "--tp", 1, "--pp", 2).exit_code == 0
    assert run("hf-to-megatron", tmp_path / "hf", tmp_path / "tp2pp3", "--tp", 2, "--pp", 3).exit_code == 0
    result = run("verify", tmp_path / "tp1pp2", tmp_path / "tp2pp3", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["equivalent"] is True
    assert run("verify", tmp_path / "hf").exit_code == 0


def test_verify_exits_non_zero_and_names_the_differing_tensor(tmp_path):
    make_hf_model(tmp_path / "a", "gpt2", seed=1)
    make_hf_model(tmp_path / "b", "gpt2", seed=2)
    result = run("verify", tmp_path / "a", tmp_path / "b", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["equivalent"] is False
    assert any(t["status"] == "different" for t in report["tensors"])


def test_bad_input_is_one_line_with_exit_code_2(tmp_path):
    result = run("inspect", tmp_path / "nothing-here")
    assert result.exit_code == 2
    assert "nothing-here" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_existing_destination_is_refused_without_overwrite(tmp_path):
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run("megatron-to-hf", source, tmp_path / "out")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert run("megatron-to-hf", source, tmp_path / "out", "--overwrite").exit_code == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_demo_runs_the_whole_flow_on_the_bundled_checkpoint():
    result = run("demo", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["ok"] and [step["name"] for step in summary["steps"]][:3] == [
        "inspect", "megatron-to-hf", "logits vs Megatron-LM"]


def command_modules() -> list[str]:
    return [f"ckptkit.commands.{module.name}" for module in pkgutil.iter_modules(ckptkit.commands.__path__)]


def test_command_modules_never_import_the_cli_that_registers_them():
    """ckptkit.cli imports every command module; a command module importing ckptkit.cli back is a cycle."""
    assert "ckptkit.commands.push" in command_modules()
    imports = "; ".join(f"import {module}" for module in command_modules())
    check = f"import sys; {imports}; assert 'ckptkit.cli' not in sys.modules, 'ckptkit.cli was imported'"

    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr


def test_every_command_module_registers_its_commands_on_main():
    from ckptkit.train.command import train

    registered = {command.name: command for module in command_modules() if not module.endswith(".shell")
                  for command in importlib.import_module(module).COMMANDS}
    registered["train"] = train
    context = click.Context(main)
    assert {name: main.get_command(context, name) for name in main.list_commands(context)} == registered
    assert set(COMMANDS) | {"push", "train"} == set(main.commands)


def test_help_lists_every_command_without_importing_torch():
    """``ckptkit --help`` stays quick: the trainer's command (which imports torch) is listed with
    its own short help but imported only when run."""
    check = ("import sys; from click.testing import CliRunner; from ckptkit.cli import main; "
             "result = CliRunner().invoke(main, ['--help']); assert result.exit_code == 0, result.output; "
             "assert 'torch' not in sys.modules, 'torch was imported'; print(result.output)")

    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    listed = completed.stdout.split("Commands:")[1]
    for name in set(COMMANDS) | {"push", "train"}:
        assert f"  {name} " in listed
    from ckptkit.cli import LAZY_COMMANDS
    from ckptkit.train.command import train

    assert LAZY_COMMANDS["train"][2] == train.get_short_help_str(limit=200)
