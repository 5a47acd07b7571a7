"""HF -> Megatron -> HF is bit-identical at every TP/PP that divides the model; resharding
changes nothing; logits survive. Property tests over random small models."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ckptkit.convert import hf_to_megatron, megatron_to_hf, reshard
from ckptkit.errors import BadInput
from ckptkit.layouts import open_checkpoint
from ckptkit.verification import verify

from conftest import assert_same_state, hf_logits, hf_state, make_hf_model

SIZES = [1, 2, 4]
GRID = list(itertools.product(SIZES, SIZES))
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _fresh(tmp_path_factory, name):
    return tmp_path_factory.mktemp(name)


@st.composite
def gpt2_configs(draw):
    heads = draw(st.sampled_from([4, 8]))
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(n_layer=draw(st.sampled_from([2, 4])), n_head=heads, n_embd=heads * head_dim,
                n_inner=draw(st.sampled_from([16, 32, 48])), vocab_size=draw(st.integers(20, 300)),
                n_positions=draw(st.sampled_from([16, 32])),
                activation_function=draw(st.sampled_from(["gelu", "gelu_new"])))


@st.composite
def llama_configs(draw):
    groups = draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2, 4]))  # GQA: groups = 1 (MQA), = heads (MHA), between
    head_dim = draw(st.sampled_from([4, 8]))
    return dict(num_hidden_layers=draw(st.sampled_from([2, 4])), num_attention_heads=heads,
                num_key_value_heads=groups, head_dim=head_dim, hidden_size=draw(st.sampled_from([16, 32])),
                intermediate_size=draw(st.sampled_from([16, 24, 48])), vocab_size=draw(st.integers(20, 300)),
                tie_word_embeddings=draw(st.booleans()),
                rope_theta=draw(st.sampled_from([10000.0, 500000.0])))


def _divides(spec, tp, pp):
    return (spec.num_attention_heads % tp == 0 and spec.num_query_groups % tp == 0
            and spec.ffn_hidden_size % tp == 0 and spec.num_layers % pp == 0)


def _roundtrip_every_layout(hf_dir, tmp, naming="mcore-local", divisible_by=8):
    original = hf_state(hf_dir)
    with open_checkpoint(hf_dir) as reader:
        spec = reader.spec
    tried = 0
    for tp, pp in GRID:
        if not _divides(spec, tp, pp):
            with pytest.raises(BadInput):
                hf_to_megatron(hf_dir, tmp / f"refused_{tp}_{pp}", tp=tp, pp=pp)
            assert not (tmp / f"refused_{tp}_{pp}").exists()
            continue
        megatron = tmp / f"megatron_{tp}_{pp}"
        hf_to_megatron(hf_dir, megatron, tp=tp, pp=pp, naming=naming, make_vocab_size_divisible_by=divisible_by)
        back = tmp / f"hf_{tp}_{pp}"
        megatron_to_hf(megatron, back)
        assert_same_state(original, hf_state(back))
        tried += 1
    assert tried >= 1


@given(config=gpt2_configs())
@PROPERTY_SETTINGS
def test_gpt2_hf_to_megatron_to_hf_is_bit_identical_at_every_dividing_tp_pp(config, tmp_path_factory):
    tmp = _fresh(tmp_path_factory, "gpt2")
    hf_dir = make_hf_model(tmp / "hf", "gpt2", **config)
    _roundtrip_every_layout(hf_dir, tmp)


@given(config=llama_configs())
@PROPERTY_SETTINGS
def test_llama_gqa_hf_to_megatron_to_hf_is_bit_identical_at_every_dividing_tp_pp(config, tmp_path_factory):
    tmp = _fresh(tmp_path_factory, "llama")
    hf_dir = make_hf_model(tmp / "hf", "llama", **config)
    _roundtrip_every_layout(hf_dir, tmp)


@pytest.mark.parametrize("naming", ["legacy", "mcore-te"])
def test_other_namings_round_trip_bit_identically(naming, tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "gpt2", n_layer=4)
    _roundtrip_every_layout(hf_dir, tmp_path, naming=naming)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_round_trip_bit_identically(family, tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", family)
    _roundtrip_every_layout(hf_dir, tmp_path)


def test_bf16_model_round_trips_bit_identically(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "llama", dtype=torch.bfloat16)
    _roundtrip_every_layout(hf_dir, tmp_path)


@given(config=gpt2_configs(), layout_a=st.sampled_from(GRID), layout_b=st.sampled_from(GRID))
@PROPERTY_SETTINGS
def test_reshard_a_to_b_then_hf_equals_a_to_hf_and_logits_match(config, layout_a, layout_b, tmp_path_factory):
    tmp = _fresh(tmp_path_factory, "reshard")
    hf_dir = make_hf_model(tmp / "hf", "gpt2", **config)
    with open_checkpoint(hf_dir) as reader:
        spec = reader.spec
    assume(_divides(spec, *layout_a) and _divides(spec, *layout_b))
    hf_to_megatron(hf_dir, tmp / "a", tp=layout_a[0], pp=layout_a[1], make_vocab_size_divisible_by=8)
    reshard(tmp / "a", tmp / "b", tp=layout_b[0], pp=layout_b[1])
    megatron_to_hf(tmp / "a", tmp / "hf_a")
    megatron_to_hf(tmp / "b", tmp / "hf_b")
    assert_same_state(hf_state(tmp / "hf_a"), hf_state(tmp / "hf_b"))
    assert verify(tmp / "a", tmp / "b").equivalent
    tokens = torch.randint(0, config["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(hf_dir, tokens), hf_logits(tmp / "hf_b", tokens))


def test_reshard_changes_vocab_padding_but_not_the_vocabulary(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "gpt2", vocab_size=100)
    hf_to_megatron(hf_dir, tmp_path / "tp1", tp=1, pp=1, make_vocab_size_divisible_by=128)
    reshard(tmp_path / "tp1", tmp_path / "tp4", tp=4, pp=1)
    with open_checkpoint(tmp_path / "tp1") as tp1, open_checkpoint(tmp_path / "tp4") as tp4:
        assert tp1.meta.padded_vocab_size == 128 and tp4.meta.padded_vocab_size == 512
        embeddings = tp4.tensor("embedding.word_embeddings.weight")
        assert torch.count_nonzero(embeddings[100:]) == 0
    assert verify(tmp_path / "tp1", tmp_path / "tp4").equivalent


def test_dtype_conversion_is_reported_by_verify(tmp_path):
    hf_dir = make_hf_model(tmp_path / "hf", "gpt2")
    hf_to_megatron(hf_dir, tmp_path / "bf16", tp=2, pp=1, dtype="bf16")
    result = verify(hf_dir, tmp_path / "bf16")
    assert not result.equivalent and {t.status for t in result.tensors} == {"dtype"}
    assert verify(hf_dir, tmp_path / "bf16", ignore_dtype=True, atol=1e-2).equivalent
