"""The library API: four functions with typed results, usable without the CLI."""
import ckptkit
from ckptkit.convert import ConvertResult
from ckptkit.inspection import InspectResult
from ckptkit.verification import VerifyResult

from conftest import fixture_path


def test_api_converts_reshards_and_verifies_with_typed_results(tmp_path):
    source = fixture_path("gpt2_tp2pp2", "conv", "torch")
    info = ckptkit.inspect(source)
    assert isinstance(info, InspectResult) and info.layout["pp"] == 2
    seen = []
    converted = ckptkit.convert(source, tmp_path / "hf", to="hf", progress=seen.append)
    assert isinstance(converted, ConvertResult) and "model.safetensors" in converted.files
    assert sorted(seen) == sorted(tensor.name for tensor in info.tensors)  # each tensor reported once
    back = ckptkit.convert(tmp_path / "hf", tmp_path / "megatron", to="megatron", tp=2, pp=3)
    assert back.target_layout["tp"] == 2
    assert len(back.files) == 7 and back.files[-1] == "latest_checkpointed_iteration.txt"  # 6 rank files, tracker
    resharded = ckptkit.reshard(tmp_path / "megatron", tmp_path / "tp1", tp=1, pp=1)
    result = ckptkit.verify(source, tmp_path / "tp1")
    assert isinstance(result, VerifyResult) and result.equivalent and resharded.target_layout["pp"] == 1


def test_api_functions_document_themselves_with_examples():
    for function in (ckptkit.inspect, ckptkit.convert, ckptkit.reshard, ckptkit.verify):
        examples = [line for line in function.__doc__.splitlines() if line.strip().startswith(">>>")]
        assert any(f"ckptkit.{function.__name__}(" in line for line in examples), function.__name__
