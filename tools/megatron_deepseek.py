"""Inputs and comparison for tools/megatron_deepseek_check.sh: real Megatron-LM loads the
DeepSeek checkpoints ckptkit writes from Hugging Face models and computes their logits.

    python3 tools/megatron_deepseek.py prepare .devdata/dscheck     # here, on the CPU
    bash tools/megatron_deepseek_check.sh                            # on 2 GPUs, with Megatron-LM
    python3 tools/megatron_deepseek.py compare .devdata/dscheck RESULTS

``prepare`` makes, under DIR, two random transformers models with the sizes of the DeepSeek
fixtures (tools/megatron_deepseek_flags.sh; no multi-token prediction layer), their logits
for the fixtures' tokens (float32, eager attention) and ckptkit's Megatron checkpoints:

- ``v3_torch_tp2``: DeepseekV3ForCausalLM (MLA with q_lora_rank, YaRN factor 4, sigmoid
  routing with a random expert bias, 2 of 4 groups, top-4 of 8, scaling 2.5, shared expert,
  layer 0 dense) -> ``hf-to-megatron --tp 2`` (per-rank), loaded at TP2 on 2 GPUs: MLA's down
  projections cut over TP as Megatron's local spec cuts them.
- ``v3_dist_ep2``: the same model -> ``hf-to-megatron --ep 2 --format torch_dist``, loaded at
  TP2 EP1 (another layout than written) with ``--dist-ckpt-strictness raise_all``.
- ``v2_torch_ep2``: DeepseekV2ForCausalLM (softmax, top-2 of 4 greedy, scaling 1.5) ->
  ``hf-to-megatron --ep 2`` (per-rank), loaded at EP2.
- ``v3mtp_dist_ep2`` and ``v3mtp_torch_tp2``: the DeepseekV3 model with one multi-token
  prediction layer added in the Hub's layout (:func:`add_mtp_layer`), as torch_dist at EP2
  (loaded at TP2) and per-rank at TP2, loaded with ``--mtp-num-layers 1``: the main logits are
  transformers', and Megatron's MTP logits are kept for tests/test_deepseek.py.

``compare`` reads ``RUN_logits.pt`` (tools/megatron_deepseek_logits.py) and prints max / mean
|Megatron - transformers| over the 1000 real vocabulary columns.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from megatron_compare import ckptkit, logits_row, main, print_rows

# Sizes of tools/megatron_deepseek_flags.sh (COMMON with V3 or V2) in transformers' words.
COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
              q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              intermediate_size=128, first_k_dense_replace=1, rms_norm_eps=1e-6, max_position_embeddings=64,
              vocab_size=1000, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
MODELS = {
    "v3": ("deepseek_v3", dict(COMMON, n_routed_experts=8, moe_intermediate_size=16, num_experts_per_tok=4,
                               n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=2,
                               num_nextn_predict_layers=0, rope_scaling={
                                   "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
                                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})),
    "v2": ("deepseek_v2", dict(COMMON, n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2,
                               topk_method="greedy", routed_scaling_factor=1.5, n_shared_experts=2)),
}
# run -> (model, hf-to-megatron options, how Megatron loads it)
RUNS = {
    "v3mtp_dist_ep2": ("v3mtp", ["--tp", "1", "--pp", "1", "--ep", "2", "--format", "torch_dist"],
                       "with an MTP layer: torch_dist written at EP2, loaded at TP2 EP1"),
    "v3mtp_torch_tp2": ("v3mtp", ["--tp", "2", "--pp", "1"], "with an MTP layer: per-rank TP2, loaded at TP2"),
    "v3_torch_tp2": ("v3", ["--tp", "2", "--pp", "1"], "per-rank TP2, loaded at TP2"),
    "v3_dist_ep2": ("v3", ["--tp", "1", "--pp", "1", "--ep", "2", "--format", "torch_dist"],
                    "torch_dist written at EP2, loaded at TP2 EP1"),
    "v2_torch_ep2": ("v2", ["--tp", "1", "--pp", "1", "--ep", "2"], "per-rank EP2, loaded at EP2"),
    # made from a fresh Megatron fixture on the device (see the call script), not by prepare
    "v3mtp_fixture_tp2": (None, [],
                          "Megatron's deepseek_v3_tp1ep2 resharded by ckptkit to per-rank TP2, loaded at TP2"),
}



def make_model(folder: Path, model_type: str, fields: dict) -> torch.Tensor:
    """A random transformers model with every weight and the expert bias non-trivial; returns its
    logits for the fixtures' tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), attn_implementation="eager")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    with torch.no_grad():
        return model.eval()(tokens()).logits.float()


