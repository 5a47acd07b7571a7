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


def time_loss_and_grad_kernel(tokens: int, bandwidth: float, launches: list) -> None:
    """The cross-entropy of the output layer as the trainer runs it on one tensor-parallel rank
    (``kernels.linear_cross_entropy``): one kernel reads each row of logits, writes the loss and
    overwrites the row with its gradient. Floor: one read and one write of the logits. Each of
    ``launches`` (:class:`fused.LossKernelLaunch`), then the separate cross-entropy's forward
    and backward kernels (two reads, one write); the fastest launch is printed last."""
    from ckptkit.kernels import fused
    vocab = 50304
    logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    loss = torch.empty(tokens, device="cuda")
    grad_loss = torch.full((tokens,), 1.0 / tokens, device="cuda")

    def two():
        row_max, sum_exp, target_logit = fused.cross_entropy_partial_stats(logits, target)
        fused._cross_entropy_backward_kernel[(tokens,)](logits, target, row_max, sum_exp, grad_loss, logits, vocab,
                                                        BLOCK=fused._CROSS_ENTROPY_BLOCK)
    size = 2 * tokens * vocab
    timed = []
    for label, launch, run, floor_bytes in [
            *[(f"loss+grad {launch}", launch,
               lambda launch=launch: fused.cross_entropy_loss_and_grad(logits, target, loss, launch), 2 * size)
              for launch in launches],
            ("stats, then grad", None, two, 3 * size)]:
        milliseconds = gpu_time_ms(run)
        floor_ms = floor_bytes / bandwidth * 1e3
        print(f"cross-entropy {label:<32}{milliseconds:>8.3f} ms  floor {floor_ms:.3f} ms  "
              f"{milliseconds / floor_ms:.2f}x floor", flush=True)
        if launch is not None:
            timed.append((milliseconds, launch))
    print(f"fastest loss kernel launch: {min(timed, key=lambda pair: pair[0])[1]}")


