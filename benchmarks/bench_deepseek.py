"""Memory and time of DeepSeek-V3 conversions at DeepSeek-V3's widths, against the number of experts.

A synthetic DeepseekV3ForCausalLM with DeepSeek-V3's shapes (hidden 7168, 128 heads, MLA ranks
1536/512, head dims 128 + 64 rotary, value 128, experts of ffn 2048, one shared expert, vocabulary
129280) and one MoE layer of E experts (E = 8, 32, ...; DeepSeek-V3 has 256 in each of 58 MoE
layers) is written as a Hugging Face folder (Hub layout: one tensor per expert, gate and expert
bias in float32, bf16 otherwise), then converted, each conversion in its own process measured by
its own ``VmHWM``:

* ``hf-to-megatron --ep 8 --format torch_dist`` (bf16);
* ``megatron-to-hf`` of that checkpoint.

Streaming one tensor at a time, peak RSS should stay flat as the experts (and the checkpoint)
grow; the per-expert time extrapolates to a 256-expert layer and to the 61-layer model (3 dense
layers, 58 MoE layers, about 1.3 TB in bf16): see docs/deepseek.md.

    python benchmarks/bench_deepseek.py --experts 8,32 --work /tmp/ckptkit-deepseek
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from ckptkit.bridges import BRIDGES  # noqa: E402
from ckptkit.layouts import hf  # noqa: E402
from ckptkit.layouts.base import CheckpointMeta, CheckpointReader  # noqa: E402
from ckptkit.spec import ModelSpec, canonical_tensors  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30


def deepseek_v3_spec(experts: int, layers: int = 1) -> ModelSpec:
    """DeepSeek-V3's widths (its config.json) with ``layers`` MoE layers of ``experts`` experts."""
    return ModelSpec(
        family="deepseek_v3", num_layers=layers, hidden_size=7168, num_attention_heads=128, num_query_groups=128,
        ffn_hidden_size=18432, vocab_size=129280, max_position_embeddings=163840, head_dim=128,
        position_embedding="rope", normalization="RMSNorm", norm_epsilon=1e-6, activation="swiglu",
        add_bias_linear=False, add_qkv_bias=False, tied_embeddings=False, multi_latent_attention=True,
        q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, num_experts=experts,
        moe_ffn_hidden_size=2048, moe_router_topk=8, moe_shared_expert_size=2048,
        moe_router_score_function="sigmoid", moe_router_expert_bias=True, moe_router_num_groups=8,
        moe_router_group_topk=4, moe_router_topk_scaling_factor=2.5,
        rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})


class SyntheticDeepSeek(CheckpointReader):
    """Canonical tensors of random values (seeded by name), made on demand."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.meta = CheckpointMeta(layout="synthetic", path=Path("synthetic"), dtype=torch.bfloat16)
        self.shapes = {tensor.name: tensor.shape for tensor in canonical_tensors(spec)}

    def tensor(self, name: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(self.shapes[name], generator=generator) * 0.02).to(torch.bfloat16)


_PEAK = "import re\nprint('peak-rss-kib', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"


def run(call: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one ``ckptkit.convert`` call in its own process."""
    code = f"import importlib\nc = importlib.import_module(\"ckptkit.convert\")\n{call}\n{_PEAK}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return seconds, int(done.stdout.rsplit("peak-rss-kib", 1)[1].split()[0]) * 1024


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,32")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ckptkit-deepseek"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for experts in [int(value) for value in args.experts.split(",")]:
        work = args.work / f"e{experts}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        spec = deepseek_v3_spec(experts)
        reader = SyntheticDeepSeek(spec)
        (work / "hf").mkdir()
        start = time.perf_counter()
        hf.write(reader, work / "hf", BRIDGES["deepseek_v3"], dtype=torch.bfloat16, max_shard_size="5GB")
        (work / "hf" / "config.json").write_text(json.dumps(BRIDGES["deepseek_v3"].spec_to_config(spec,
                                                                                                   torch.bfloat16)))
        made = time.perf_counter() - start
        size = folder_bytes(work / "hf")
        for conversion, call in (
                ("hf-to-megatron --ep 8 torch_dist",
                 f"c.hf_to_megatron({str(work / 'hf')!r}, {str(work / 'dist')!r}, tp=1, pp=1, ep=8, "
                 "format='torch_dist')"),
                ("megatron-to-hf", f"c.megatron_to_hf({str(work / 'dist')!r}, {str(work / 'back')!r})")):
            seconds, peak = run(call)
            rows.append({"experts": experts, "conversion": conversion, "checkpoint_gib": round(size / GIB, 2),
                         "one_expert_mib": round(3 * 7168 * 2048 * 2 / MIB, 1), "seconds": round(seconds, 1),
                         "peak_rss_mib": round(peak / MIB), "made_in_s": round(made, 1)})
            print(rows[-1], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    print("| experts | conversion | checkpoint GiB | seconds | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['experts']} | {row['conversion']} | {row['checkpoint_gib']} | {row['seconds']} | "
              f"{row['peak_rss_mib']} |")
    if args.json:
        args.json.write_text(json.dumps({"uptime": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
