"""Memory and time of resharding optimizer state, against the size of the state.

Makes a synthetic GPT checkpoint (``make_synthetic.py``: fp32, Megatron-Core local names,
TP1 PP1) and gives it a distributed-optimizer state (DP2; master copies equal to the
weights, made-up moments), then, each in its own process:

* ``weights``: ``reshard`` of the weights to the target TP/PP;
* ``optimizer``: ``read_optimizer_state`` of the source and ``write_optimizer_state`` at
  the target TP/PP/DP (``distrib_optim.pt`` and the rank files' entries);
* ``torch_dist``: ``reshard --format torch_dist`` to the target, weights and the state as
  Megatron's ``dp_reshardable`` in one save.

Peak RSS is ``ru_maxrss`` of each process (``wait4``). The optimizer state is three fp32
copies of the model; the largest canonical tensor is the padded word embeddings.

    python benchmarks/bench_optimizer.py --size 350m --work /work/bench-optimizer --tp 2 --pp 2 --dp 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_synthetic import SIZES, gpt_spec, make, parameter_count  # noqa: E402

from ckptkit.optimizer import OptimizerTarget, write_optimizer_state  # noqa: E402
from ckptkit.optimizer.state import OptimizerInfo, OptimizerState  # noqa: E402
from ckptkit.spec import canonical_tensors, rule_for  # noqa: E402

GROUPS = [{"wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False, "lr": 1e-4, "weight_decay": 0.01},
          {"wd_mult": 0.0, "lr_mult": 1.0, "is_expert_parallel": False, "lr": 1e-4, "weight_decay": 0.0}]


class SyntheticOptimizerState(OptimizerState):
    """Master copies from the checkpoint's weights, moments made up from each name."""

    def __init__(self, weights):
        self.weights, self.spec = weights, weights.spec
        self.padded_vocab_size = weights.meta.padded_vocab_size
        self.info = OptimizerInfo(kind="distributed", step=1000.0, param_groups=GROUPS,
                                  opt_param_scheduler={"num_steps": 1000}, source={"tp": 1, "pp": 1, "vpp": 1})
        self._canonical = {tensor.name: tensor for tensor in self.canonical()}

    def tensor(self, name, keys=("param", "exp_avg", "exp_avg_sq")):
        shape = rule_for(self.spec, self._canonical[name].rule, self.padded_vocab_size).full_shape(
            self._canonical[name].shape)
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        values = {}
        for key in keys:
            if key == "param":
                values[key] = self.weights.tensor(name).float()
            else:
                values[key] = torch.empty(shape).normal_(0.0, 1e-3, generator=generator).abs_()
        return values


def prepare(work: Path, size: str) -> Path:
    from ckptkit.layouts import open_checkpoint

    source = work / f"gpt-{size}-tp1-do"
    if (source / "latest_checkpointed_iteration.txt").is_file():
        return source
    shutil.rmtree(source, ignore_errors=True)
    make(source, size=size, naming="mcore-local", dtype="fp32")
    with open_checkpoint(source) as weights:
        state = SyntheticOptimizerState(weights)
        write_optimizer_state(state, source, OptimizerTarget(tp=1, dp=2, iteration=1000))
    return source


CHILD = {
    "weights": "from ckptkit.convert import reshard\n"
               "reshard({source!r}, {out!r}, tp={tp}, pp={pp})\n",
    "optimizer": "import warnings; warnings.simplefilter('ignore')\n"
                 "from ckptkit.optimizer import OptimizerTarget, read_optimizer_state, write_optimizer_state\n"
                 "with read_optimizer_state({source!r}) as state:\n"
                 "    write_optimizer_state(state, {out!r}, OptimizerTarget(tp={tp}, pp={pp}, dp={dp}, iteration=1000))\n",
    "torch_dist": "from ckptkit.convert import reshard\n"
                  "reshard({source!r}, {out!r} + '-dist', tp={tp}, pp={pp}, dp={dp}, format='torch_dist')\n",
}


def run_child(code: str) -> tuple[float, int]:
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    _, status, usage = os.wait4(process.pid, 0)
    if status:
        raise SystemExit(f"child failed ({status}): {code}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="125m")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-optimizer"))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    source = prepare(args.work, args.size)
    out = args.work / f"gpt-{args.size}-tp{args.tp}pp{args.pp}dp{args.dp}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}-dist", ignore_errors=True)
    spec = gpt_spec(args.size)
    largest = max(torch.Size(tensor.shape).numel() for tensor in canonical_tensors(spec)) * 4
    results = {"size": args.size, "parameters": parameter_count(spec), "state_bytes": 3 * 4 * parameter_count(spec),
               "largest_tensor_bytes": largest, "target": {"tp": args.tp, "pp": args.pp, "dp": args.dp}}
    for step, code in CHILD.items():
        seconds, peak = run_child(code.format(source=str(source), out=str(out), tp=args.tp, pp=args.pp, dp=args.dp))
        results[step] = {"seconds": round(seconds, 2), "peak_rss_bytes": peak}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
