"""Training throughput of GPT-2 124M on one GPU: eager, fused kernels, compiled layers.

    python benchmarks/bench_train.py [--micro-batch-size 16] [--global-batch-size 64]
        [--variants eager,fused,compiled] [--steps 10] [--warmup 3] [--json results.jsonl]

Runs the in-repo trainer (TP1 PP1 DP1, bf16 weights and compute, float32 master
weights and gradients) on the synthetic corpus, as ``Trainer.run`` does: each step is
queued before the previous one's loss is read, so the host never stalls the device.
Reports tokens/s (median over the timed steps) and model FLOPs utilisation:
``tokens/s x training FLOPs per token / peak bf16 FLOP/s`` (FLOPs per token from
:func:`ckptkit.train.trainer.model_flops_per_token`, attention counted without the
causal half; the peak from the GPU's name, or ``--peak-tflops``). Variants:

* ``eager``: PyTorch operations only;
* ``fused``: the Triton kernels (norms, bias + GeLU, output layer + cross-entropy,
  one-pass AdamW);
* ``compiled``: every transformer layer through ``torch.compile`` (the compiler fuses
  norms and activations with their neighbours), the Triton output layer + cross-entropy
  and AdamW; ``compiled-model``: the whole model in one compiled graph;
  ``-graphs``: with ``mode="reduce-overhead"`` (CUDA graphs);
* ``model-batched``, ``model-gelu``, ``model-step-graph``, ``model-all`` (and the pairs
  ``model-graph-batched``, ``model-graph-gelu``): the whole model compiled with
  ``grad_accumulation="batched"``, ``gelu_operator``, ``step_graph``, or all three;
  ``fused-step-graph``, ``fused-batched``: the same changes without the compiler;
  ``model-defaults`` (``-step-graph``): the whole model compiled with the trainer's defaults
  (batched accumulation and the GeLU operator, since they were measured faster), and with
  the step graph; the variants above keep the settings they were measured with;
* ``compiled-separate-loss``: the logits, then the Triton cross-entropy (not
  ``kernels.linear_cross_entropy``); ``compiled-flash``: SDPA's flash backend only.

``--profile-dir`` writes, per variant, where two steps' device time goes (by kind of
kernel, the top kernels, torch's operator table) and how much of the time the device
sat idle.

Every variant starts from the same weights and batches: their first losses agree to
bf16 rounding. ``--check-syncs`` counts the operations inside one step that make the
host wait for the device (``torch.cuda.set_sync_debug_mode``); ``--optimizer`` times
one AdamW update of the whole model, eager and fused, against its memory floor.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptkit import kernels  # noqa: E402
from ckptkit.spec import canonical_tensors  # noqa: E402
from ckptkit.train import MODEL_PRESETS, TrainConfig  # noqa: E402
from ckptkit.train.optim import AdamConfig  # noqa: E402
from ckptkit.train.parallel import Layout, build_groups  # noqa: E402
from ckptkit.train.trainer import Trainer, model_flops_per_token  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10": 125.0, "4090": 165.0}
# The trainer's settings before batched accumulation and the GeLU operator became its defaults: the
# variants named before them keep measuring what they measured.
_BEFORE = dict(grad_accumulation="hooks", gelu_operator=False)
VARIANTS = {
    "eager": dict(_BEFORE, fused_kernels=False),
    "fused": dict(_BEFORE, fused_kernels=True),
    "compiled": dict(_BEFORE, fused_kernels=True, compile=True),
    "compiled-model": dict(_BEFORE, fused_kernels=True, compile=True, compile_scope="model"),
    "compiled-graphs": dict(_BEFORE, fused_kernels=True, compile=True, compile_mode="reduce-overhead"),
    "compiled-model-graphs": dict(_BEFORE, fused_kernels=True, compile=True, compile_scope="model",
                                  compile_mode="reduce-overhead"),
}
# The whole model compiled, plus one change each: gradients added to main_grad in one launch per eight
# parameters after each micro-batch (no hooks), bias + GeLU as the Triton operator inside the compiled
# graph, the whole step as one CUDA graph; then all three together.
_MODEL = VARIANTS["compiled-model"]
VARIANTS.update({
    "model-batched": dict(_MODEL, grad_accumulation="batched"),
    "model-gelu": dict(_MODEL, gelu_operator=True),
    "model-step-graph": dict(_MODEL, step_graph=True),
    "model-graph-batched": dict(_MODEL, step_graph=True, grad_accumulation="batched"),
    "model-graph-gelu": dict(_MODEL, step_graph=True, gelu_operator=True),
    "model-all": dict(_MODEL, step_graph=True, grad_accumulation="batched", gelu_operator=True),
    "fused-step-graph": dict(_BEFORE, fused_kernels=True, step_graph=True),
    "fused-batched": dict(fused_kernels=True, grad_accumulation="batched"),
    # The trainer's defaults (batched accumulation, the GeLU operator) with the whole model compiled,
    # and the same with --step-graph: what `ckptkit train --compile --compile-scope model [--step-graph]` runs.
    "model-defaults": dict(fused_kernels=True, compile=True, compile_scope="model"),
    "model-defaults-step-graph": dict(fused_kernels=True, compile=True, compile_scope="model", step_graph=True),
})
# Variants that change a built trainer (see prepare): the output layer and the cross-entropy apart (the
# logits, then the Triton cross-entropy: how the trainer ran before kernels.linear_cross_entropy), and one
# SDPA backend allowed.
EXPLORE = {
    "compiled-separate-loss": dict(base="compiled", separate_loss=True),
    "compiled-model-separate-loss": dict(base="compiled-model", separate_loss=True),
    "compiled-flash": dict(base="compiled", sdpa="flash"),
    "model-all-flash": dict(base="model-all", sdpa="flash"),
}
SDPA_FLAGS = {"flash": "enable_flash_sdp", "cudnn": "enable_cudnn_sdp", "efficient": "enable_mem_efficient_sdp",
              "math": "enable_math_sdp"}


def allow_only_sdpa(backend: str | None) -> None:
    """Leave one scaled-dot-product-attention backend enabled (None: all of them)."""
    for name, flag in SDPA_FLAGS.items():
        getattr(torch.backends.cuda, flag)(backend is None or name == backend)


def prepare(trainer: Trainer, explore: dict) -> None:
    if explore.get("separate_loss"):
        trainer.model.output_in_loss = False


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def host_syncs_in_one_step(trainer: Trainer, step: int) -> list[str]:
    """Operations of one queued step that wait for the device (cudaStreamSynchronize, .item(), ...)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pending = trainer.launch_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    trainer.finish_step(pending)
    messages = [str(warning.message).splitlines()[0] for warning in caught]
    # The mode's own first-use notice ("... is a prototype feature ...") names no operation.
    return [message for message in messages if "synchroniz" in message and "prototype" not in message]


