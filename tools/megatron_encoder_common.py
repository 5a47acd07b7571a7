"""What tools/megatron_encoder_pretrain.py and tools/megatron_encoder_logits.py share: where
Megatron-LM keeps its BERT and T5 training scripts, the random batches that stand in for
Megatron's masked-word-piece datasets, and the fixed inputs whose logits the fixtures record.

Megatron-LM has no mock dataset for BERT or T5 (BERTMaskedWordPieceDataset and
T5MaskedWordPieceDataset read an indexed corpus), so the training runs here draw their samples
from ``MockEncoderDataset``: each sample is the dict the example's ``get_batch`` reads, with the
same keys, shapes and int64 dtype as the real datasets return (megatron/core/datasets/
bert_dataset.py and t5_dataset.py, Megatron-LM d98e8a6).

Token id 0 is padding everywhere: T5's local attention masks are rebuilt from the tokens
(``T5MaskedWordPieceDataset._build_b1ss_attention_mask`` keeps positions whose id is >= 1), and
the real datasets write 0 into padded positions; real tokens are drawn from 1..vocab-1.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy
import torch

MEGATRON_PATH = Path(os.environ["MEGATRON_PATH"])
MODELS = ("bert", "t5")


def training_script(model: str) -> Path:
    """Megatron's own training script for MODEL: examples/<model>/pretrain_<model>.py since
    2025 (Megatron-LM moved them there), pretrain_<model>.py at the root before."""
    for candidate in (MEGATRON_PATH / "examples" / model / f"pretrain_{model}.py",
                      MEGATRON_PATH / f"pretrain_{model}.py"):
        if candidate.exists():
            return candidate
    raise SystemExit(f"{MEGATRON_PATH}: no pretrain_{model}.py (looked in examples/{model}/ and the root)")


def import_training_script(model: str):
    """The training script as a module (its ``__main__`` block does not run), with Megatron's
    root on sys.path: examples/t5/pretrain_t5.py imports ``loss_func`` from pretrain_gpt."""
    sys.path.insert(0, str(MEGATRON_PATH))
    if model == "bert":
        _without_transformer_engine_bert_spec()
    else:
        _t5_final_norms_without_transformer_engine()
    script = training_script(model)
    spec = importlib.util.spec_from_file_location(f"pretrain_{model}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    print(f"using {script}")
    return module


def _without_transformer_engine_bert_spec() -> None:
    """examples/bert/pretrain_bert.py imports ``bert_layer_with_transformer_engine_spec``, which
    Megatron-LM d98e8a6 builds on first access (a module ``__getattr__``) and which raises
    ImportError without Transformer Engine, even when --spec local never uses it. Without
    Transformer Engine the name is set to None first, so the import finds a plain attribute."""
    from megatron.core.models.bert import bert_layer_specs
    if not getattr(bert_layer_specs, "HAVE_TE", True) and "__getattr__" in vars(bert_layer_specs):
        bert_layer_specs.bert_layer_with_transformer_engine_spec = None
        print("Transformer Engine absent: bert_layer_with_transformer_engine_spec = None (--spec local is used)")


def _t5_final_norms_without_transformer_engine() -> None:
    """Megatron-LM d98e8a6's local T5 block specs (megatron/core/models/T5/t5_spec.py) name
    ``TENorm`` as the final LayerNorm of the encoder and of the decoder; without Transformer
    Engine that name is None and both blocks silently lose their final norm. Real T5 checkpoints
    (trained with Transformer Engine installed, whatever --transformer-impl says) have
    ``encoder.final_layernorm`` and ``decoder.final_layernorm``, so without Transformer Engine
    the spec gets the module's own local norm (``LNImpl``: apex's FusedLayerNorm or Megatron's
    WrappedTorchNorm, a torch LayerNorm with the same weight and bias)."""
    from megatron.core.models.T5 import t5_spec
    if getattr(t5_spec, "TENorm", True) is None:
        t5_spec.TENorm = t5_spec.LNImpl
        print(f"Transformer Engine absent: T5 final norms built as {t5_spec.LNImpl.__name__}")


def has_argument_parsing_of_its_own() -> bool:
    """Megatron-LM d98e8a6 parses arguments before ``pretrain`` (``parse_and_validate_args``) and
    passes a config container; the 2024 versions parse inside ``pretrain``/``initialize_megatron``."""
    from megatron.training import arguments
    return hasattr(arguments, "parse_and_validate_args")


def bert_sample(rng: numpy.random.RandomState, seq_length: int, vocab: int) -> dict:
    """One BERT sample as BERTMaskedWordPieceDataset.__getitem__ returns it: two segments
    (types 0 then 1), about 15% of the real positions predicted (loss_mask 1; labels hold the
    original ids there, text holds a random id), an optional padded tail (text 0, padding_mask 0)
    and is_random, the sentence-order target of the binary head."""
    length = seq_length - int(rng.randint(0, seq_length // 4))
    labels = rng.randint(1, vocab, size=seq_length).astype(numpy.int64)
    text = labels.copy()
    split = int(rng.randint(2, length - 1))
    types = (numpy.arange(seq_length) >= split).astype(numpy.int64)
    padding_mask = (numpy.arange(seq_length) < length).astype(numpy.int64)
    loss_mask = ((rng.rand(seq_length) < 0.15) & (padding_mask == 1)).astype(numpy.int64)
    text[loss_mask == 1] = rng.randint(1, vocab, size=int(loss_mask.sum()))
    text[padding_mask == 0] = 0
    types[padding_mask == 0] = 0
    labels[padding_mask == 0] = 0
    return {"text": text, "types": types, "labels": labels, "is_random": numpy.int64(rng.randint(2)),
            "loss_mask": loss_mask, "padding_mask": padding_mask, "truncated": numpy.int64(0)}


def t5_sample(rng: numpy.random.RandomState, encoder_length: int, decoder_length: int, vocab: int) -> dict:
    """One T5 sample as T5MaskedWordPieceDataset.__getitem__ returns it: encoder and decoder ids
    with padded tails (id 0, mask 0), labels = the decoder ids shifted left, loss on real positions."""
    def padded(length: int, real: int) -> numpy.ndarray:
        ids = rng.randint(1, vocab, size=length).astype(numpy.int64)
        ids[real:] = 0
        return ids
    encoder_real = encoder_length - int(rng.randint(0, encoder_length // 4))
    decoder_real = decoder_length - int(rng.randint(0, decoder_length // 4))
    text_enc = padded(encoder_length, encoder_real)
    text_dec = padded(decoder_length, decoder_real)
    labels = numpy.concatenate([text_dec[1:], rng.randint(1, vocab, size=1)]).astype(numpy.int64)
    labels[decoder_real:] = 0
    loss_mask = (numpy.arange(decoder_length) < decoder_real).astype(numpy.int64)
    return {"text_enc": text_enc, "text_dec": text_dec, "labels": labels, "loss_mask": loss_mask,
            "truncated": numpy.int64(0), "enc_mask": (text_enc > 0).astype(numpy.int64),
            "dec_mask": (text_dec > 0).astype(numpy.int64)}


class MockEncoderDataset(torch.utils.data.Dataset):
    """NUM_SAMPLES random samples of MODEL, sample i drawn from RandomState(seed + i), so every
    data-parallel rank and every run sees the same sample for the same index."""

    def __init__(self, model: str, num_samples: int, seed: int, vocab: int, seq_length: int,
                 decoder_seq_length: int | None = None):
        self.model, self.num_samples, self.seed, self.vocab = model, num_samples, seed, vocab
        self.seq_length, self.decoder_seq_length = seq_length, decoder_seq_length

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        rng = numpy.random.RandomState((self.seed + index) % 2**32)
        if self.model == "bert":
            return bert_sample(rng, self.seq_length, self.vocab)
        return t5_sample(rng, self.seq_length, self.decoder_seq_length, self.vocab)


def fixed_inputs(model: str, vocab: int = 1000) -> dict:
    """The inputs whose logits each fixture records (torch.manual_seed(0)), batch 2.

    bert: ``tokens`` [2, 32] ids in 1..vocab-1; ``types`` [2, 32] (sample 0: 12 zeros then ones;
    sample 1: 20 zeros then ones); ``padding_mask`` [2, 32] (1 = real token: sample 0 all real,
    sample 1 real in positions 0..23, its last 8 positions padding, their ids set to 0).
    t5: ``encoder_tokens`` [2, 32], ``decoder_tokens`` [2, 16], ids in 1..vocab-1, except sample 1's
    last 6 encoder and last 4 decoder positions, which are padding (id 0).
    """
    generator = torch.Generator().manual_seed(0)
    if model == "bert":
        tokens = torch.randint(1, vocab, (2, 32), generator=generator)
        types = torch.zeros(2, 32, dtype=torch.long)
        types[0, 12:] = 1
        types[1, 20:] = 1
        padding_mask = torch.ones(2, 32, dtype=torch.long)
        padding_mask[1, 24:] = 0
        tokens[1, 24:] = 0
        types[1, 24:] = 0
        return {"tokens": tokens, "types": types, "padding_mask": padding_mask}
    encoder_tokens = torch.randint(1, vocab, (2, 32), generator=generator)
    decoder_tokens = torch.randint(1, vocab, (2, 16), generator=generator)
    encoder_tokens[1, 26:] = 0
    decoder_tokens[1, 12:] = 0
    return {"encoder_tokens": encoder_tokens, "decoder_tokens": decoder_tokens}
