"""The conversion pipeline: reads on one thread, CPU work on a pool, results in order,
errors where they happened, and a bounded number of bytes held between reading and use."""
import threading

import pytest
import torch

from ckptkit import pipeline
from ckptkit.layouts.base import CheckpointReader


class CountingReader(CheckpointReader):
    """Tensors of ``nbytes`` bytes each, named "0", "1", ...; records which thread fetched
    each and how many fetched bytes the consumer has not taken yet."""

    def __init__(self, nbytes: int, fail_at: str | None = None):
        self.nbytes = nbytes
        self.fail_at = fail_at
        self.fetch_threads = set()
        self.fetched = []
        self.lock = threading.Lock()

    def fetch(self, name):
        if name == self.fail_at:
            raise ValueError(f"cannot read {name}")
        self.fetch_threads.add(threading.get_ident())
        with self.lock:
            self.fetched.append(name)
        return torch.full((self.nbytes,), int(name) % 100, dtype=torch.uint8)


def jobs_for(names, make=lambda tensor: tensor):
    return [(name, make) for name in names]


def test_results_come_back_in_order_and_reads_run_on_one_other_thread():
    reader = CountingReader(1000)
    names = [str(index) for index in range(40)]
    made_on = set()

    def double(tensor):
        made_on.add(threading.get_ident())
        return tensor.to(torch.int16) * 2

    results = list(pipeline.produced(reader, jobs_for(names, double), workers=2))

    assert [name for name, _ in results] == names
    assert all(torch.equal(result, torch.full((1000,), 2 * (int(name) % 100), dtype=torch.int16))
               for name, result in results)
    assert len(reader.fetch_threads) == 1 and threading.get_ident() not in reader.fetch_threads
    assert threading.get_ident() not in made_on


def test_without_workers_everything_runs_on_the_calling_thread():
    reader = CountingReader(10)
    results = list(pipeline.produced(reader, jobs_for(["0", "1", "2"]), workers=0))
    assert [name for name, _ in results] == ["0", "1", "2"]
    assert reader.fetch_threads == {threading.get_ident()}


def test_reads_stop_running_ahead_once_the_byte_budget_waits_for_the_consumer():
    reader = CountingReader(1 << 20)
    names = [str(index) for index in range(30)]
    made = pipeline.produced(reader, jobs_for(names), workers=2, max_bytes=3 << 20)
    taken = 0
    for _ in made:
        taken += 1
        if taken == 5:
            threading.Event().wait(0.3)  # the reading thread has all the time it wants
            # read but not taken: the budget (3 tensors) plus the one read when it was last reached
            assert len(reader.fetched) - taken <= 4
    assert taken == 30


def test_a_tensor_larger_than_the_budget_goes_through_alone():
    reader = CountingReader(8 << 20)
    results = list(pipeline.produced(reader, jobs_for(["0", "1", "2"]), workers=2, max_bytes=1 << 20))
    assert [name for name, _ in results] == ["0", "1", "2"]


def test_a_read_error_is_raised_after_the_results_before_it():
    reader = CountingReader(100, fail_at="3")
    seen = []
    with pytest.raises(ValueError, match="cannot read 3"):
        for name, _ in pipeline.produced(reader, jobs_for([str(index) for index in range(8)]), workers=2):
            seen.append(name)
    assert seen == ["0", "1", "2"]


def test_an_error_of_the_cpu_work_is_raised_at_its_place():
    def refuse_five(tensor):
        if tensor[0] == 5:
            raise RuntimeError("bad shape")
        return tensor

    seen = []
    with pytest.raises(RuntimeError, match="bad shape"):
        for name, _ in pipeline.produced(CountingReader(100), jobs_for([str(i) for i in range(9)], refuse_five)):
            seen.append(name)
    assert seen == ["0", "1", "2", "3", "4"]


def test_stopping_early_stops_the_reading_thread():
    reader = CountingReader(1 << 20)
    made = pipeline.produced(reader, jobs_for([str(index) for index in range(100)]), workers=2, max_bytes=2 << 20)
    next(made)
    made.close()
    fetched = len(reader.fetched)
    threading.Event().wait(0.2)
    assert len(reader.fetched) == fetched < 100
    assert not [thread for thread in threading.enumerate() if thread.name == "ckptkit read"]
