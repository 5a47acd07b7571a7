"""Training data: token streams cut into samples, and the global batch of each step.

Sources:

* Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``, the ``MMIDIDX`` format
  written by ``tools/preprocess_data.py``), read memory-mapped;
* JSON lines (``{"text": ...}`` per line) tokenized with a transformers tokenizer
  folder, the end-of-sequence token appended to every document;
* with neither, a deterministic synthetic corpus (learnable: each token is usually
  followed by its fixed successor).

Documents are concatenated into one stream and cut into samples of ``seq_length + 1``
tokens (inputs and shifted labels), a simpler packing than Megatron's ``GPTDataset``.
Sample order is a seeded permutation (a new one each epoch). The global batch of
step ``k`` is samples ``k x G .. (k+1) x G - 1`` of that order, whatever the layout;
data-parallel rank ``d`` takes micro-batch ``m`` as rows ``(m x DP + d) x B ..`` of
it, the order Megatron's ``MegatronPretrainingSampler`` uses.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}


def read_indexed_dataset(prefix: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, sequence_lengths)`` of ``PREFIX.bin``/``PREFIX.idx``; tokens memory-mapped.

    The index is: magic ``MMIDIDX\\0\\0``, version (u64 = 1), dtype code (u8), sequence
    count (u64), document count (u64), then int32 sequence lengths, int64 byte offsets
    of the sequences in ``.bin``, int64 document boundaries.
    """
    prefix = Path(str(prefix).removesuffix(".bin").removesuffix(".idx"))
    index_path, data_path = prefix.with_name(prefix.name + ".idx"), prefix.with_name(prefix.name + ".bin")
    for path in (index_path, data_path):
        if not path.is_file():
            raise BadInput(f"{path}: file not found (an indexed dataset needs .bin and .idx)")
    with open(index_path, "rb") as stream:
        magic = stream.read(len(INDEX_MAGIC))
        if magic != INDEX_MAGIC:
            raise BadInput(f"{index_path}: not a Megatron indexed dataset index (magic {magic!r}, "
                           f"expected {INDEX_MAGIC!r})")
        version, = struct.unpack("<Q", stream.read(8))
        if version != INDEX_VERSION:
            raise BadInput(f"{index_path}: index version {version}; expected {INDEX_VERSION}")
        code, = struct.unpack("<B", stream.read(1))
        if code not in DTYPE_CODES:
            raise BadInput(f"{index_path}: unknown dtype code {code}")
        sequence_count, = struct.unpack("<Q", stream.read(8))
        stream.read(8)  # document count
        header = stream.tell()
    lengths = np.memmap(index_path, dtype=np.int32, mode="r", offset=header, shape=(sequence_count,))
    tokens = np.memmap(data_path, dtype=DTYPE_CODES[code], mode="r")
    if int(lengths.sum()) != tokens.shape[0]:
        raise BadInput(f"{data_path}: holds {tokens.shape[0]} tokens; the index lists {int(lengths.sum())}")
    return tokens, np.asarray(lengths)


def write_indexed_dataset(prefix: str | Path, documents: list[list[int]], dtype=np.uint16) -> None:
    """Write documents (one sequence each) as ``PREFIX.bin``/``PREFIX.idx`` in Megatron's format."""
    prefix = Path(prefix)
    code = {np.dtype(value): key for key, value in DTYPE_CODES.items()}[np.dtype(dtype)]
    arrays = [np.asarray(document, dtype=dtype) for document in documents]
    lengths = np.array([len(array) for array in arrays], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1]) * np.dtype(dtype).itemsize]).astype(np.int64)
    with open(prefix.with_name(prefix.name + ".bin"), "wb") as stream:
        for array in arrays:
            stream.write(array.tobytes(order="C"))
    with open(prefix.with_name(prefix.name + ".idx"), "wb") as stream:
        stream.write(INDEX_MAGIC)
        stream.write(struct.pack("<Q", INDEX_VERSION))
        stream.write(struct.pack("<B", code))
        stream.write(struct.pack("<Q", len(arrays)))
        stream.write(struct.pack("<Q", len(arrays) + 1))
        stream.write(lengths.tobytes(order="C"))
        stream.write(pointers.tobytes(order="C"))
        stream.write(np.arange(len(arrays) + 1, dtype=np.int64).tobytes(order="C"))


