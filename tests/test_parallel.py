"""Splitting a conversion over processes changes nothing in the output, and every output
file is written by exactly one process, on one host (--workers) or under torchrun."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.parallel import distributed_world, my_share, partition

from conftest import make_hf_model


def folder_bytes(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def megatron_tp2pp2(tmp_path_factory):
    hf = make_hf_model(tmp_path_factory.mktemp("hf") / "gpt2", "gpt2", n_layer=4)
    out = tmp_path_factory.mktemp("megatron") / "tp2pp2"
    hf_to_megatron(hf, out, tp=2, pp=2, naming="legacy")
    return hf, out


@pytest.mark.slow
def test_two_workers_write_the_same_rank_files_as_one(megatron_tp2pp2, tmp_path):
    hf, _ = megatron_tp2pp2
    one = hf_to_megatron(hf, tmp_path / "one", tp=2, pp=2)
    two = hf_to_megatron(hf, tmp_path / "two", tp=2, pp=2, workers=2)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    assert one.files == two.files


@pytest.mark.slow
def test_two_workers_reshard_to_the_same_bytes_as_one(megatron_tp2pp2, tmp_path):
    _, megatron = megatron_tp2pp2
    reshard(megatron, tmp_path / "one", tp=1, pp=4)
    reshard(megatron, tmp_path / "two", tp=1, pp=4, workers=2)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")


@pytest.mark.slow
def test_three_workers_write_the_same_shards_and_index_as_one(megatron_tp2pp2, tmp_path):
    _, megatron = megatron_tp2pp2
    one = megatron_to_hf(megatron, tmp_path / "one", max_shard_size="20KB")
    three = megatron_to_hf(megatron, tmp_path / "three", max_shard_size="20KB", workers=3)
    assert len([name for name in one.files if name.endswith(".safetensors")]) > 3
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "three")
    assert one.files == three.files


@given(st.lists(st.integers(0, 1000), max_size=40), st.integers(1, 9))
def test_partition_puts_every_file_in_exactly_one_contiguous_run(sizes, parts):
    files = [(f"file{index}", size) for index, size in enumerate(sizes)]
    runs = partition(files, parts)
    assert len(runs) == parts
    assert [name for run in runs for name in run] == [name for name, _ in files]  # in order, once each


def test_partition_balances_bytes_and_keeps_a_stage_together():
    # TP2 PP2 rank files in plan order: stage 0's two ranks, then stage 1's.
    files = [("mp_rank_00_000", 10), ("mp_rank_01_000", 10), ("mp_rank_00_001", 9), ("mp_rank_01_001", 9)]
    assert partition(files, 2) == [["mp_rank_00_000", "mp_rank_01_000"], ["mp_rank_00_001", "mp_rank_01_001"]]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_torchrun_ranks_and_their_workers_cover_the_plan_exactly_once(world, workers, monkeypatch):
    files = [(f"mp_rank_{tp:02d}_{pp:03d}", 100 + pp) for pp in range(4) for tp in range(4)]
    taken = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        found_rank, found_world = distributed_world()
        runs = my_share(files, workers=workers, rank=found_rank, world=found_world)
        assert len(runs) == workers
        taken += [name for run in runs for name in run]
    assert sorted(taken) == sorted(name for name, _ in files)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_ranks_write_what_one_process_writes(megatron_tp2pp2, tmp_path):
    """Two ranks started the way torchrun starts them (env://), each running the CLI."""
    _, megatron = megatron_tp2pp2
    reshard(megatron, tmp_path / "one", tp=1, pp=4)
    port = _free_port()
    ranks = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        ranks.append(subprocess.Popen([sys.executable, "-m", "ckptkit.cli", "reshard", str(megatron),
                                       str(tmp_path / "ranks"), "--tp", "1", "--pp", "4", "--json"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in ranks:
        _, error = process.communicate(timeout=300)
        assert process.returncode == 0, error
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "ranks")
    assert not [path for path in tmp_path.iterdir() if "partial" in path.name]


_RANK_SCRIPT = """
import sys
from pathlib import Path
from ckptkit.parallel import SharedOutput

rank = int(sys.argv[2])
with SharedOutput(sys.argv[1]) as shared:
    (shared.path / f"part{rank}").write_text("written")
    if rank == 1:
        raise SystemExit("rank 1 cannot write its part")
    shared.parts_done()
"""


@pytest.mark.slow
def test_when_one_torchrun_rank_fails_no_rank_publishes_anything(tmp_path):
    port = _free_port()
    ranks = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ranks.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tmp_path / "out"), str(rank)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=120) for process in ranks]
    assert [process.returncode for process in ranks] == [1, 1], outputs
    assert "another rank failed" in outputs[0][1]
    assert list(tmp_path.iterdir()) == []  # no destination, no partial folder
