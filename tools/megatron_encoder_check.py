"""Inputs and comparison for tools/megatron_encoder_check.sh: real Megatron-LM loads the BERT
and T5 checkpoints ckptkit writes from the real fixtures and computes the same logits.

    python3 tools/megatron_encoder_check.py prepare DIR          # ckptkit conversions (CPU)
    bash tools/megatron_encoder_check.sh                          # Megatron-LM on 4 GPUs
    python3 tools/megatron_encoder_check.py compare DIR RESULTS   # the table

``prepare`` writes one checkpoint per case under DIR (the CASES table below), a
``DIR/cases.txt`` line per case for the shell script (name, model, Megatron tree, format, TP, PP,
Megatron-side flags), and, for the cases that go through Hugging Face, ``DIR/NAME_hf_logits.pt``:
the logits transformers' own MegatronBertForPreTraining computes from ckptkit's HF export for the
fixture's inputs. ``compare`` reads RESULTS/NAME_logits.pt (tools/megatron_encoder_logits.py)
and prints, per case, max |Megatron(ckptkit's output) - Megatron(fixture)| over the real
vocabulary (first ``vocab`` columns): BERT's MLM logits over all positions and over the real
ones (padding_mask 1; Megatron masks padded query rows entirely, transformers does not, so HF
figures are over real positions only), BERT's binary-head logits, T5's decoder logits.

ckptkit runs as ``ckptkit.cli:main`` from ``CKPTKIT_PATH`` when set, else the installed package.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron_compare import ckptkit, main

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"


@dataclass(frozen=True)
class Case:
    """One checkpoint ckptkit writes and Megatron loads.

    steps: ckptkit commands, each a tuple of arguments where "{src}" is the fixture folder and
    "{out}"/"{hf}" this case's output / HF folder. tree: "current" (Megatron-LM d98e8a6) or
    "2024" (fd5cfec0ba, the pre-Core BERT). naming: the Megatron model the names are for
    ("core" BertModel/T5Model or "legacy")."""
    fixture: str
    model: str
    steps: tuple
    fmt: str
    tp: int
    pp: int
    tree: str = "current"
    naming: str = "core"
    hf: bool = False


CASES = {
    "bert_dist_to_tp1pp1_torch": Case(
        "bert_core_tp2pp2", "bert", (("reshard", "{src}/dist", "{out}", "--format", "torch", "--tp", "1", "--pp", "1"),),
        "torch", 1, 1),
    "bert_torch_to_tp1pp4_torch": Case(
        "bert_core_tp2pp2", "bert", (("reshard", "{src}/torch", "{out}", "--tp", "1", "--pp", "4", "--no-optimizer"),),
        "torch", 1, 4),
    "bert_torch_to_tp4pp1_dist": Case(
        "bert_core_tp2pp2", "bert",
        (("reshard", "{src}/torch", "{out}", "--format", "torch_dist", "--tp", "4", "--pp", "1", "--no-optimizer"),),
        "torch_dist", 4, 1),
    "bert_hf_to_tp2pp2_torch": Case(
        "bert_core_tp2pp2", "bert",
        (("megatron-to-hf", "{src}/dist", "{hf}"), ("hf-to-megatron", "{hf}", "{out}", "--tp", "2", "--pp", "2")),
        "torch", 2, 2, hf=True),
    "bert_hf_to_tp2pp1_dist": Case(
        "bert_core_tp2pp2", "bert",
        (("megatron-to-hf", "{src}/torch", "{hf}"),
         ("hf-to-megatron", "{hf}", "{out}", "--tp", "2", "--pp", "1", "--format", "torch_dist")),
        "torch_dist", 2, 1, hf=True),
    "t5_dist_to_tp1_torch": Case(
        "t5_tp2", "t5", (("reshard", "{src}/dist", "{out}", "--format", "torch", "--tp", "1", "--pp", "1"),),
        "torch", 1, 1),
    "t5_torch_to_tp4_torch": Case(
        "t5_tp2", "t5", (("reshard", "{src}/torch", "{out}", "--tp", "4", "--pp", "1", "--no-optimizer"),),
        "torch", 4, 1),
    "t5_torch_to_tp1_dist": Case(
        "t5_tp2", "t5",
        (("reshard", "{src}/torch", "{out}", "--format", "torch_dist", "--tp", "1", "--pp", "1", "--no-optimizer"),),
        "torch_dist", 1, 1),
    "t5_dist_to_tp2_torch": Case(
        "t5_tp2", "t5", (("reshard", "{src}/dist", "{out}", "--format", "torch", "--tp", "2", "--pp", "1"),),
        "torch", 2, 1),
    "legacy_to_tp1pp1_legacy": Case(
        "bert_legacy_tp2pp2", "bert", (("reshard", "{src}/torch", "{out}", "--tp", "1", "--pp", "1", "--no-optimizer"),),
        "torch", 1, 1, tree="2024", naming="legacy"),
    "legacy_to_tp1pp1_core": Case(
        "bert_legacy_tp2pp2", "bert",
        (("reshard", "{src}/torch", "{out}", "--tp", "1", "--pp", "1", "--naming", "mcore-local", "--no-optimizer"),),
        "torch", 1, 1),
    "legacy_to_tp2pp1_core_dist": Case(
        "bert_legacy_tp2pp2", "bert",
        (("reshard", "{src}/torch", "{out}", "--tp", "2", "--pp", "1", "--naming", "mcore-local",
          "--format", "torch_dist", "--no-optimizer"),),
        "torch_dist", 2, 1),
    "legacy_hf_to_tp2pp2_core": Case(
        "bert_legacy_tp2pp2", "bert",
        (("megatron-to-hf", "{src}/torch", "{hf}"), ("hf-to-megatron", "{hf}", "{out}", "--tp", "2", "--pp", "2")),
        "torch", 2, 2, hf=True),
}


def reference(case: Case) -> dict:
    return torch.load(FIXTURES / case.fixture / "logits.pt", weights_only=False)


def hf_logits(hf_dir: Path, inputs: dict) -> dict:
    """MLM and next-sentence logits of transformers' MegatronBertForPreTraining for the fixture's
    inputs, in float32 on the CPU."""
    from transformers import MegatronBertForPreTraining
    model = MegatronBertForPreTraining.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=inputs["tokens"], attention_mask=inputs["padding_mask"],
                    token_type_ids=inputs["types"])
    return {"mlm_logits": out.prediction_logits.float(), "binary_logits": out.seq_relationship_logits.float(),
            "class": type(model).__name__, "config": model.config.to_dict()}


def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, case in CASES.items():
        places = {"src": str(FIXTURES / case.fixture), "out": str(out / name), "hf": str(out / f"{name}_hf")}
        try:
            for step in case.steps:
                ckptkit(*(arg.format(**places) for arg in step), "--overwrite")
            if case.hf:
                saved = hf_logits(Path(places["hf"]), reference(case))
                torch.save(saved, out / f"{name}_hf_logits.pt")
        except Exception as exc:  # one failed conversion must not hide the other cases
            print(f"{name}: ckptkit failed: {exc!r}", file=sys.stderr)
            (out / f"{name}.failed").write_text(repr(exc))
            continue
        lines.append(f"{name} {case.model} {case.tree} {case.fmt} {case.tp} {case.pp} {case.naming}")
        files = sorted(str(p.relative_to(out)) for p in (out / name).rglob("*") if p.is_file())
        print(name, files)
    (out / "cases.txt").write_text("\n".join(lines) + "\n")


def differences(ours: dict, expected: dict, model: str) -> dict:
    """max |ours - expected| over the real vocabulary, per output."""
    vocab = expected.get("vocab", 1000)
    if model == "t5":
        return {"logits": (ours["logits"][..., :vocab] - expected["logits"][..., :vocab]).abs().max().item()}
    real = expected["padding_mask"].bool()
    mlm = (ours["mlm_logits"][..., :vocab] - expected["mlm_logits"][..., :vocab]).abs()
    row = {"mlm_real": mlm[real].max().item()}
    if "tokens" in ours:  # Megatron's own run: padded positions compare too
        row["mlm_all"] = mlm.max().item()
    if expected.get("binary_logits") is not None:
        row["binary"] = (ours["binary_logits"] - expected["binary_logits"]).abs().max().item()
    return row


def compare(out: Path, results: Path) -> list[dict]:
    rows = []
    for name, case in CASES.items():
        expected = reference(case)
        row = {"case": name, "megatron": f"{case.tree} {case.naming} TP{case.tp} PP{case.pp} {case.fmt}"}
        log = results / f"{name}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        if "load_return:" in text:  # Megatron's strict load failed and it retried non-strict
            row["warning"] = "non-strict load (load_return in the log)"
        path = results / f"{name}_logits.pt"
        if (out / f"{name}.failed").exists():
            row["error"] = "ckptkit: " + (out / f"{name}.failed").read_text()[:200]
        elif not path.exists():
            row["error"] = "no logits (Megatron run failed)"
        else:
            ours = torch.load(path, weights_only=False)
            for key in ("tokens", "types", "padding_mask", "encoder_tokens", "decoder_tokens"):
                if key in expected:
                    assert torch.equal(ours[key], expected[key]), f"{name}: {key} differ from the fixture's"
            row.update(differences(ours, expected, case.model))
        rows.append(row)
        if case.hf and (out / f"{name}_hf_logits.pt").exists():
            hf = torch.load(out / f"{name}_hf_logits.pt", weights_only=False)
            rows.append({"case": f"{name} (HF)", "megatron": f"transformers {hf['class']}",
                         **differences(hf, expected, case.model)})
    print(f"{'case':36s} {'loaded by':34s} max |Δlogits| vs the fixture's Megatron logits")
    for row in rows:
        figures = "  ".join(f"{k} {v:.3g}" for k, v in row.items() if isinstance(v, float))
        print(f"{row['case']:36s} {row['megatron']:34s} {row.get('error', figures)} {row.get('warning', '')}")
    return rows


if __name__ == "__main__":
    main(__doc__.splitlines()[0], lambda out: prepare(out.resolve()), compare)
    sys.exit(0)
