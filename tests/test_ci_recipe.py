"""The documented CI recipe runs as written on the bundled real checkpoint."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import fixture_path

RECIPE = Path(__file__).parent.parent / "docs" / "ci" / "release-gate.sh"


def test_release_gate_recipe_passes_on_the_bundled_checkpoint_and_writes_json_reports(tmp_path):
    if shutil.which("ckptkit") is None:
        pytest.skip("the ckptkit console script is not installed")
    env = dict(os.environ, MEGATRON_CKPT=str(fixture_path("gpt2_tp2pp2", "conv", "torch")),
               OUT=str(tmp_path / "model-hf"), RESHARD_TP="1", RESHARD_PP="3")
    completed = subprocess.run(["bash", str(RECIPE)], env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    reports = tmp_path / "model-hf.reports"
    assert json.loads((reports / "equivalence.json").read_text())["equivalent"] is True
    assert json.loads((reports / "reshard-equivalence.json").read_text())["equivalent"] is True
    assert json.loads((reports / "inspect.json").read_text())["layout"]["tp"] == 2


def test_release_gate_recipe_fails_when_the_conversion_is_not_equivalent(tmp_path):
    if shutil.which("ckptkit") is None:
        pytest.skip("the ckptkit console script is not installed")
    env = dict(os.environ, MEGATRON_CKPT=str(fixture_path("gpt2_tp2pp2", "conv", "torch")),
               OUT=str(tmp_path / "model-hf"), DTYPE="bf16")
    # bf16 output compared with a tolerance far below bf16 rounding must fail the gate
    script = RECIPE.read_text().replace("--atol 1e-2", "--atol 1e-9")
    (tmp_path / "gate.sh").write_text(script)
    completed = subprocess.run(["bash", str(tmp_path / "gate.sh")], env=env, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode != 0
