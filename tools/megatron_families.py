"""Inputs and comparison for tools/megatron_check_families.sh: real Megatron-LM loads what
ckptkit writes for Qwen3, Llama 3.1, Mistral (sliding window) and Phi-3.

    python3 tools/megatron_families.py prepare .devdata/check     # here, on the CPU
    bash tools/megatron_check_families.sh                          # on a GPU, with Megatron-LM
    python3 tools/megatron_families.py compare .devdata/check RESULTS_DIR

``prepare`` makes, under DIR:

- ``qwen3`` / ``llama31``: the real Megatron fixtures (tests/fixtures/*_tp2/dist, TP2)
  -> ``ckptkit megatron-to-hf`` -> ``ckptkit hf-to-megatron --tp 1 --pp 1`` in both formats
  (``NAME_torch``, ``NAME_dist``); the reference is the logits Megatron itself computed
  from the fixture (``logits.pt``), tokens from the same file.
- ``mistral`` / ``phi3``: a random float32 transformers model (every parameter perturbed as
  tests/conftest.py ``make_hf_model`` does) -> ``hf-to-megatron`` TP1 in both formats; the
  reference is the transformers (eager attention) logits for ``randint(0, 1000, (2, 32))``
  under ``manual_seed(0)``. Mistral has ``sliding_window`` 8, so the window matters at 32
  tokens.

Each case gets ``NAME_tokens.pt`` ({"tokens"}) and ``NAME_reference.pt`` ({"tokens",
"logits", "vocab", "source"}). ``compare`` reads ``RUN_logits.pt`` files written by
tools/megatron_logits.py and prints max / mean |Megatron - reference| over the real vocabulary.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from megatron_compare import VOCAB, ckptkit, logits_row, main, print_rows

REPO = Path(__file__).resolve().parent.parent
SIZES = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=256, max_position_embeddings=64, vocab_size=VOCAB,
             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
RANDOM_MODELS = {
    "mistral": dict(SIZES, head_dim=16, sliding_window=8),
    "phi3": dict(SIZES, original_max_position_embeddings=64, pad_token_id=None, sliding_window=None),
}
# Megatron runs of the check: run name -> (case, checkpoint folder under DIR).
RUNS = {
    "qwen3_torch": "qwen3", "qwen3_dist": "qwen3",
    "llama31_torch": "llama31", "llama31_dist": "llama31",
    "mistral_torch": "mistral", "mistral_dist": "mistral", "mistral_nowindow": "mistral",
    "phi3_torch": "phi3", "phi3_dist": "phi3",
}


def to_megatron(hf: Path, out: Path, name: str) -> None:
    for fmt, suffix in (("torch", "torch"), ("torch_dist", "dist")):
        ckptkit("hf-to-megatron", str(hf), str(out / f"{name}_{suffix}"), "--tp", "1", "--pp", "1",
                "--format", fmt, "--overwrite")


def random_model(family: str, folder: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **RANDOM_MODELS[family]))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.float().save_pretrained(folder)


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("qwen3", "llama31"):
        fixture = REPO / "tests" / "fixtures" / f"{name}_tp2"
        hf = out / f"{name}_hf"
        ckptkit("megatron-to-hf", str(fixture / "dist"), str(hf), "--overwrite")
        to_megatron(hf, out, name)
        reference = torch.load(fixture / "logits.pt", weights_only=False)
        torch.save({"tokens": reference["tokens"]}, out / f"{name}_tokens.pt")
        torch.save({"tokens": reference["tokens"], "logits": reference["logits"].float(),
                    "vocab": reference["vocab"], "source": f"Megatron-LM on {fixture.name}/dist"},
                   out / f"{name}_reference.pt")
        # The HF model ckptkit wrote must itself reproduce Megatron (checked here, on the CPU).
        ours = hf_logits(hf, reference["tokens"])[..., :VOCAB]
        print(f"{name}: HF (ckptkit) vs Megatron fixture max abs "
              f"{(ours - reference['logits'][..., :VOCAB]).abs().max().item():.3g}")
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 32))
    for family in RANDOM_MODELS:
        hf = out / f"{family}_hf"
        shutil.rmtree(hf, ignore_errors=True)
        random_model(family, hf)
        to_megatron(hf, out, family)
        torch.save({"tokens": tokens}, out / f"{family}_tokens.pt")
        torch.save({"tokens": tokens, "logits": hf_logits(hf, tokens), "vocab": VOCAB,
                    "source": f"transformers {family} (eager attention)"}, out / f"{family}_reference.pt")
    if "mistral" in RANDOM_MODELS:
        # What the window changes on the HF side: the same model with sliding_window None.
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(out / "mistral_hf", attn_implementation="eager").eval()
        model.config.sliding_window = None
        with torch.no_grad():
            full = model(tokens).logits.float()
        windowed = torch.load(out / "mistral_reference.pt", weights_only=True)["logits"]
        print(f"mistral: HF with vs without its window max abs {(full - windowed).abs().max().item():.3g}")
    for path in (out / f"{name}_hf" for name in ("qwen3", "llama31", *RANDOM_MODELS)):
        print(path.name, json.loads((path / "config.json").read_text()).get("architectures"))


def compare(out: Path, results: Path) -> list[dict]:
    rows = []
    for run, case in RUNS.items():
        reference = torch.load(out / f"{case}_reference.pt", weights_only=False)
        row = logits_row(results, run, reference)
        rows.append({"run": run, **row} if "error" in row else {"run": run, "reference": reference["source"], **row})
    print_rows(rows, 18, lambda row: f"vs {row['reference']}")
    return rows


if __name__ == "__main__":
    main(__doc__.splitlines()[0], prepare, compare)
