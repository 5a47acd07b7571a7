"""The examples in the library's docstrings run, as written, against the checkpoint bundled
with the package (``checkpoints/gpt2``: real Megatron-LM GPT-2, TP2 PP2) and a Hugging Face
Llama converted from the real Llama fixture (``hf/llama``)."""
import doctest
import importlib
import shutil
from pathlib import Path

import pytest

import ckptkit
from conftest import fixture_path

DEMO_CHECKPOINT = Path(ckptkit.__file__).parent / "data" / "demo" / "gpt2_tp2pp2"
DOCUMENTED_MODULES = ["ckptkit", "ckptkit.convert", "ckptkit.verification", "ckptkit.inspection",
                      "ckptkit.layouts", "ckptkit.bridges", "ckptkit.spec", "ckptkit.model_card"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    from ckptkit.convert import megatron_to_hf

    shutil.copytree(DEMO_CHECKPOINT, tmp_path / "checkpoints" / "gpt2")
    (tmp_path / "hf").mkdir()
    megatron_to_hf(fixture_path("llama_tp2pp2", "conv", "torch"), tmp_path / "hf" / "llama")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("module_name", DOCUMENTED_MODULES)
def test_docstring_examples_run_as_written(module_name, workspace):
    module = importlib.import_module(module_name)
    if module_name == "ckptkit":  # the package's functions, not the submodule ckptkit.convert
        module = ckptkit
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                              extraglobs={"ckptkit": ckptkit})
    assert results.attempted > 0, f"{module_name} has no examples"
    assert results.failed == 0
