"""ckptkit's reshards of the real Megatron-LM BERT and T5 checkpoints with optimizer state, for
Megatron to resume from (tools/megatron_encoder_resume.sh runs the resumes).

    python3 tools/megatron_encoder_resume_prepare.py SOURCES PREPARED

SOURCES holds what tools/megatron_encoder_optimizer.sh left (one folder per checkpoint, saved
at iteration 10, and logs/). For each case of CASES ckptkit reshards weights and optimizer
state (``ckptkit.convert.reshard``) from a source to PREPARED/NAME, then checks that every
fp32 master copy of the written state rounds to its written bf16 weight (the check that fails
at once for state put in the wrong place) and that the state reads back equal to the
source's. PREPARED/runs.txt lists the resumes and PREPARED/sources.txt the sources whose own
resume (the baseline) and uninterrupted run are redone next to them; the sources are copied
to PREPARED/sources/.
"""
from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path

import torch

# name: (source, format, TP, PP, DP, distributed optimizer, torch_dist sharding or "-", VPP layers or "-")
CASES = {
    "bert_pp2": ("bert_torch", "torch", 1, 2, 2, 1, "-", "-"),
    "bert_dist_tp2": ("bert_torch", "torch_dist", 2, 1, 2, 1, "dp_reshardable", "-"),
    "bert_vpp": ("bert_torch", "torch", 1, 2, 2, 1, "-", 1),
    "bert_full_pp2": ("bert_torch", "torch_dist", 1, 2, 2, 1, "fully_reshardable", "-"),
    "bert_nodist_dp4": ("bert_torch", "torch", 1, 1, 4, 0, "-", "-"),
    "bert_from_dist_dp4": ("bert_dist", "torch", 1, 1, 4, 1, "-", "-"),
    "bert_from_plain": ("bert_plain", "torch", 2, 1, 2, 1, "-", "-"),
    "t5_tp1dp4": ("t5_torch", "torch", 1, 1, 4, 1, "-", "-"),
    "t5_dist_tp1": ("t5_torch", "torch_dist", 1, 1, 4, 1, "dp_reshardable", "-"),
    "t5_full_tp2": ("t5_torch", "torch_dist", 2, 1, 2, 1, "fully_reshardable", "-"),
    "t5_nodist": ("t5_torch", "torch", 2, 1, 2, 0, "-", "-"),
    "t5_from_dist_dp4": ("t5_dist", "torch", 1, 1, 4, 1, "-", "-"),
}
# The sources' own layouts (as tools/megatron_encoder_optimizer.sh's SOURCES): model, format,
# TP, PP, DP, distributed optimizer, sharding, VPP
SOURCE_LAYOUTS = {
    "bert_torch": ("bert", "torch", 2, 1, 2, 1, "-", "-"),
    "bert_dist": ("bert", "torch_dist", 2, 1, 2, 1, "-", "-"),
    "bert_plain": ("bert", "torch", 2, 1, 2, 0, "-", "-"),
    "t5_torch": ("t5", "torch", 2, 1, 2, 1, "-", "-"),
    "t5_dist": ("t5", "torch_dist", 2, 1, 2, 1, "-", "-"),
}


def prepare(sources: Path, prepared: Path, names: list[str]) -> list[str]:
    """Writes every case of ``names``; returns the lines of runs.txt."""
    from ckptkit.convert import reshard
    from ckptkit.layouts import open_checkpoint
    from ckptkit.optimizer import read_optimizer_state
    from ckptkit.optimizer.verify import master_copy_problems

    lines = []
    for name in names:
        source, fmt, tp, pp, dp, distributed, sharding, vpp = CASES[name]
        model = SOURCE_LAYOUTS[source][0]
        destination = prepared / name
        shutil.rmtree(destination, ignore_errors=True)
        with open_checkpoint(sources / source) as weights:  # VPP: the chunks of each stage
            chunks = 1 if vpp == "-" else weights.spec.num_layers // (pp * vpp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = reshard(sources / source, destination, tp=tp, pp=pp, vpp=chunks, format=fmt,
                             dp=dp, distributed_optimizer=bool(distributed),
                             optimizer_sharding=None if sharding == "-" else sharding)
        with open_checkpoint(destination) as weights:
            problems = master_copy_problems(weights)
        with read_optimizer_state(sources / source) as before, read_optimizer_state(destination) as after:
            keys = ("exp_avg", "exp_avg_sq", "param")
            changed = [canonical.name for canonical in before.canonical()
                       if not all(torch.equal(before.tensor(canonical.name)[key][:before.spec.vocab_size],
                                              after.tensor(canonical.name)[key][:after.spec.vocab_size])
                                  if canonical.rule == "vocab" else
                                  torch.equal(before.tensor(canonical.name)[key], after.tensor(canonical.name)[key])
                                  for key in keys)]
            step = (before.info.step, after.info.step)
        print(f"{name}: {source} -> {fmt} TP{tp} PP{pp} DP{dp}{' VPP' if vpp != '-' else ''} "
              f"{'distributed' if distributed else 'plain'} {'' if sharding == '-' else sharding}: "
              f"{'masters match weights' if not problems else problems[:3]}; "
              f"{'state as the source' if not changed else f'CHANGED {changed[:3]}'}; steps {step}; "
              f"notes {result.notes}")
        if problems or changed:
            raise SystemExit(f"{name}: not resumable as written")
        lines.append(f"{name} {model} {fmt} {tp} {pp} {dp} {distributed} {sharding} {vpp} {source}")
    return lines


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    sources, prepared = Path(argv[0]), Path(argv[1])
    prepared.mkdir(parents=True, exist_ok=True)
    lines = prepare(sources, prepared, list(CASES))
    (prepared / "runs.txt").write_text("\n".join(lines) + "\n")
    used = sorted({CASES[name][0] for name in CASES})
    (prepared / "sources.txt").write_text("".join(
        f"{source} {' '.join(map(str, SOURCE_LAYOUTS[source]))}\n" for source in used))
    for source in used:
        shutil.rmtree(prepared / "sources" / source, ignore_errors=True)
        shutil.copytree(sources / source, prepared / "sources" / source)
    print(f"{len(lines)} cases and {len(used)} sources in {prepared}")


if __name__ == "__main__":
    main(sys.argv[1:])
