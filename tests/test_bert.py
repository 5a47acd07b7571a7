"""Megatron BERT (BertModel, and the pre-Core model) <-> Hugging Face MegatronBertForPreTraining.

HF -> Megatron (any TP/PP, per-rank files and torch_dist) -> HF gives the same class, the same
architecture fields of config.json and bit-identical tensors; the converted model computes
the same MLM and next-sentence logits. Real Megatron-LM checkpoints: see the tests marked
with their fixture, which compare with the logits Megatron computed."""
import json

import pytest
import torch

from ckptkit.bridges import BRIDGES
from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.errors import Unsupported
from ckptkit.layouts import open_checkpoint
from ckptkit.spec import canonical_tensors

from conftest import assert_same_state, hf_state

# name -> (transformers model_type, config fields over make_bert's defaults)
BERT_CASES = {
    "bert": ("megatron-bert", {}),
    "bert-untied": ("megatron-bert", {"tie_word_embeddings": False}),
}
BERT_DEFAULTS = dict(vocab_size=101, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=32, type_vocab_size=2, layer_norm_eps=1e-5)
NOT_ARCHITECTURE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def make_bert(folder, seed: int = 0, **config):
    """A randomly initialised MegatronBertForPreTraining saved as safetensors, every parameter
    non-trivial (norm weights are ones and biases zeros at init)."""
    from transformers import MegatronBertConfig, MegatronBertForPreTraining

    torch.manual_seed(seed)
    model = MegatronBertForPreTraining(MegatronBertConfig(**{**BERT_DEFAULTS, **config}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
        if not model.config.tie_word_embeddings:
            # untied, transformers keeps cls.predictions.bias apart from the decoder's bias, which
            # alone is used; Megatron has one output bias (ckptkit writes both equal)
            model.cls.predictions.bias.copy_(model.cls.predictions.decoder.bias)
    model.save_pretrained(folder)
    return folder


def bert_logits(folder, tokens, token_types):
    """(MLM logits, next-sentence logits) of a saved MegatronBertForPreTraining."""
    from transformers import MegatronBertForPreTraining
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = MegatronBertForPreTraining.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        output = model(input_ids=tokens, token_type_ids=token_types)
    return output.prediction_logits.float(), output.seq_relationship_logits.float()


def architecture_fields(folder) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {name: value for name, value in config.items() if name not in NOT_ARCHITECTURE}


@pytest.mark.parametrize("case", sorted(BERT_CASES))
def test_bert_round_trip_through_megatron_keeps_class_config_tensors_and_logits(case, tmp_path):
    """HF -> torch_dist TP2 PP2 -> per-rank TP1 PP4 -> PP2 VPP2 -> TP4 -> HF."""
    _, fields = BERT_CASES[case]
    original = make_bert(tmp_path / "hf", **fields)
    hf_to_megatron(original, tmp_path / "dist_tp2pp2", tp=2, pp=2, format="torch_dist",
                   make_vocab_size_divisible_by=8)
    reshard(tmp_path / "dist_tp2pp2", tmp_path / "torch_tp1pp4", tp=1, pp=4, format="torch")
    reshard(tmp_path / "torch_tp1pp4", tmp_path / "torch_pp2vpp2", tp=1, pp=2, vpp=2, format="torch")
    reshard(tmp_path / "torch_pp2vpp2", tmp_path / "torch_tp4pp1", tp=4, pp=1, format="torch")
    megatron_to_hf(tmp_path / "torch_tp4pp1", tmp_path / "back")
    back = tmp_path / "back"
    assert architecture_fields(back) == architecture_fields(original)
    assert architecture_fields(back)["architectures"] == ["MegatronBertForPreTraining"]
    assert_same_state(hf_state(original), hf_state(back))
    tokens = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    token_types = (torch.arange(8) >= 4).long().expand(2, 8)
    for ours, theirs in zip(bert_logits(back, tokens, token_types), bert_logits(original, tokens, token_types)):
        assert torch.equal(ours, theirs)


def test_bert_megatron_files_hold_bertmodel_names_with_the_vocab_parallel_output_bias(tmp_path):
    hf_to_megatron(make_bert(tmp_path / "hf"), tmp_path / "megatron", tp=2, pp=2, make_vocab_size_divisible_by=8)
    last_stage = torch.load(tmp_path / "megatron/release/mp_rank_01_001/model_optim_rng.pt", weights_only=False)
    first_stage = torch.load(tmp_path / "megatron/release/mp_rank_00_000/model_optim_rng.pt", weights_only=False)
    assert "embedding.tokentype_embeddings.weight" in first_stage["model"]
    assert "encoder.layers.1.self_attention.linear_qkv.weight" in first_stage["model"]
    heads = {"encoder.final_layernorm.weight", "lm_head.dense.weight", "lm_head.layer_norm.weight",
             "output_layer.bias", "output_layer.weight", "pooler.dense.weight", "binary_head.weight"}
    assert heads <= set(last_stage["model"])
    # 101 tokens padded to 112 (a multiple of 8 x TP 2): each TP rank holds 56 entries of the bias
    assert last_stage["model"]["output_layer.bias"].shape == (56,)
    assert last_stage["args"].bert_binary_head is True


def test_bert_checkpoint_is_read_as_an_encoder_with_its_heads(tmp_path):
    hf_to_megatron(make_bert(tmp_path / "hf"), tmp_path / "megatron", tp=2, pp=1)
    with open_checkpoint(tmp_path / "megatron") as reader:
        assert (reader.spec.family, reader.spec.model_kind) == ("bert", "encoder")
        names = {tensor.name for tensor in canonical_tensors(reader.spec)}
    assert not any(name.startswith("decoder.") for name in names)
    assert {"pooler.dense.bias", "binary_head.bias", "embedding.tokentype_embeddings.weight"} <= names


def test_decoder_families_do_not_claim_a_bert_model(tmp_path):
    hf_to_megatron(make_bert(tmp_path / "hf"), tmp_path / "megatron", tp=1, pp=1)
    with open_checkpoint(tmp_path / "megatron") as reader:
        spec = reader.spec
    assert BRIDGES["gpt2"].problem(spec) == "a Megatron encoder model; GPT2LMHeadModel is a decoder model"


def test_bert_with_tanh_gelu_is_refused_because_megatron_s_head_uses_erf(tmp_path):
    with pytest.raises(Unsupported, match="erf GeLU"):
        hf_to_megatron(make_bert(tmp_path / "hf", hidden_act="gelu_new"), tmp_path / "megatron", tp=1, pp=1)


def test_bert_with_other_than_two_token_types_is_refused(tmp_path):
    with pytest.raises(Unsupported, match="type_vocab_size 3"):
        hf_to_megatron(make_bert(tmp_path / "hf", type_vocab_size=3), tmp_path / "megatron", tp=1, pp=1)


def test_a_fresh_optimizer_state_for_bert_is_refused_in_one_line(tmp_path):
    # Megatron's parameter order (ckptkit/optimizer/parameters.py) is mapped for GPTModel only
    with pytest.raises(Unsupported, match="optimizer state of a Megatron encoder model"):
        hf_to_megatron(make_bert(tmp_path / "hf"), tmp_path / "megatron", tp=1, pp=1, optimizer="fresh",
                       megatron_args="--lr 1e-4 --min-lr 1e-5")


def test_bert_written_with_pre_core_names_nests_them_as_megatron_and_comes_back_bit_identical(tmp_path):
    original = make_bert(tmp_path / "hf")
    hf_to_megatron(original, tmp_path / "legacy", tp=2, pp=2, naming="legacy", make_vocab_size_divisible_by=8)
    last_stage = torch.load(tmp_path / "legacy/release/mp_rank_01_001/model_optim_rng.pt", weights_only=False)
    model = last_stage["model"]
    assert list(model) == ["language_model", "lm_head", "binary_head", "word_embeddings_for_head"]
    assert {"dense.weight", "dense.bias"} <= set(model["language_model"]["pooler"])
    assert {"bias", "dense.weight", "norm.weight"} <= set(model["lm_head"])
    megatron_to_hf(tmp_path / "legacy", tmp_path / "back")
    assert_same_state(hf_state(original), hf_state(tmp_path / "back"))


# -- real Megatron-LM checkpoints (tools/megatron_encoder_fixtures.sh): BertModel at TP2 PP2 saved as
# torch_dist (dist/) and converted to per-rank files by Megatron (torch/), the pre-Core BERT of a
# 2024 Megatron-LM at TP2 PP2 (torch/); logits.pt holds the logits Megatron computed.

# float32 models: what separates transformers' forward from Megatron's is summation order
LOGITS_TOLERANCE = 1e-5
REAL_BERTS = {
    "core-torch_dist": ("bert_core_tp2pp2", "dist", "logits.pt"),
    "core-per-rank": ("bert_core_tp2pp2", "torch", "logits_torch.pt"),
    "pre-core-per-rank": ("bert_legacy_tp2pp2", "torch", "logits.pt"),
}


def megatron_bert_errors(hf_folder, reference: dict) -> tuple[float, float]:
    """Largest |MLM logits - Megatron's| over the real vocabulary at the tokens that are not
    padding (Megatron's mask also hides padded queries from everything; transformers' masks keys
    only), and largest |binary logits - Megatron's|."""
    from transformers import MegatronBertForPreTraining

    model = MegatronBertForPreTraining.from_pretrained(hf_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        output = model(input_ids=reference["tokens"], token_type_ids=reference["types"],
                       attention_mask=reference["padding_mask"])
    vocab = model.config.vocab_size
    real = reference["padding_mask"].bool()
    mlm = (output.prediction_logits[real] - reference["mlm_logits"][..., :vocab][real].float()).abs().max().item()
    binary = (output.seq_relationship_logits - reference["binary_logits"].float()).abs().max().item()
    return mlm, binary


@pytest.mark.parametrize("case", sorted(REAL_BERTS))
def test_real_megatron_bert_converted_to_hf_reproduces_megatron_mlm_and_binary_logits(case, tmp_path):
    from conftest import fixture_path

    fixture, checkpoint, logits = REAL_BERTS[case]
    source = fixture_path(fixture, checkpoint)
    reference = torch.load(fixture_path(fixture, logits), weights_only=True)
    assert reference["padding_mask"].min() == 0  # the inputs have padding, which the comparison skips
    megatron_to_hf(source, tmp_path / "hf")
    mlm, binary = megatron_bert_errors(tmp_path / "hf", reference)
    assert mlm < LOGITS_TOLERANCE and binary < LOGITS_TOLERANCE, (mlm, binary)


def test_real_megatron_bert_is_read_with_its_heads_and_two_token_types():
    from conftest import fixture_path

    for fixture, checkpoint, _ in REAL_BERTS.values():
        with open_checkpoint(fixture_path(fixture, checkpoint)) as reader:
            spec = reader.spec
            assert (spec.family, spec.model_kind, spec.num_tokentypes, spec.binary_head) == ("bert", "encoder", 2, True)
            assert reader.validate() == [] or all("differ" not in note for note in reader.validate())


def test_real_megatron_bert_per_rank_files_reshard_to_megatron_s_own_keys_and_values(tmp_path):
    """Megatron's torch_dist checkpoint written by ckptkit as per-rank files at TP2 PP2 equals the
    files Megatron converted it to, key for key and bit for bit."""
    from conftest import assert_same_rank_model, fixture_path

    reshard(fixture_path("bert_core_tp2pp2", "dist"), tmp_path / "torch", tp=2, pp=2, format="torch")
    theirs = sorted(fixture_path("bert_core_tp2pp2", "torch").glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    assert len(theirs) == 4
    for real in theirs:
        ours = tmp_path / "torch" / real.relative_to(fixture_path("bert_core_tp2pp2", "torch"))
        assert_same_rank_model(ours, real)


def test_real_megatron_bert_torch_dist_written_by_ckptkit_has_megatron_s_keys_shapes_and_chunks(tmp_path):
    from conftest import byte_keys, fixture_path, tensor_layout

    reshard(fixture_path("bert_core_tp2pp2", "torch"), tmp_path / "dist", tp=2, pp=2, format="torch_dist")
    ours = next((tmp_path / "dist").glob("iter_*"))
    theirs = next(fixture_path("bert_core_tp2pp2", "dist").glob("iter_*"))
    assert tensor_layout(ours) == tensor_layout(theirs)
    extra_states = {key for key in byte_keys(theirs) if "_extra_state" in key}
    assert {key for key in byte_keys(ours) if "_extra_state" in key} == extra_states


def test_real_megatron_bert_through_hf_and_back_reshards_to_every_layout_bit_for_bit(tmp_path):
    """Megatron's BERT -> HF -> Megatron TP1 PP4 -> TP4 PP1 torch_dist -> HF: the same tensors."""
    from conftest import fixture_path

    megatron_to_hf(fixture_path("bert_core_tp2pp2", "torch"), tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "tp1pp4", tp=1, pp=4)
    reshard(tmp_path / "tp1pp4", tmp_path / "tp4", tp=4, pp=1, format="torch_dist")
    megatron_to_hf(tmp_path / "tp4", tmp_path / "back")
    assert_same_state(hf_state(tmp_path / "hf"), hf_state(tmp_path / "back"))
    assert json.loads((tmp_path / "back/config.json").read_text()) == \
        json.loads((tmp_path / "hf/config.json").read_text())


def older_pre_core_spellings(model: dict) -> dict:
    """A pre-Core BERT's ``model`` as Megatron-LM before 2024 named it (NGC's megatron-bert
    checkpoints): ``transformer`` for the encoder, ``attention`` for ``self_attention``,
    ``*_layernorm`` for ``*_norm``, ``lm_head.layernorm`` for ``lm_head.norm``."""
    renames = ((".self_attention.", ".attention."), (".input_norm.", ".input_layernorm."),
               (".post_attention_norm.", ".post_attention_layernorm."))
    encoder = {}
    for key, value in model["language_model"].pop("encoder").items():
        for old, new in renames:
            key = key.replace(old, new)
        encoder["final_layernorm." + key[len("final_norm."):] if key.startswith("final_norm.") else key] = value
    model["language_model"]["transformer"] = encoder
    if "lm_head" in model:
        model["lm_head"] = {key.replace("norm.", "layernorm.") if key.startswith("norm.") else key: value
                            for key, value in model["lm_head"].items()}
    return model


def test_pre_core_bert_with_older_spellings_reads_as_the_same_model(tmp_path):
    original = make_bert(tmp_path / "hf")
    hf_to_megatron(original, tmp_path / "legacy", tp=2, pp=2, naming="legacy", make_vocab_size_divisible_by=8)
    for path in (tmp_path / "legacy").glob("release/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        state["model"] = older_pre_core_spellings(state["model"])
        torch.save(state, path)
    last = torch.load(tmp_path / "legacy/release/mp_rank_00_001/model_optim_rng.pt", weights_only=False)["model"]
    assert "final_layernorm.weight" in last["language_model"]["transformer"] and "layernorm.weight" in last["lm_head"]
    megatron_to_hf(tmp_path / "legacy", tmp_path / "back")
    assert_same_state(hf_state(original), hf_state(tmp_path / "back"))


def test_a_bert_model_card_loads_it_with_auto_model_for_pretraining_and_claims_no_text_generation():
    from ckptkit.model_card import build_model_card

    card = build_model_card({"architecture": "MegatronBertForPreTraining", "family": "bert"})
    assert 'AutoModelForPreTraining.from_pretrained("OWNER/NAME")' in card.text
    assert card.data.pipeline_tag is None


def test_bert_without_binary_head_reshards_but_is_refused_for_hugging_face(tmp_path):
    """--bert-no-binary-head: no token types, pooler or binary head, which MegatronBertForPreTraining
    always has."""
    from dataclasses import replace

    from ckptkit.layouts.megatron_common import TargetLayout
    from ckptkit.layouts.megatron_legacy.write import write as write_rank_files

    from conftest import RandomReader

    hf_to_megatron(make_bert(tmp_path / "hf"), tmp_path / "with_head", tp=1, pp=1)
    with open_checkpoint(tmp_path / "with_head") as reader:
        spec = replace(reader.spec, binary_head=False, num_tokentypes=0)
    write_rank_files(RandomReader(spec), tmp_path / "bert", TargetLayout(tp=2, pp=2, make_vocab_size_divisible_by=8))
    reshard(tmp_path / "bert", tmp_path / "tp1", tp=1, pp=4, make_vocab_size_divisible_by=8)
    with open_checkpoint(tmp_path / "tp1") as reader:
        assert (reader.spec.model_kind, reader.spec.binary_head, reader.spec.num_tokentypes) == ("encoder", False, 0)
        assert not any(tensor.name.startswith(("pooler.", "binary_head.")) for tensor in reader.canonical())
    with pytest.raises(Unsupported, match="no binary head"):
        megatron_to_hf(tmp_path / "tp1", tmp_path / "hf_out")
