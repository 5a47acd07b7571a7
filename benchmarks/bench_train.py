"""Training throughput of GPT-2 124M on one GPU, with and without the fused kernels.

    python benchmarks/bench_train.py [--micro-batch-size 8] [--seq-length 1024] [--steps 10]

Runs the in-repo trainer (TP1 PP1 DP1, bf16 weights and compute, float32 master
weights and gradients) on the synthetic corpus. Reports tokens/s and model FLOPs
utilisation: ``tokens/s x training FLOPs per token / peak bf16 FLOP/s`` (FLOPs per
token from :func:`ckptkit.train.trainer.model_flops_per_token`; the peak from the GPU's
name, or ``--peak-tflops``). The first step of each variant also prints its loss:
both must agree (same weights, same batch) to bf16 rounding.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptkit import kernels  # noqa: E402
from ckptkit.train import MODEL_PRESETS, TrainConfig  # noqa: E402
from ckptkit.train.optim import AdamConfig  # noqa: E402
from ckptkit.train.parallel import Layout, build_groups  # noqa: E402
from ckptkit.train.trainer import Trainer, model_flops_per_token  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10": 125.0, "4090": 165.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def measure(config: TrainConfig, warmup: int, steps: int, profile: bool = False) -> dict:
    trainer = Trainer(config, build_groups(Layout()), torch.device("cuda", torch.cuda.current_device()))
    records = [trainer.train_step(step) for step in range(warmup + steps)]
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            trainer.train_step(warmup + steps)
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    timed = records[warmup:]
    tokens_per_s = statistics.median(record.tokens_per_s for record in timed)
    peak_memory = torch.cuda.max_memory_allocated() / 2**30
    del trainer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return {"first_loss": records[0].loss, "last_loss": records[-1].loss, "tokens_per_s": tokens_per_s,
            "memory_gib": peak_memory}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step per variant")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if its name is not known")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train: needs a CUDA GPU (none found)")
        return 0
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    spec = MODEL_PRESETS["gpt2-124m"]
    config = TrainConfig(model=spec, steps=args.warmup + args.steps, micro_batch_size=args.micro_batch_size,
                         seq_length=args.seq_length, dtype="bfloat16", recompute=args.recompute,
                         optimizer=AdamConfig(lr=6e-4, warmup_steps=0))
    flops_per_token = model_flops_per_token(spec, args.seq_length, padded_vocab=50304)
    print(f"{name}  GPT-2 124M  micro-batch {args.micro_batch_size} x {args.seq_length} tokens  bf16  "
          f"{flops_per_token / 1e9:.2f} GFLOP/token  peak {peak or '?'} TFLOP/s  "
          f"triton {'yes' if kernels.fused_available() else 'NO'}")
    header = f"{'variant':<16}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'loss step 1':>13}{'loss last':>11}"
    print(header)
    print("-" * len(header))
    variants = [("eager", False)] + ([("fused kernels", True)] if kernels.fused_available() else [])
    for label, fused in variants:
        result = measure(dataclasses.replace(config, fused_kernels=fused, steps=config.steps + 1), args.warmup,
                         args.steps, args.profile)
        mfu = result["tokens_per_s"] * flops_per_token / (peak * 1e12) if peak else float("nan")
        print(f"{label:<16}{result['tokens_per_s']:>12,.0f}{mfu:>8.1%}{result['memory_gib']:>10.1f}"
              f"{result['first_loss']:>13.4f}{result['last_loss']:>11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