def tokenize_jsonl(path: str | Path, tokenizer_dir: str | Path, key: str = "text") -> np.ndarray:
    """Token stream of a JSON-lines file, each document followed by the tokenizer's EOS token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream: list[int] = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[key]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BadInput(f"{path}:{number}: expected a JSON object with a {key!r} string") from None
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                stream.append(tokenizer.eos_token_id)
    return np.asarray(stream, dtype=np.int64)


class PackedSamples:
    """Sample ``i`` = tokens ``i x seq .. i x seq + seq`` (``seq + 1`` tokens) of one stream."""

    def __init__(self, tokens: np.ndarray, seq_length: int, vocab_size: int, source: str):
        self.tokens, self.seq_length = tokens, seq_length
        self.count = (len(tokens) - 1) // seq_length
        if self.count < 1:
            raise BadInput(f"{source}: {len(tokens)} tokens make no sample of {seq_length + 1}")
        self.vocab_size, self.source = vocab_size, source

    def __len__(self):
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.seq_length
        sample = torch.from_numpy(np.array(self.tokens[start: start + self.seq_length + 1], dtype=np.int64))
        if int(sample.max()) >= self.vocab_size:
            raise BadInput(f"{self.source}: token id {int(sample.max())} in sample {index} is outside the "
                           f"model's vocabulary of {self.vocab_size}")
        return sample


class SyntheticSamples:
    """A deterministic, learnable corpus: walks along one fixed cycle through the vocabulary.

    A seeded permutation orders every token; a sample starts at a random place of that
    cycle and follows it, with a quarter of its tokens replaced by random ones. Sample
    ``i`` depends only on ``(seed, i)``.
    """

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 1234, count: int = 1 << 30):
        self.cycle = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))
        self.vocab_size, self.seq_length, self.seed, self.count = vocab_size, seq_length, seed, count

    def __len__(self):
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 7919 + index + 1)
        start = int(torch.randint(self.vocab_size, (), generator=generator))
        sample = self.cycle[(start + torch.arange(self.seq_length + 1)) % self.vocab_size]
        noise = torch.rand(self.seq_length + 1, generator=generator) < 0.25
        random_tokens = torch.randint(self.vocab_size, (self.seq_length + 1,), generator=generator)
        return torch.where(noise, random_tokens, sample)


def open_samples(data: str | None, *, seq_length: int, vocab_size: int, seed: int,
                 tokenizer: str | None = None):
    """Samples from ``data`` (indexed dataset prefix, .jsonl file, or None for synthetic)."""
    if data is None:
        return SyntheticSamples(vocab_size, seq_length, seed)
    path = Path(data)
    if path.suffix in (".jsonl", ".json"):
        if tokenizer is None:
            raise BadInput(f"{path}: JSON lines need a tokenizer folder (--tokenizer)")
        return PackedSamples(tokenize_jsonl(path, tokenizer), seq_length, vocab_size, str(path))
    tokens, _ = read_indexed_dataset(path)
    return PackedSamples(tokens, seq_length, vocab_size, str(path))


class GlobalBatches:
    """The global batch of each step, and this data-parallel rank's micro-batches of it."""

    def __init__(self, samples, global_batch_size: int, seed: int):
        self.samples, self.global_batch_size, self.seed = samples, global_batch_size, seed
        self.shuffle = not isinstance(samples, SyntheticSamples)
        self._epoch_orders: dict[int, torch.Tensor] = {}

    def sample_index(self, position: int) -> int:
        if not self.shuffle:
            return position
        epoch, within = divmod(position, len(self.samples))
        if epoch not in self._epoch_orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch_orders[epoch] = torch.randperm(len(self.samples), generator=generator)
        return int(self._epoch_orders[epoch][within])

    def global_batch(self, step: int) -> torch.Tensor:
        """``[G, seq + 1]`` tokens of step ``step``."""
        start = step * self.global_batch_size
        return torch.stack([self.samples[self.sample_index(start + row)] for row in range(self.global_batch_size)])

    def microbatches(self, step: int, dp_rank: int, dp: int, micro_batch_size: int) -> list[torch.Tensor]:
        """This DP rank's micro-batches ``[B, seq + 1]`` of step ``step``, in order."""
        per_rank = self.global_batch_size // dp
        count = per_rank // micro_batch_size
        start = step * self.global_batch_size
        batches = []
        for microbatch in range(count):
            first_row = (microbatch * dp + dp_rank) * micro_batch_size
            rows = [self.samples[self.sample_index(start + first_row + row)] for row in range(micro_batch_size)]
            batches.append(torch.stack(rows))
        return batches
