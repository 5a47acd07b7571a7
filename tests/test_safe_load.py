"""Loading never runs code hidden in a checkpoint."""
import os
import pickle
import zipfile

import pytest
import torch

from ckptkit.errors import BadInput
from ckptkit.safe_load import safe_torch_load


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_a_command_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": RunsACommand(marker)}, tmp_path / "evil.pt")
    with pytest.raises(BadInput, match=r"evil.pt: refuses to unpickle disallowed global '(posix|os)\.system'"):
        safe_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_zero_length_and_truncated_files_are_refused_with_the_file_name(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(BadInput, match="empty.pt: file is empty"):
        safe_torch_load(tmp_path / "empty.pt")
    torch.save({"w": torch.randn(100)}, tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:300])
    with pytest.raises(BadInput, match="cut.pt"):
        safe_torch_load(tmp_path / "cut.pt")


def test_plain_pickle_files_are_refused(tmp_path):
    with open(tmp_path / "old.pt", "wb") as handle:
        pickle.dump({"w": 1}, handle)
    with pytest.raises(BadInput, match="old.pt"):
        safe_torch_load(tmp_path / "old.pt")
