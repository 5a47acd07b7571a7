"""The streaming writers produce what the libraries' own writers produce."""
import argparse

import pytest
import torch
from safetensors.torch import save_file

from ckptkit.safe_load import safe_torch_load
from ckptkit.safetensors_stream import StreamingSafetensorsWriter
from ckptkit.torch_stream import StreamingTorchWriter


def test_streamed_safetensors_file_is_byte_identical_to_save_file(tmp_path):
    tensors = {"b": torch.ones(3, dtype=torch.bfloat16), "a": torch.randn(2, 2), "c": torch.randn(5).half(),
               "d": torch.arange(3), "e": torch.zeros(0), "layers.10.w": torch.randn(4, 4), "layers.2.w": torch.randn(1)}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    with StreamingSafetensorsWriter(tmp_path / "ours.safetensors",
                                    {name: (t.dtype, t.shape) for name, t in tensors.items()}) as out:
        for name in out.order:
            out.write(name, tensors[name])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_streamed_safetensors_refuses_a_tensor_that_does_not_match_the_plan(tmp_path):
    with pytest.raises(ValueError, match="planned"):
        with StreamingSafetensorsWriter(tmp_path / "x.safetensors", {"w": (torch.float32, (2,))}) as out:
            out.write("w", torch.zeros(3))


def test_streamed_torch_file_loads_with_mmap_and_weights_only(tmp_path):
    weight = torch.randn(6, 4)
    view = torch.randn(10, dtype=torch.bfloat16)[3:7]
    with StreamingTorchWriter(tmp_path / "rank.pt") as writer:
        reference = writer.add_tensor(weight)
        writer.finish({"model": {"w": reference, "v": writer.add_tensor(view), "_extra_state": None},
                       "args": argparse.Namespace(tensor_model_parallel_size=2), "iteration": 7})
    state = safe_torch_load(tmp_path / "rank.pt", mmap=True)
    assert torch.equal(state["model"]["w"], weight) and torch.equal(state["model"]["v"], view)
    assert state["args"].tensor_model_parallel_size == 2 and state["iteration"] == 7
    assert state["model"]["_extra_state"] is None
