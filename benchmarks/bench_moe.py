"""Peak memory of mixture-of-experts conversions against the number of experts.

A synthetic Mixtral-style model (fixed expert size, 8 to 256 experts per layer) is written
as a torch_dist checkpoint at EP8 (``decoder.layers.mlp.experts.experts.linear_fc1.weight``
is ``[layers, experts, 2 x ffn, hidden]``: for 256 experts 16x larger than for 8), then
converted in its own process (the library calls the commands make), each measured by the
process's own ``VmHWM`` (``ru_maxrss`` would count the benchmark's pages the child shares
between fork and exec):

* ``megatron-to-hf`` (each expert read as one region of the stacked key);
* ``reshard --ep 4 --format torch`` (per-rank files, one per EP rank, experts under local
  indices).

Reading one expert at a time, peak RSS should stay flat while the stacked expert tensor
grows with the experts (column "stacked expert key MB").

    python benchmarks/bench_moe.py --experts 8,32,128,256 --work /tmp/ckptkit-moe
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ckptkit.layouts import torch_dist  # noqa: E402
from ckptkit.layouts.base import CheckpointMeta, CheckpointReader  # noqa: E402
from ckptkit.layouts.megatron_common import TargetLayout  # noqa: E402
from ckptkit.spec import ModelSpec  # noqa: E402

MIB = 1 << 20


class SyntheticMoE(CheckpointReader):
    """Canonical tensors of a Mixtral-style model, made on demand (random, seeded by name)."""

    def __init__(self, experts: int, hidden: int, ffn: int, layers: int, dtype=torch.float16):
        self.spec = ModelSpec("mixtral", layers, hidden, hidden // 64, max(1, hidden // 256), ffn, 32000, 4096, 64,
                              position_embedding="rope", normalization="RMSNorm", activation="swiglu",
                              add_bias_linear=False, add_qkv_bias=False, tied_embeddings=False,
                              num_experts=experts, moe_ffn_hidden_size=ffn, moe_router_topk=2)
        self.meta = CheckpointMeta(layout="synthetic", path=Path("synthetic"), dtype=dtype)
        self.shapes = {tensor.name: tensor.shape for tensor in self.canonical()}

    def tensor(self, name: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(self.shapes[name], generator=generator) * 0.02).to(self.meta.dtype)


_PEAK = "import re\nprint('peak-rss-kib', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"


def run(call: str) -> tuple[float, int, str]:
    """(seconds, peak RSS bytes, output) of one ``ckptkit.convert`` call in its own process."""
    code = f"from ckptkit.streaming_io import keep_freed_memory_for_reuse\nkeep_freed_memory_for_reuse()\n" \
           f"from ckptkit.convert import megatron_to_hf, reshard\n{call}\n{_PEAK}"
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", code], cwd=HERE.parent,
                                   env=dict(os.environ, PYTHONPATH=str(HERE.parent)), stdout=output,
                                   stderr=subprocess.STDOUT)
        _, status, _ = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        output.seek(0)
        text = output.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{call} failed:\n{text[-2000:]}")
    peak = int(text.rsplit("peak-rss-kib", 1)[1].split()[0])
    return seconds, peak * 1024, text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,32,128,256")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=512, help="each expert's ffn size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ckptkit-moe-bench"))
    parser.add_argument("--json", type=Path, help="write the rows here too")
    options = parser.parse_args(argv)
    rows = []
    for experts in (int(value) for value in options.experts.split(",")):
        folder = options.work / f"moe-{experts}"
        shutil.rmtree(folder, ignore_errors=True)
        source = SyntheticMoE(experts, options.hidden, options.ffn, options.layers)
        torch_dist.write(source, folder / "dist", TargetLayout(ep=8, iteration=1))
        stacked = options.layers * experts * 2 * options.ffn * options.hidden * 2
        expert = 3 * options.ffn * options.hidden * 2
        for name, output, call in (
                ("megatron-to-hf", "hf", f"megatron_to_hf({str(folder / 'dist')!r}, {str(folder / 'hf')!r})"),
                ("reshard --ep 4 --format torch", "torch",
                 f"reshard({str(folder / 'dist')!r}, {str(folder / 'torch')!r}, tp=1, pp=1, ep=4, format='torch')")):
            seconds, peak, _ = run(call)
            # only the source and one output on disk at a time: 256 DeepSeek-V3-width experts are 23 GB each
            shutil.rmtree(folder / output, ignore_errors=True)
            rows.append({"experts": experts, "conversion": name, "seconds": round(seconds, 2),
                         "peak_rss_mb": round(peak / MIB, 1), "stacked_expert_key_mb": round(stacked / MIB, 1),
                         "one_expert_mb": round(expert / MIB, 2),
                         "checkpoint_mb": round(sum(path.stat().st_size for path in (folder / "dist").rglob("*")
                                                    if path.is_file()) / MIB, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    print("| experts | conversion | checkpoint MB | stacked expert key MB | one expert MB | seconds | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['experts']} | {row['conversion']} | {row['checkpoint_mb']} | {row['stacked_expert_key_mb']} | "
              f"{row['one_expert_mb']} | {row['seconds']} | {row['peak_rss_mb']} |")
    if options.json:
        options.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
