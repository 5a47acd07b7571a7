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


# ---------------------------------------------------------------------------- unbuffered file writes

def _write_in_pieces(path, pieces, *, staging_bytes, durable=True):
    from ckptkit.streaming_io import DirectWriteFile

    out = DirectWriteFile(path, staging_bytes=staging_bytes)
    for piece in pieces:
        out.write(piece)
    out.close(durable=durable)
    return out


@pytest.mark.parametrize("sizes", [[1], [4096], [8192, 8192], [7, 5000, 0, 12289, 3], [20000], [100, 8092, 1]])
def test_unbuffered_file_holds_exactly_the_bytes_written_across_staging_boundaries(tmp_path, sizes):
    generator = torch.Generator().manual_seed(sum(sizes))
    pieces = [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes()
              for size in sizes]
    out = _write_in_pieces(tmp_path / "f.bin", pieces, staging_bytes=8192)
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)
    assert out.tell() == out.size == sum(sizes)


def test_unbuffered_file_bypasses_the_page_cache_where_the_file_system_allows(tmp_path):
    import errno
    import os

    try:  # what the file system under tmp_path says of O_DIRECT, asked directly
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        expected = True
    except OSError as error:
        assert error.errno in (errno.EINVAL, errno.EOPNOTSUPP)
        expected = False
    assert _write_in_pieces(tmp_path / "f.bin", [b"x" * 10], staging_bytes=8192).direct is expected


def test_unbuffered_file_falls_back_to_ordinary_writes_where_o_direct_is_refused(tmp_path, monkeypatch):
    from ckptkit import streaming_io

    # What _open_direct returns when open() fails with EINVAL (older tmpfs, some network file systems).
    monkeypatch.setattr(streaming_io, "_open_direct", lambda path: None)
    pieces = [b"a" * 5000, b"b" * 3, bytes(range(256)) * 40]
    out = _write_in_pieces(tmp_path / "f.bin", pieces, staging_bytes=8192, durable=False)
    assert not out.direct
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)


def test_a_failed_background_write_is_raised_to_the_writer(tmp_path, monkeypatch):
    import errno
    import os

    from ckptkit.streaming_io import DirectWriteFile

    out = DirectWriteFile(tmp_path / "f.bin", staging_bytes=8192)
    if not out.direct:
        pytest.skip("the file system under tmp_path refuses O_DIRECT")

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", disk_full)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(4):  # the first full buffer goes to the flusher; a later write or close sees its error
            out.write(b"x" * 8192)
        out.close()
    out.close(durable=False)


def test_writes_refused_after_an_accepted_o_direct_open_go_through_the_page_cache(tmp_path, monkeypatch):
    import errno
    import os

    from ckptkit.streaming_io import DirectWriteFile

    out = DirectWriteFile(tmp_path / "f.bin", staging_bytes=8192)
    if not out.direct:
        pytest.skip("the file system under tmp_path refuses O_DIRECT")
    real_pwrite, refused = os.pwrite, []

    def refuses_the_direct_descriptor(fd, data, offset):
        if fd == out.fileno():
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuses_the_direct_descriptor)
    pieces = [bytes(range(256)) * 100, b"tail"]
    for piece in pieces:
        out.write(piece)
    out.close()
    assert refused == [0]
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)


def test_unbuffered_writes_can_be_turned_off_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTKIT_BUFFERED_WRITES", "1")
    out = _write_in_pieces(tmp_path / "f.bin", [b"z" * 9000], staging_bytes=8192)
    assert not out.direct and (tmp_path / "f.bin").read_bytes() == b"z" * 9000


def test_streamed_torch_file_passes_zip_crc_checks(tmp_path):
    import zipfile

    with StreamingTorchWriter(tmp_path / "model.pt") as writer:
        writer.finish({"w": torch.randn(3000, 7), "b": torch.arange(10), "nested": {"h": torch.ones(2).half()}})
    with zipfile.ZipFile(tmp_path / "model.pt") as archive:
        assert archive.testzip() is None


# ---------------------------------------------------------------------------- reads straight into place

def _file_of(path, data: bytes):
    import os

    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def test_a_read_fills_a_block_of_columns_in_place_and_leaves_the_rest(tmp_path):
    """A row-parallel TP piece is read straight into its columns of the merged tensor."""
    from ckptkit.streaming_io import read_into

    piece = torch.arange(3000 * 7, dtype=torch.int16).reshape(3000, 7)  # 3000 rows: several preadv calls
    fd = _file_of(tmp_path / "piece.bin", b"header" + piece.numpy().tobytes())
    merged = torch.full((3000, 20), -1, dtype=torch.int16)
    read_into(fd, merged[:, 5:12], offset=6)
    assert torch.equal(merged[:, 5:12], piece)
    assert (merged[:, :5] == -1).all() and (merged[:, 12:] == -1).all()


def test_a_read_into_a_transposed_view_fills_it_in_element_order(tmp_path):
    from ckptkit.streaming_io import read_into

    values = torch.randn(33, 9).half()
    fd = _file_of(tmp_path / "values.bin", values.numpy().tobytes())
    out = torch.empty(9, 33, dtype=torch.float16)
    read_into(fd, out.t(), offset=0)
    assert torch.equal(out.t(), values)


def test_a_read_past_the_end_of_the_file_is_refused(tmp_path):
    from ckptkit.streaming_io import read_into

    fd = _file_of(tmp_path / "short.bin", bytes(100))
    with pytest.raises(EOFError):
        read_into(fd, torch.empty(20, 10, dtype=torch.float16)[:, :5], offset=0)


def test_write_threads_of_different_files_share_one_byte_budget(tmp_path):
    """Eight TP ranks' files written at once hold no more than one file would."""
    import threading

    from ckptkit.streaming_io import DirectWriteFile, OrderedWriteThread, PendingBytes

    budget = PendingBytes(max_bytes=3000)
    release = threading.Event()
    writes = [OrderedWriteThread(DirectWriteFile(tmp_path / f"{index}.bin"), pending=budget) for index in range(4)]
    for write in writes[:3]:
        write.submit(release.wait, 1000)
    assert budget.pending == 3000
    threading.Timer(0.2, release.set).start()
    writes[3].submit(lambda: None, 1000)  # waits: the other files' jobs hold the whole budget
    assert release.is_set()
    for write in writes:
        write.close()
    assert budget.pending == 0