def measure(config: TrainConfig, warmup: int, profile: bool, check_syncs: bool, explore: dict | None = None,
            profile_dir: Path | None = None, label: str = "") -> dict:
    started = time.perf_counter()
    torch._dynamo.reset()
    allow_only_sdpa((explore or {}).get("sdpa"))
    trainer = Trainer(config, build_groups(Layout()), torch.device("cuda", torch.cuda.current_device()))
    prepare(trainer, explore or {})
    records = trainer.run().records
    timed = records[warmup:]
    result = {"first_loss": records[0].loss, "last_loss": records[-1].loss,
              "losses": [record.loss for record in records],
              "tokens_per_s": statistics.median(record.tokens_per_s for record in timed),
              "memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "seconds": time.perf_counter() - started}
    print(f"  {label}: {result['tokens_per_s']:,.0f} tokens/s (median of {len(timed)} steps)", flush=True)
    if check_syncs:
        syncs = host_syncs_in_one_step(trainer, config.steps)
        result["host_syncs"] = len(syncs)
        for message in syncs:
            print(f"  host sync: {message[:160]}")
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            trainer.train_step(config.steps + 1)
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    if profile_dir:
        try:  # a failing profile loses only itself, not the measurement
            write_profile(trainer, config.steps + 1,
                          profile_dir / f"profile_{label}_mb{config.micro_batch_size}_gb{config.batch_size}.txt")
        except Exception as error:
            print(f"  profile failed: {type(error).__name__}: {error}", flush=True)
    del trainer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


# Kernel name -> what it does, first match wins (cuBLAS/CUTLASS GEMMs, attention, Triton from the compiler or
# from ckptkit.kernels, PyTorch's own elementwise and reduction kernels, embedding backward, copies).
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "splitk")),
    ("compiled (inductor)", ("triton_poi", "triton_red", "triton_per", "triton_tem")),
    ("ckptkit triton", ("_kernel", "_fwd", "_bwd", "adam", "cross_entropy")),
    ("embedding", ("embedding", "indexselect", "index_put", "indexing", "sort", "radix", "segment", "scatter")),
    ("copy/memset", ("memcpy", "memset", "copy")),
    ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "unrolled", "fill")),
]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def write_profile(trainer: Trainer, step: int, path: Path, steps: int = 2) -> None:
    """Profile ``steps`` steps (host and device) and write where the device time goes.

    Written: the steps' wall time, the device's busy time (the union of its kernels'
    intervals) and idle share, the time per kind of kernel, the 60 kernels taking the most
    time, where the device waits (the gaps between kernels, summed by the kernel that ends
    each gap, and the largest ones), and torch's operator table (host and device times).
    """
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        started = time.perf_counter()
        for offset in range(steps):
            trainer.train_step(step + offset)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) * 1e3
    kernels_seen = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    intervals = sorted((event.time_range.start, event.time_range.end) for event in kernels_seen)
    busy_us, reach = 0.0, None
    for start, end in intervals:
        if reach is None or start > reach:
            busy_us += end - start
            reach = end
        elif end > reach:
            busy_us += end - reach
            reach = end
    span_us = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    by_kind: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for event in kernels_seen:
        duration = event.time_range.end - event.time_range.start
        kind = kernel_kind(event.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + duration
        entry = by_name.setdefault(event.name, [0, 0.0, kind])
        entry[0] += 1
        entry[1] += duration
    total_us = sum(by_kind.values())
    lines = [f"{steps} steps: wall {wall_ms:.2f} ms, device span {span_us / 1e3:.2f} ms, device busy "
             f"{busy_us / 1e3:.2f} ms ({1 - busy_us / max(span_us, 1):.1%} idle), summed kernel time "
             f"{total_us / 1e3:.2f} ms, {len(kernels_seen)} kernels", "", "per step, by kind:"]
    for kind, micros in sorted(by_kind.items(), key=lambda item: -item[1]):
        lines.append(f"  {kind:<22}{micros / steps / 1e3:>9.3f} ms  {micros / max(total_us, 1):>6.1%}")
    lines += ["", "kernels by summed time (per step):"]
    for name, (count, micros, kind) in sorted(by_name.items(), key=lambda item: -item[1][1])[:60]:
        lines.append(f"  {micros / steps / 1e3:>8.3f} ms {count / steps:>6.1f}x  {kind:<20} {name[:150]}")
    lines += ["", "device idle, by the kernel that ends the gap (per step; gaps over 1 us):"]
    lines += idle_gaps(kernels_seen, steps)
    lines += ["", profiler.key_averages().table(sort_by="cuda_time_total", row_limit=50, max_name_column_width=90)]
    path.write_text("\n".join(lines) + "\n")
    print(f"  profile: {lines[0]} -> {path}", flush=True)
    for line in lines[2:2 + len(by_kind) + 1]:
        print(line, flush=True)


def idle_gaps(kernels_seen, steps: int) -> list[str]:
    """Lines saying where the device waits: each gap between the end of everything before a kernel
    and its start is charged to that kernel's name; then the ten largest gaps with their neighbours."""
    ordered = sorted(kernels_seen, key=lambda event: event.time_range.start)
    by_next: dict[str, list] = {}
    largest = []
    reach, previous = None, None
    for event in ordered:
        if reach is not None and event.time_range.start - reach > 1.0:
            gap = event.time_range.start - reach
            entry = by_next.setdefault(event.name[:110], [0, 0.0])
            entry[0] += 1
            entry[1] += gap
            largest.append((gap, previous.name[:70], event.name[:70]))
        if reach is None or event.time_range.end > reach:
            reach, previous = event.time_range.end, event
    total = sum(micros for _, micros in by_next.values())
    lines = [f"  {total / steps / 1e3:.3f} ms in {sum(count for count, _ in by_next.values()) / steps:.0f} gaps"]
    for name, (count, micros) in sorted(by_next.items(), key=lambda item: -item[1][1])[:25]:
        lines.append(f"  {micros / steps / 1e3:>8.3f} ms {count / steps:>6.1f}x  {micros / count:>6.1f} us  {name}")
    lines.append("  largest gaps (us): the kernel before -> the kernel after")
    for gap, before, after in sorted(largest, reverse=True)[:10]:
        lines.append(f"  {gap:>9.1f}  {before} -> {after}")
    return lines


def time_optimizer(parameters: int, bandwidth: float) -> list[dict]:
    """One AdamW update of ``parameters`` flat weights, eager and fused, against its memory floor."""
    def state():
        generator = torch.Generator(device="cuda").manual_seed(0)
        floats = lambda: torch.randn(parameters, device="cuda", generator=generator)
        return dict(param=torch.empty(parameters, device="cuda", dtype=torch.bfloat16), master=floats(),
                    exp_avg=floats(), exp_avg_sq=floats().abs(), grad=floats(),
                    decay=torch.ones(parameters, device="cuda", dtype=torch.bool))
    # Reads gradient, master, both moments (4 bytes each) and the decay flag (1), writes master, moments and
    # the bf16 weights: 31 bytes per weight.
    floor_ms = 31 * parameters / bandwidth * 1e3
    rows = []
    for label, fused in (("eager", False), ("fused", True)):
        tensors = state()
        scale = torch.tensor(0.5, device="cuda")
        run = lambda: kernels.adam_step(**tensors, grad_scale=scale, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8,
                                        weight_decay=0.1, step=10, fused=fused)
        milliseconds = event_time_ms(run)
        rows.append({"optimizer": label, "ms": milliseconds, "floor_ms": floor_ms})
        del tensors
    return rows


def event_time_ms(function, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    source = torch.empty(512 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() * 4 / (event_time_ms(lambda: target.copy_(source)) / 1e3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--global-batch-size", type=int, help="sequences per step (default: one micro-batch)")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the compiled variant compiles)")
    parser.add_argument("--variants", default="eager,fused,compiled", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step per variant")
    parser.add_argument("--check-syncs", action="store_true", help="count host syncs inside one step per variant")
    parser.add_argument("--optimizer", action="store_true", help="time one AdamW update, eager and fused")
    parser.add_argument("--profile-dir", type=Path, help="write a profile of two steps per variant here")
    parser.add_argument("--json", type=Path, help="append one JSON line per result to this file")
    parser.add_argument("--loss-launch", default="",
                        help="the loss kernel's launch, BLOCK,WARPS,forwards|backwards (default: the kernels' own, "
                             "kernels.fused.LOSS_KERNEL_LAUNCH)")
    parser.add_argument("--gelu-rows-per-program", type=int,
                        help="the bias + GeLU backward looping over this many rows per program (default: the "
                             "kernels' own, kernels.fused.GELU_BACKWARD_ROWS_PER_PROGRAM)")
    parser.add_argument("--gelu-backward-from", choices=["x", "derivative"],
                        default=kernels.GELU_OPERATOR_BACKWARD_FROM,
                        help="what the GeLU operator's backward reads: the pre-activation, or the derivative its "
                             "forward wrote; kernels.GELU_OPERATOR_BACKWARD_FROM")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                        help="set torch._inductor.config.NAME (a Python literal) before compiling; repeatable, "
                             "e.g. --inductor combo_kernels=True")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, if its name is not known")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train: needs a CUDA GPU (none found)")
        return 0
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    kernels.GELU_OPERATOR_BACKWARD_FROM = args.gelu_backward_from
    for setting in args.inductor:
        import ast
        import torch._inductor.config as inductor_config
        option, value = setting.split("=", 1)
        setattr(inductor_config, option, ast.literal_eval(value))
    if kernels.fused_available():
        from ckptkit.kernels import fused
        if args.loss_launch:
            fused.LOSS_KERNEL_LAUNCH = fused.LossKernelLaunch.parse(args.loss_launch)
        if args.gelu_rows_per_program is not None:
            fused.GELU_BACKWARD_ROWS_PER_PROGRAM = args.gelu_rows_per_program
    spec = MODEL_PRESETS["gpt2-124m"]
    config = TrainConfig(model=spec, steps=args.warmup + args.steps, micro_batch_size=args.micro_batch_size,
                         global_batch_size=args.global_batch_size, seq_length=args.seq_length, dtype="bfloat16",
                         device="cuda", recompute=args.recompute, optimizer=AdamConfig(lr=6e-4, warmup_steps=0))
    flops_per_token = model_flops_per_token(spec, args.seq_length, padded_vocab=50304)
    print(f"{name}  torch {torch.__version__}  GPT-2 124M  micro-batch {args.micro_batch_size} x "
          f"{args.seq_length} tokens, {config.num_microbatches()} per step  bf16  "
          f"{flops_per_token / 1e9:.3f} GFLOP/token  peak {peak or '?'} TFLOP/s  "
          f"triton {'yes' if kernels.fused_available() else 'NO'}", flush=True)
    if args.profile_dir:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    header = (f"{'variant':<20}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'loss step 1':>13}{'loss last':>11}"
              f"{'syncs':>7}{'wall s':>8}")
    print(header)
    print("-" * len(header), flush=True)
    for label in args.variants.split(","):
        explore = EXPLORE.get(label, {})
        changes = VARIANTS[explore.get("base", label)]
        if changes.get("fused_kernels") and not kernels.fused_available():
            print(f"{label:<20}skipped: needs Triton", flush=True)
            continue
        try:
            shown = label + (f"-loss{args.loss_launch}" if args.loss_launch else "") + \
                (f"-gelurows{args.gelu_rows_per_program}" if args.gelu_rows_per_program is not None else "") + \
                ("-gelu-from-x" if args.gelu_backward_from == "x" else "") + \
                "".join(f"-{setting}" for setting in args.inductor)
            result = measure(dataclasses.replace(config, **changes), args.warmup, args.profile, args.check_syncs,
                             explore, args.profile_dir, shown)
        except Exception as error:  # one variant failing (a compiler error, say) does not hide the others
            print(f"{label:<20}failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}",
                  flush=True)
            import traceback
            traceback.print_exc()
            continue
        mfu = result["tokens_per_s"] * flops_per_token / (peak * 1e12) if peak else float("nan")
        print(f"{label:<20}{result['tokens_per_s']:>12,.0f}{mfu:>8.1%}{result['memory_gib']:>10.1f}"
              f"{result['first_loss']:>13.4f}{result['last_loss']:>11.4f}{result.get('host_syncs', '-'):>7}"
              f"{result['seconds']:>8.1f}", flush=True)
        if args.json:
            with open(args.json, "a") as stream:
                stream.write(json.dumps({"gpu": name, "variant": label, "micro_batch_size": args.micro_batch_size,
                                         "loss_launch": args.loss_launch,
                                         "gelu_rows_per_program": args.gelu_rows_per_program,
                                         "gelu_backward_from": args.gelu_backward_from, "label": shown,
                                         "inductor": args.inductor,
                                         "microbatches": config.num_microbatches(), "mfu": mfu, **result}) + "\n")
    if args.optimizer:
        bandwidth = copy_bandwidth()
        parameters = sum(math.prod(entry.shape) for entry in canonical_tensors(spec))
        print(f"AdamW over {parameters / 1e6:.0f}M weights; copy bandwidth {bandwidth / 1e9:,.0f} GB/s")
        for row in time_optimizer(parameters, bandwidth):
            print(f"  {row['optimizer']:<6}{row['ms']:>8.2f} ms   floor {row['floor_ms']:.2f} ms   "
                  f"{row['ms'] / row['floor_ms']:.2f}x floor", flush=True)
            if args.json:
                with open(args.json, "a") as stream:
                    stream.write(json.dumps({"gpu": name, **row}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
