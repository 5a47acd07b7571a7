"""``ckptkit train`` on the command line, and the data it reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ckptkit.layouts import open_checkpoint
from ckptkit.train.command import train
from ckptkit.train.data import PackedSamples, open_samples, read_indexed_dataset, write_indexed_dataset

TINY_CONFIG = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2, "head_dim": 8,
               "ffn_hidden_size": 48, "vocab_size": 120}


@pytest.fixture
def model_json(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def invoke(*args):
    """``ckptkit train ARGS --device cpu``: these tests run on CPU processes (gloo) whatever the machine has."""
    return CliRunner().invoke(train, [str(arg) for arg in args] + ["--device", "cpu"], catch_exceptions=False)


def test_train_help_shows_an_example():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "ckptkit train --model llama --tp 2 --pp 2" in result.output
    assert "--log-json" in result.output and "--load" in result.output
    assert "--device [auto|cpu|cuda]" in result.output


def test_train_command_saves_a_megatron_checkpoint_and_logs_one_json_line_per_step(tmp_path, model_json):
    log = tmp_path / "log.jsonl"
    result = invoke("--model", "llama", "--config", model_json, "--steps", 3, "--seq-length", 16,
                    "--save", tmp_path / "run", "--log-json", log)
    assert result.exit_code == 0, result.output
    assert "saved iteration 3" in result.output
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert set(lines[0]) == {"step", "loss", "grad_norm", "lr", "tokens_per_s"}
    with open_checkpoint(tmp_path / "run") as reader:
        assert reader.spec.family == "llama" and reader.spec.num_query_groups == 2
        assert reader.meta.iteration == 3


def test_train_command_with_load_continues_to_the_total_step_count(tmp_path, model_json):
    assert invoke("--config", model_json, "--steps", 2, "--seq-length", 16, "--save", tmp_path / "a").exit_code == 0
    result = invoke("--load", tmp_path / "a", "--steps", 4, "--seq-length", 16, "--save", tmp_path / "b", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["start_iteration"], report["iteration"]) == (2, 4)
    assert [step["step"] for step in report["steps"]] == [3, 4]


def test_train_command_runs_worker_processes_for_a_parallel_layout(tmp_path, model_json):
    result = invoke("--config", model_json, "--tp", 2, "--dp", 2, "--steps", 2, "--seq-length", 16,
                    "--sequence-parallel", "--distributed-optimizer", "--save", tmp_path / "run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["layout"] == "TP2 PP1 DP2"
    with open_checkpoint(tmp_path / "run") as reader:
        assert (reader.meta.tp, reader.meta.pp) == (2, 1)


def test_train_command_refuses_a_tp_size_that_splits_query_groups(model_json):
    result = CliRunner().invoke(train, ["--config", str(model_json), "--tp", "4", "--steps", "1"])
    assert result.exit_code == 2
    assert "TP=4 does not divide 2 query groups" in result.output


def test_indexed_dataset_round_trips_megatron_mmidx_format(tmp_path):
    documents = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    write_indexed_dataset(tmp_path / "corpus_text_document", documents)
    assert (tmp_path / "corpus_text_document.idx").read_bytes()[:9] == b"MMIDIDX\x00\x00"
    tokens, lengths = read_indexed_dataset(tmp_path / "corpus_text_document")
    assert tokens.dtype == np.uint16 and tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert lengths.tolist() == [3, 2, 4]


def test_packed_samples_are_consecutive_windows_with_shifted_labels(tmp_path):
    write_indexed_dataset(tmp_path / "c", [list(range(10))])
    samples = open_samples(str(tmp_path / "c"), seq_length=4, vocab_size=16, seed=0)
    assert isinstance(samples, PackedSamples) and len(samples) == 2
    assert samples[0].tolist() == [0, 1, 2, 3, 4] and samples[1].tolist() == [4, 5, 6, 7, 8]


def test_train_command_trains_on_an_indexed_dataset(tmp_path, model_json):
    rows = np.random.default_rng(0).integers(0, 120, size=(20, 40))
    write_indexed_dataset(tmp_path / "corpus", rows.tolist())
    result = invoke("--config", model_json, "--steps", 2, "--seq-length", 16, "--data", tmp_path / "corpus", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["steps"]) == 2


def test_tokens_outside_the_vocabulary_are_reported_with_the_file(tmp_path, model_json):
    write_indexed_dataset(tmp_path / "big", [[1, 2, 500, 3] * 10])
    result = CliRunner().invoke(train, ["--config", str(model_json), "--steps", "1", "--seq-length", "8",
                                        "--data", str(tmp_path / "big")])
    assert result.exit_code == 2
    assert "token id 500" in result.output and "big" in result.output


def test_jsonl_data_is_tokenized_with_a_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "the", "cat", "sat", "on", "mat"]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "docs.jsonl").write_text('{"text": "the cat sat"}\n{"text": "on the mat"}\n')
    samples = open_samples(str(tmp_path / "docs.jsonl"), seq_length=3, vocab_size=6, seed=0,
                           tokenizer=str(tmp_path / "tokenizer"))
    assert samples.tokens.tolist() == [1, 2, 3, 0, 4, 1, 5, 0]
    assert torch.equal(samples[1], torch.tensor([0, 4, 1, 5]))
