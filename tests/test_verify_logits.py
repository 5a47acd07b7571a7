"""verify --logits runs a Megatron checkpoint in its own layout and an HF model through transformers."""
import json

from click.testing import CliRunner

from ckptkit.cli import main
from ckptkit.convert import megatron_to_hf

from conftest import fixture_path, make_hf_model


def test_verify_logits_of_real_tp2pp2_checkpoint_against_its_hf_conversion(tmp_path):
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")
    megatron_to_hf(source, tmp_path / "hf")
    result = CliRunner().invoke(main, ["verify", "--logits", str(source), str(tmp_path / "hf"), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["equivalent"] and report["max_abs_diff"] < 1e-4
    assert report["runner_a"].startswith("ckptkit model at TP2 PP2") and report["runner_b"] == "transformers"


def test_verify_logits_fails_for_different_models(tmp_path):
    make_hf_model(tmp_path / "a", "gpt2", seed=1)
    make_hf_model(tmp_path / "b", "gpt2", seed=2)
    result = CliRunner().invoke(main, ["verify", "--logits", str(tmp_path / "a"), str(tmp_path / "b")],
                                catch_exceptions=False)
    assert result.exit_code == 1 and "logits differ" in result.output
