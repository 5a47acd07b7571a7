"""Hub FP8 DeepSeek weights (float8_e4m3fn with 128 x 128 block scales, ``weight_scale_inv``)
convert to Megatron equal, bit for bit, to their exact dequantization: fp8 -> float32, times
the scale of the block, -> the target dtype. The expected values are computed here, block by
block, independently of ckptkit's dequantization."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptkit.bridges import BRIDGES
from ckptkit.convert import hf_to_megatron
from ckptkit.errors import BadInput, Unsupported
from ckptkit.layouts import open_checkpoint
from ckptkit.layouts.hf import hf_table

from conftest import make_hf_model

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
# Sizes that are not multiples of the block: every weight has partial blocks on some side.
SIZES = dict(num_hidden_layers=2, hidden_size=160, intermediate_size=200, moe_intermediate_size=144,
             q_lora_rank=136, kv_lora_rank=72, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
             n_shared_experts=1)
# The linears DeepSeek-V3's Hub checkpoint stores in fp8; embeddings, norms, the router and
# the head stay bf16 (and the expert bias float32).
QUANTIZED = ("q_a_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight", "o_proj.weight",
             "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def quantize_blocks(weight: torch.Tensor):
    """Hub-style block quantization: each 128 x 128 block scaled so its largest value is 448."""
    rows, cols = weight.shape
    scales = torch.empty(-(-rows // BLOCK), -(-cols // BLOCK))
    quantized = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = weight[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            scales[i, j] = block.abs().max().clamp(min=1e-12) / FP8_MAX
            quantized[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (block / scales[i, j]).to(
                torch.float8_e4m3fn)
    return quantized, scales


def expected_dequantization(quantized: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    """Block by block: fp8 -> float32, times the block's scale, -> ``dtype``."""
    out = torch.empty(quantized.shape, dtype=dtype)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            out[rows, cols] = (quantized[rows, cols].to(torch.float32) * scales[i, j]).to(dtype)
    return out


def make_fp8_hub_folder(tmp_path):
    """A DeepSeek-V3 folder as the Hub publishes it: fp8 linears with block scales, the rest bf16."""
    folder = make_hf_model(tmp_path / "hf", "deepseek_v3", **SIZES)
    state = load_file(folder / "model.safetensors")
    stored, expected = {}, {}
    for name, tensor in state.items():
        if name.endswith(QUANTIZED):
            quantized, scales = quantize_blocks(tensor)
            stored[name], stored[name + "_scale_inv"] = quantized, scales
            expected[name] = expected_dequantization(quantized, scales, torch.bfloat16)
        else:
            stored[name] = tensor if tensor.dtype == torch.float32 and "e_score_correction_bias" in name \
                else tensor.to(torch.bfloat16)
            expected[name] = stored[name]
    (folder / "model.safetensors").unlink()
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(torch_dtype="bfloat16", quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, expected


def megatron_as_hf(folder) -> dict:
    """Every Hugging Face tensor of a Megatron checkpoint, through the bridge's mappings."""
    with open_checkpoint(folder) as reader:
        bridge = BRIDGES[reader.spec.family]
        tensors = {}
        for canonical, (mapping, names) in hf_table(bridge, reader.spec).items():
            tensors.update(zip(names, mapping.to_hf(reader.tensor(canonical), reader.spec)))
        return tensors


@pytest.mark.parametrize("layout", [dict(format="torch", tp=2, ep=2), dict(format="torch_dist", tp=2, pp=2, ep=2)])
def test_fp8_hub_weights_convert_to_their_exact_dequantization(layout, tmp_path):
    folder, expected = make_fp8_hub_folder(tmp_path)
    assert any(tensor.dtype == torch.float8_e4m3fn for tensor in load_file(folder / "model.safetensors").values())
    hf_to_megatron(folder, tmp_path / "megatron", make_vocab_size_divisible_by=8, **layout)
    with open_checkpoint(tmp_path / "megatron") as reader:
        assert reader.meta.dtype == torch.bfloat16  # config.json's dtype, not fp8
    converted = megatron_as_hf(tmp_path / "megatron")
    assert sorted(converted) == sorted(expected)
    for name, tensor in expected.items():
        assert converted[name].dtype == tensor.dtype, name
        assert torch.equal(converted[name], tensor), name


def test_fp8_weight_without_its_block_scales_is_refused_naming_the_tensor(tmp_path):
    folder, _ = make_fp8_hub_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match="model.layers.0.self_attn.q_a_proj.weight has no .*weight_scale_inv"):
        hf_to_megatron(folder, tmp_path / "megatron")


def test_block_scales_of_the_wrong_shape_are_refused(tmp_path):
    folder, _ = make_fp8_hub_folder(tmp_path)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadInput, match=r"o_proj.weight: block scales of shape \(1, 1\); expected \(2, 1\)"):
        hf_to_megatron(folder, tmp_path / "megatron")


def test_quantization_other_than_block_fp8_is_refused(tmp_path):
    folder, _ = make_fp8_hub_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Unsupported, match="only block-scaled fp8"):
        hf_to_megatron(folder, tmp_path / "megatron")