def add_mtp_layer(folder: Path) -> None:
    """One multi-token prediction layer in the Hub's layout beside the model transformers saved:
    ``model.layers.{N}.*`` shaped as the last layer (random), enorm, hnorm, eh_proj,
    shared_head.norm, and copies of the embedding and head."""
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    last, mtp = config["num_hidden_layers"] - 1, config["num_hidden_layers"]
    state = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(1)
    hidden = config["hidden_size"]
    added = {name.replace(f"model.layers.{last}.", f"model.layers.{mtp}."):
             (torch.randn(tensor.shape, generator=generator) * (0.05 if tensor.dim() == 1 else 0.02)
              + (1.0 if name.endswith("layernorm.weight") else 0.0)).to(tensor.dtype)
             for name, tensor in state.items() if name.startswith(f"model.layers.{last}.")}
    added.update({
        f"model.layers.{mtp}.enorm.weight": 1 + torch.randn(hidden, generator=generator) * 0.02,
        f"model.layers.{mtp}.hnorm.weight": 1 + torch.randn(hidden, generator=generator) * 0.02,
        f"model.layers.{mtp}.eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=generator) * 0.02,
        f"model.layers.{mtp}.shared_head.norm.weight": 1 + torch.randn(hidden, generator=generator) * 0.02,
        f"model.layers.{mtp}.embed_tokens.weight": state["model.embed_tokens.weight"].clone(),
        f"model.layers.{mtp}.shared_head.head.weight": state["lm_head.weight"].clone(),
    })
    save_file({**state, **added}, folder / "model.safetensors", metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def tokens() -> torch.Tensor:
    """The fixtures' tokens (tools/make_megatron_deepseek_fixture.sh)."""
    torch.manual_seed(0)
    return torch.randint(0, 1000, (2, 32))


def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    references = {name: make_model(out / f"{name}_hf", model_type, fields)
                  for name, (model_type, fields) in MODELS.items()}
    shutil.copytree(out / "v3_hf", out / "v3mtp_hf", dirs_exist_ok=True)
    add_mtp_layer(out / "v3mtp_hf")
    references["v3mtp"] = references["v3"]  # transformers computes no MTP head: the main logits
    from megatron_deepseek_mtp import mtp_logits  # Megatron's MTP head with transformers' modules

    mtp_reference = mtp_logits(out / "v3mtp_hf", tokens())
    for run, (model, options, _) in RUNS.items():
        if model is None:
            continue
        ckptkit("hf-to-megatron", str(out / f"{model}_hf"), str(out / run), *options, "--overwrite")
        torch.save({"tokens": tokens()}, out / f"{run}_tokens.pt")
        reference = {"tokens": tokens(), "logits": references[model], "vocab": 1000}
        if model == "v3mtp":
            reference["mtp_logits"] = mtp_reference[None]
        torch.save(reference, out / f"{run}_reference.pt")
        print(run, sorted(str(p.relative_to(out)) for p in (out / run).rglob("*") if p.is_file()))


def compare(out: Path, results: Path) -> list[dict]:
    rows = []
    for run, (_, _, how) in RUNS.items():
        if not (out / f"{run}_reference.pt").exists() or not (results / f"{run}.log").exists():
            continue
        reference = torch.load(out / f"{run}_reference.pt", weights_only=True)
        text = (results / f"{run}.log").read_text(errors="replace")
        rows.append({"run": run, "how": how, "load_return": "load_return" in text,
                     **logits_row(results, run, reference)})
        ours = results / f"{run}_logits.pt"
        if "mtp_logits" in reference and ours.exists():
            megatron = torch.load(ours, weights_only=True).get("mtp_logits")
            diff = None if megatron is None else \
                (megatron[..., :1000].float() - reference["mtp_logits"][..., :1000].float()).abs()
            rows.append({"run": run + " (MTP head)", "how": how, "load_return": False,
                         **({"error": "no MTP logits"} if diff is None else
                            {"shape": list(megatron.shape), "max_abs": diff.max().item(),
                             "mean_abs": diff.mean().item()})})
    print_rows(rows, 14, lambda row: f"load_return {'PRESENT' if row['load_return'] else 'absent'}  "
                                     f"vs transformers ({row['how']})")
    return rows


if __name__ == "__main__":
    main(__doc__.splitlines()[0], lambda out: prepare(out.resolve()), compare)
