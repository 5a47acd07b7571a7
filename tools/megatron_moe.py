"""Inputs and comparison for tools/megatron_check_moe.sh: real Megatron-LM loads the
mixture-of-experts checkpoints ckptkit writes and computes the same logits.

    python3 tools/megatron_moe.py prepare .devdata/moecheck      # here, on the CPU
    bash tools/megatron_check_moe.sh                              # on 2 GPUs, with Megatron-LM
    python3 tools/megatron_moe.py compare .devdata/moecheck RESULTS_DIR

``prepare`` makes, under DIR, from the real Megatron MoE fixtures (tools/make_megatron_moe_fixtures.sh):

- ``qwen2_torch``: ``moe_qwen2_ep2_torch/torch`` (per-rank, EP2; shared expert with a gate,
  QKV bias, layer 0 dense) -> ``megatron-to-hf`` -> ``hf-to-megatron --tp 1 --pp 1 --ep 2``
  (per-rank files ``mp_rank_00_000`` and ``mp_rank_00_001``), loaded at EP2 on 2 GPUs.
- ``mixtral_dist``: ``moe_optim_ep2/torch_distributed`` (per-rank, EP2; made by
  tools/make_megatron_optimizer_fixtures.sh; the figures in docs/megatron-check.md were made
  with the larger ``moe_mixtral_ep2_torch`` it replaced) -> ``megatron-to-hf`` ->
  ``hf-to-megatron --tp 1 --pp 1 --ep 2 --format torch_dist``, loaded at EP1 on 1 GPU.
- ``qwen3_torch``: ``moe_qwen3_tp1ep2/dist`` (torch_dist) -> ``reshard --format torch --tp 1
  --pp 1 --ep 2`` (per-rank, EP2), loaded at EP2 on 2 GPUs.

Each run's reference is the logits Megatron itself computed for the fixture (``logits.pt``);
``RUN_tokens.pt`` holds its tokens. ``compare`` reads ``RUN_logits.pt`` (tools/megatron_logits.py)
and prints max / mean |Megatron - reference| over the real vocabulary columns (the reference's
``vocab``).

ckptkit runs as ``ckptkit.cli:main`` from ``CKPTKIT_PATH`` when set (a clean
``git archive`` copy), else from the installed package.
"""
from __future__ import annotations

from pathlib import Path

import torch
from megatron_compare import ckptkit, logits_row, main, print_rows

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
# run -> (fixture, how it was made)
RUNS = {
    "qwen2_torch": ("moe_qwen2_ep2_torch", "megatron-to-hf, hf-to-megatron --tp 1 --pp 1 --ep 2 (per-rank)"),
    "mixtral_dist": ("moe_optim_ep2", "megatron-to-hf, hf-to-megatron --tp 1 --pp 1 --ep 2 --format torch_dist"),
    "qwen3_torch": ("moe_qwen3_tp1ep2", "reshard --format torch --tp 1 --pp 1 --ep 2 (per-rank)"),
}



def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, source in (("qwen2", FIXTURES / "moe_qwen2_ep2_torch" / "torch"),
                         ("mixtral", FIXTURES / "moe_optim_ep2" / "torch_distributed")):
        ckptkit("megatron-to-hf", str(source), str(out / f"{name}_hf"), "--overwrite")
    ckptkit("hf-to-megatron", str(out / "qwen2_hf"), str(out / "qwen2_torch"), "--tp", "1", "--pp", "1",
            "--ep", "2", "--overwrite")
    ckptkit("hf-to-megatron", str(out / "mixtral_hf"), str(out / "mixtral_dist"), "--tp", "1", "--pp", "1",
            "--ep", "2", "--format", "torch_dist", "--overwrite")
    ckptkit("reshard", str(FIXTURES / "moe_qwen3_tp1ep2" / "dist"), str(out / "qwen3_torch"),
            "--format", "torch", "--tp", "1", "--pp", "1", "--ep", "2", "--overwrite")
    for run, (fixture, _) in RUNS.items():
        reference = torch.load(FIXTURES / fixture / "logits.pt", weights_only=False)
        torch.save({"tokens": reference["tokens"]}, out / f"{run}_tokens.pt")
        files = sorted(str(p.relative_to(out)) for p in (out / run).rglob("*") if p.is_file())
        print(run, files)


def compare(out: Path, results: Path) -> list[dict]:
    rows = []
    for run, (fixture, how) in RUNS.items():
        reference = torch.load(FIXTURES / fixture / "logits.pt", weights_only=False)
        log = results / f"{run}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        rows.append({"run": run, "fixture": fixture, "how": how, "load_return": "load_return" in text,
                     **logits_row(results, run, reference)})
    print_rows(rows, 14, lambda row: f"load_return {'PRESENT' if row['load_return'] else 'absent'}  "
                                     f"vs {row['fixture']}/logits.pt")
    return rows


if __name__ == "__main__":
    main(__doc__.splitlines()[0], lambda out: prepare(out.resolve()), compare)
