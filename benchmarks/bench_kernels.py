"""Each fused kernel against eager PyTorch and against its memory-bandwidth floor.

    python benchmarks/bench_kernels.py [--tokens 8192] [--dtype bfloat16]

Shapes are GPT-2 124M's with 8 x 1024 tokens per step (hidden 768, ffn 3072, 12 heads
of 64, vocabulary padded to 50304). Every kernel here is memory-bound, so its floor is
the bytes it must read and write divided by the bandwidth a device-to-device copy
reaches on this GPU (measured first). "ms" columns are GPU time (the kernels' summed
durations, from the profiler: what the floor bounds); "wall" columns are the median
time of one call between CUDA events, launch overhead included. "fwd+bwd" runs the
forward and the backward with a fixed output gradient.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckptkit import kernels  # noqa: E402


def cuda_time_ms(function, repeats: int = 50, warmup: int = 10) -> float:
    """Median wall time of one call, CUDA events around it (includes the CPU launch cost)."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_time_ms(function, repeats: int = 20, warmup: int = 5) -> float:
    """GPU time of one call: the summed duration of its CUDA kernels (profiler), no launch gaps."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(repeats):
            function()
        torch.cuda.synchronize()
    total_us = sum(getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
                   for event in profile.key_averages()
                   if event.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / repeats / 1e3


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    source = torch.empty(512 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    milliseconds = cuda_time_ms(lambda: target.copy_(source), repeats=20)
    return 2 * source.numel() * 4 / (milliseconds / 1e3)


def forward_backward(function, inputs):
    """A closure running forward + backward of ``function`` (inputs requiring grad are reused)."""
    leaves = [tensor.detach().requires_grad_(tensor.is_floating_point()) for tensor in inputs]
    grad = torch.randn_like(function(*leaves))

    def run():
        for leaf in leaves:
            leaf.grad = None
        function(*leaves).backward(grad)
    return run


def forward_only(function, inputs):
    return lambda: function(*inputs)


def cases(tokens: int, dtype: torch.dtype):
    """(name, eager function, fused function, inputs, bytes forward, bytes forward+backward)."""
    hidden, ffn, heads, head_dim, vocab = 768, 3072, 12, 64, 50304
    size = torch.tensor([], dtype=dtype).element_size()
    seq = 1024
    batch = max(1, tokens // seq)
    x_ffn = torch.randn(tokens, ffn, device="cuda", dtype=dtype)
    bias = torch.randn(ffn, device="cuda", dtype=dtype)
    x_hidden = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    weight, norm_bias = torch.randn(hidden, device="cuda", dtype=dtype), torch.randn(hidden, device="cuda", dtype=dtype)
    x_rope = torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype)
    cos, sin = kernels.rope_tables(seq, head_dim, 10000.0, device="cuda")
    logits = torch.randn(tokens, vocab, device="cuda", dtype=dtype)
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    n_ffn, n_hidden, n_rope, n_logits = x_ffn.numel(), x_hidden.numel(), x_rope.numel(), logits.numel()
    # Bytes each pass must move at least: forward reads x, writes y; backward reads grad (and x), writes dx.
    return [
        ("bias_gelu", lambda x, b: kernels.bias_gelu(x, b, fused=False),
         lambda x, b: kernels.bias_gelu(x, b, fused=True), [x_ffn, bias],
         2 * n_ffn * size, 5 * n_ffn * size),
        ("layer_norm", lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, fused=False),
         lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, fused=True), [x_hidden, weight, norm_bias],
         2 * n_hidden * size, 5 * n_hidden * size),
        ("rms_norm", lambda x, w: kernels.rms_norm(x, w, 1e-5, fused=False),
         lambda x, w: kernels.rms_norm(x, w, 1e-5, fused=True), [x_hidden, weight],
         2 * n_hidden * size, 5 * n_hidden * size),
        ("rope", lambda x: kernels.apply_rope(x, cos, sin, fused=False),
         lambda x: kernels.apply_rope(x, cos, sin, fused=True), [x_rope],
         2 * n_rope * size, 4 * n_rope * size),
        ("cross_entropy", lambda x, t: kernels.cross_entropy(x, t, fused=False).sum(),
         lambda x, t: kernels.cross_entropy(x, t, fused=True).sum(), [logits, target],
         n_logits * size, 3 * n_logits * size),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (none found)")
        return 0
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:,.0f} GB/s  "
          f"tokens {args.tokens}  dtype {args.dtype}  triton {'yes' if kernels.fused_available() else 'NO'}")
    header = (f"{'kernel':<14}{'pass':<9}{'eager ms':>10}{'fused ms':>10}{'speedup':>9}{'floor ms':>10}"
              f"{'fused/floor':>12}{'eager wall':>12}{'fused wall':>12}")
    print(header)
    print("-" * len(header))
    for name, eager, fused, inputs, bytes_forward, bytes_both in cases(args.tokens, dtype):
        for label, make, moved in (("fwd", forward_only, bytes_forward), ("fwd+bwd", forward_backward, bytes_both)):
            with torch.no_grad() if label == "fwd" else torch.enable_grad():
                eager_run = make(eager, inputs)
                eager_ms, eager_wall = gpu_time_ms(eager_run), cuda_time_ms(eager_run)
                fused_ms = fused_wall = float("nan")
                if kernels.fused_available():
                    fused_run = make(fused, inputs)
                    fused_ms, fused_wall = gpu_time_ms(fused_run), cuda_time_ms(fused_run)
            floor_ms = moved / bandwidth * 1e3
            print(f"{name:<14}{label:<9}{eager_ms:>10.3f}{fused_ms:>10.3f}{eager_ms / fused_ms:>8.2f}x"
                  f"{floor_ms:>10.3f}{fused_ms / floor_ms:>11.2f}x{eager_wall:>12.3f}{fused_wall:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