def time_gelu_backward(tokens: int, bandwidth: float) -> None:
    """The bias + GeLU backward of GPT-2's fc1 output (``tokens x 3072``, bf16, erf form), programs
    looping over N rows: from the pre-activation and from the saved derivative. Floor: two reads
    and one write of ``tokens x 3072`` (the bias sums are small)."""
    from ckptkit.kernels import fused
    x = torch.randn(tokens, 3072, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    bias = torch.randn(3072, device="cuda", dtype=torch.bfloat16)
    _, derivative = fused.bias_gelu_and_derivative(x, bias, "none")
    floor_ms = 3 * x.numel() * x.element_size() / bandwidth * 1e3
    variants = [(f"from x, {rows} rows per program",
                  lambda rows=rows: fused.bias_gelu_backward_rows(grad, x, bias, "none", False, rows))
                 for rows in (64, 128, 256, 512)]
    variants += [(f"from derivative, {rows} rows per program",
                  lambda rows=rows: fused.bias_gelu_backward_rows(grad, derivative, bias, "none", True, rows))
                 for rows in (128, 256)]
    print(f"bias + GeLU backward, [{tokens}, 3072] bf16; floor {floor_ms:.3f} ms")
    for label, run in variants:
        milliseconds = gpu_time_ms(run)
        print(f"  {label:<36}{milliseconds:>8.3f} ms  {milliseconds / floor_ms:.2f}x floor", flush=True)


def loss_launches(text: str) -> list:
    """``--loss-launches``: ``sweep`` (blocks x warps x both orders), ``;``-separated launches, or
    nothing (the kernels' own)."""
    from ckptkit.kernels import fused
    if not text:
        return [fused.LOSS_KERNEL_LAUNCH]
    if text != "sweep":
        return [fused.LossKernelLaunch.parse(item) for item in text.split(";")]
    return [fused.LossKernelLaunch(block, warps, backwards) for block in (2048, 4096, 8192, 16384)
            for warps in (4, 8, 16, 32) for backwards in (False, True)]


def gemm_shapes(tokens: int):
    """(name, M, N, K) of every matrix product in one GPT-2 124M training step, per layer or once."""
    hidden, ffn, vocab = 768, 3072, 50304
    shapes = []
    for name, inputs, outputs in (("qkv", hidden, 3 * hidden), ("proj", hidden, hidden), ("fc1", hidden, ffn),
                                  ("fc2", ffn, hidden), ("head", hidden, vocab)):
        shapes += [(f"{name} fwd", tokens, outputs, inputs), (f"{name} dgrad", tokens, inputs, outputs),
                   (f"{name} wgrad", outputs, inputs, tokens)]
    return shapes


def time_matmuls(tokens: int) -> None:
    """cuBLAS time of each matrix product of a step (bf16), and the weight gradient accumulated into a float32
    buffer three ways: bf16 product then add (what the trainer's hook does), the product written in float32
    (``out_dtype``), and accumulated in place by ``addmm(main_grad, ..., out_dtype=float32, out=main_grad)``."""
    print(f"matrix products, bf16, {tokens} tokens")
    print(f"{'product':<14}{'M':>7}{'N':>7}{'K':>7}{'ms':>9}{'TFLOP/s':>9}")
    total_ms = 0.0
    for name, m, n, k in gemm_shapes(tokens):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        milliseconds = gpu_time_ms(lambda: torch.mm(a, b))
        per_step = milliseconds * (1 if name.startswith("head") else 12)
        total_ms += per_step
        print(f"{name:<14}{m:>7}{n:>7}{k:>7}{milliseconds:>9.3f}{2 * m * n * k / milliseconds / 1e9:>9.0f}")
    print(f"all products of one step (12 layers + head): {total_ms:.2f} ms")
    for name, m, n, k in gemm_shapes(tokens):
        if not name.endswith("wgrad") or name.startswith("head"):
            continue
        grad_out_t = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        inputs = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        main_grad = torch.zeros(m, n, device="cuda", dtype=torch.float32)
        runs = {"bf16 mm + add_": lambda: main_grad.add_(torch.mm(grad_out_t, inputs)),
                "mm out_dtype fp32 + add_": lambda: main_grad.add_(torch.mm(grad_out_t, inputs,
                                                                            out_dtype=torch.float32)),
                "addmm into main_grad": lambda: torch.addmm(main_grad, grad_out_t, inputs, out_dtype=torch.float32,
                                                            out=main_grad)}
        for label, run in runs.items():
            try:
                print(f"  {name:<12}{label:<26}{gpu_time_ms(run):>9.3f} ms")
            except Exception as error:  # out_dtype is recent: say so and go on
                print(f"  {name:<12}{label:<26} failed: {type(error).__name__}: {str(error)[:160]}")


def time_attention(batch: int, seq: int = 1024, heads: int = 12, head_dim: int = 64) -> None:
    """Causal SDPA forward + backward, bf16, per backend. FLOP/s count the causal half only:
    forward 2 x 2 x b x h x s^2 x d / 2, backward 2.5 x that."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    shape = (batch, heads, seq, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    flops = 3.5 * 2 * 2 * batch * heads * seq * seq * head_dim / 2
    print(f"causal attention fwd+bwd, bf16, [{batch}, {heads}, {seq}, {head_dim}]")
    for label, backend in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                           ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run():
            q.grad = k.grad = v.grad = None
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        try:
            if backend is None:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                    run()
                    torch.cuda.synchronize()
                names = sorted({event.name[:80] for event in profile.events()
                                if event.device_type == torch.autograd.DeviceType.CUDA})
                milliseconds = gpu_time_ms(run)
            else:
                with sdpa_kernel([backend]):
                    milliseconds = gpu_time_ms(run)
                names = []
            print(f"  {label:<10}{milliseconds:>8.3f} ms {flops / milliseconds / 1e9:>6.0f} TFLOP/s  "
                  + " | ".join(names))
        except Exception as error:
            print(f"  {label:<10} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--matmuls", action="store_true",
                        help="instead: time the step's matrix products and causal attention (per SDPA backend)")
    parser.add_argument("--loss", action="store_true",
                        help="instead: only the output layer's loss+grad kernel, for each of --loss-launches")
    parser.add_argument("--gelu", action="store_true",
                        help="instead: only the bias + GeLU backward, from x or from the saved derivative, "
                             "looping over 64-512 rows per program")
    parser.add_argument("--loss-launches", default="",
                        help="'sweep' (blocks 2048-16384 x 4-32 warps x both orders) or ';'-separated "
                             "BLOCK,WARPS,forwards|backwards (default: the kernels' own launch)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (none found)")
        return 0
    if args.gelu:
        time_gelu_backward(args.tokens, copy_bandwidth())
        return 0
    if args.loss:
        bandwidth = copy_bandwidth()
        print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:,.0f} GB/s  tokens {args.tokens}")
        time_loss_and_grad_kernel(args.tokens, bandwidth, loss_launches(args.loss_launches))
        return 0
    if args.matmuls:
        time_matmuls(args.tokens)
        time_attention(max(1, args.tokens // 1024))
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
    if kernels.fused_available():
        time_loss_and_grad_kernel(args.tokens, bandwidth, loss_launches(args.loss_launches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
