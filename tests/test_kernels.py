"""Fused kernels and their PyTorch fallbacks compute the float64 reference.

The Triton tests need a CUDA GPU and Triton; they skip cleanly without them. The
fallback tests run everywhere.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ckptkit import kernels
from ckptkit.kernels import reference

needs_triton = pytest.mark.skipif(not kernels.fused_available(), reason="needs a CUDA GPU and Triton")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def random(*shape, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def forward_and_grads(function, inputs, grad_output_seed=99):
    """Output and input gradients of ``function`` for a fixed random output gradient."""
    leaves = [tensor.detach().clone().requires_grad_(tensor.is_floating_point()) for tensor in inputs]
    output = function(*leaves)
    grad_output = random(*output.shape, dtype=output.dtype, device=output.device, seed=grad_output_seed)
    output.backward(grad_output)
    return output.detach(), [leaf.grad for leaf in leaves if leaf.requires_grad]


def assert_close_to_float64(function_under_test, float64_function, inputs, dtype):
    """Compare in float64: the reference runs on float64 copies of the (rounded) inputs."""
    ours, our_grads = forward_and_grads(function_under_test, inputs)
    widened = [tensor.double().cpu() if tensor.is_floating_point() else tensor.cpu() for tensor in inputs]
    expected, expected_grads = forward_and_grads(float64_function, widened)
    tolerance = TOLERANCE[dtype]
    scale = lambda tensor: max(1.0, tensor.abs().max().item())
    assert (ours.double().cpu() - expected).abs().max().item() < tolerance * scale(expected)
    for mine, theirs in zip(our_grads, expected_grads):
        assert (mine.double().cpu() - theirs).abs().max().item() < tolerance * scale(theirs)


def float64_layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def float64_rms_norm(x, weight, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def float64_gelu(x, bias, approximate):
    z = x + bias
    if approximate == "tanh":
        return 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3)))
    return 0.5 * z * (1 + torch.erf(z / 2 ** 0.5))


def float64_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]


def float64_cross_entropy(logits, target):
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------- fallbacks (CPU)

def test_fallbacks_are_used_when_fused_kernels_are_asked_for_on_cpu():
    x, weight = random(4, 16, dtype=torch.float32), random(16, dtype=torch.float32, seed=1)
    assert torch.equal(kernels.rms_norm(x, weight, 1e-5, fused=True), reference.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_bias_gelu_matches_float64(approximate):
    inputs = [random(8, 32, dtype=torch.float32), random(32, dtype=torch.float32, seed=1)]
    assert_close_to_float64(lambda x, b: reference.bias_gelu(x, b, approximate),
                            lambda x, b: float64_gelu(x, b, approximate), inputs, torch.float32)


def test_reference_norms_match_float64():
    x, weight, bias = random(8, 48, dtype=torch.float32), random(48, dtype=torch.float32, seed=1), \
        random(48, dtype=torch.float32, seed=2)
    assert_close_to_float64(lambda *a: reference.layer_norm(*a, 1e-5), float64_layer_norm, [x, weight, bias],
                            torch.float32)
    assert_close_to_float64(lambda *a: reference.rms_norm(*a, 1e-5), float64_rms_norm, [x, weight], torch.float32)


def test_reference_rope_is_hf_llama_rotary_embedding():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    query, key = random(2, 5, 4, 8, dtype=torch.float32), random(2, 5, 2, 8, dtype=torch.float32, seed=1)
    cos, sin = kernels.rope_tables(5, 8, 10000.0)
    hf_query, hf_key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos[None], sin[None])
    assert torch.allclose(reference.apply_rope(query, cos, sin), hf_query.transpose(1, 2), atol=1e-6)
    assert torch.allclose(reference.apply_rope(key, cos, sin), hf_key.transpose(1, 2), atol=1e-6)


def test_reference_cross_entropy_matches_float64():
    logits, target = random(6, 50, dtype=torch.float32, scale=3.0), torch.randint(0, 50, (6,))
    assert_close_to_float64(lambda x, t: reference.cross_entropy(x, t), float64_cross_entropy, [logits, target],
                            torch.float32)


def float64_linear_cross_entropy(x, weight, target):
    return float64_cross_entropy(x @ weight.t(), target)


def test_reference_linear_cross_entropy_matches_float64():
    x, weight = random(2, 3, 16, dtype=torch.float32), random(50, 16, dtype=torch.float32, seed=1, scale=0.5)
    target = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(0))
    assert_close_to_float64(lambda *a: reference.linear_cross_entropy(*a), float64_linear_cross_entropy,
                            [x, weight, target], torch.float32)


def adam_state(size=3000, device="cpu", param_dtype=torch.float32):
    """Random flat AdamW state (some steps in) with every other weight decayed."""
    generator = torch.Generator().manual_seed(5)
    master = torch.randn(size, generator=generator)
    state = {"param": master.to(param_dtype), "master": master,
             "exp_avg": torch.randn(size, generator=generator) * 1e-2,
             "exp_avg_sq": torch.rand(size, generator=generator) * 1e-4,
             "grad": torch.randn(size, generator=generator) * 1e-1, "decay": torch.arange(size) % 2 == 0}
    return {name: tensor.to(device) for name, tensor in state.items()}


ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def test_reference_adam_step_is_torch_adamw_with_decay_only_where_flagged():
    state = adam_state()
    weights = state["master"].clone().requires_grad_()
    decayed, kept = torch.nn.Parameter(weights[state["decay"]].detach()), \
        torch.nn.Parameter(weights[~state["decay"]].detach())
    adamw = torch.optim.AdamW([{"params": [decayed]}, {"params": [kept], "weight_decay": 0.0}], lr=ADAM["lr"],
                              betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"], weight_decay=ADAM["weight_decay"])
    state["exp_avg"].zero_(), state["exp_avg_sq"].zero_()
    for step in (1, 2, 3):
        gradient = random(state["grad"].numel(), dtype=torch.float32, seed=10 + step)
        decayed.grad, kept.grad = gradient[state["decay"]].clone(), gradient[~state["decay"]].clone()
        adamw.step()
        reference.adam_step(**{**state, "grad": gradient}, grad_scale=None, step=step, **ADAM)
    # torch multiplies by (1 - lr x decay) where we subtract lr x decay x w: a few float32 steps apart.
    assert torch.allclose(state["master"][state["decay"]], decayed.detach(), rtol=1e-6, atol=0)
    assert torch.equal(state["master"][~state["decay"]], kept.detach())
    assert torch.equal(state["param"], state["master"])


# ---------------------------------------------------------------------------- Triton (GPU)

DTYPES = [torch.float32, torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_bias_gelu_matches_float64(dtype, approximate):
    inputs = [random(64, 3072, dtype=dtype, device="cuda"), random(3072, dtype=dtype, device="cuda", seed=1)]
    assert_close_to_float64(lambda x, b: kernels.bias_gelu(x, b, approximate, fused=True),
                            lambda x, b: float64_gelu(x, b, approximate), inputs, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [768, 1000])
def test_fused_layer_norm_forward_and_backward_match_float64(dtype, width):
    inputs = [random(300, width, dtype=dtype, device="cuda", scale=2.0), random(width, dtype=dtype, device="cuda", seed=1),
              random(width, dtype=dtype, device="cuda", seed=2)]
    assert_close_to_float64(lambda *a: kernels.layer_norm(*a, 1e-5, fused=True), float64_layer_norm, inputs, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [768, 1000])
def test_fused_rms_norm_forward_and_backward_match_float64(dtype, width):
    inputs = [random(300, width, dtype=dtype, device="cuda", scale=2.0), random(width, dtype=dtype, device="cuda", seed=1)]
    assert_close_to_float64(lambda *a: kernels.rms_norm(*a, 1e-5, fused=True), float64_rms_norm, inputs, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_fused_rope_forward_and_backward_match_float64(dtype, head_dim):
    cos, sin = kernels.rope_tables(128, head_dim, 10000.0, device="cuda")
    x = random(2, 128, 6, head_dim, dtype=dtype, device="cuda")
    ours, our_grads = forward_and_grads(lambda t: kernels.apply_rope(t, cos, sin, fused=True), [x])
    expected, expected_grads = forward_and_grads(lambda t: float64_rope(t, cos.double().cpu(), sin.double().cpu()),
                                                 [x.double().cpu()])
    assert (ours.double().cpu() - expected).abs().max().item() < TOLERANCE[dtype] * 4
    assert (our_grads[0].double().cpu() - expected_grads[0]).abs().max().item() < TOLERANCE[dtype] * 4


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1000, 50304])
def test_fused_cross_entropy_forward_and_backward_match_float64(dtype, vocab):
    logits = random(64, vocab, dtype=dtype, device="cuda", scale=4.0)
    target = torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(0)).cuda()
    assert_close_to_float64(lambda x, t: kernels.cross_entropy(x, t, fused=True), float64_cross_entropy,
                            [logits, target], dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1000, 50304])
def test_fused_linear_cross_entropy_forward_and_backward_match_float64(dtype, vocab):
    # The output gradient is random per token (not the trainer's uniform 1 / tokens), so the
    # per-row scaling of the backward products is checked too.
    x = random(2, 32, 64, dtype=dtype, device="cuda")
    weight = random(vocab, 64, dtype=dtype, device="cuda", seed=1, scale=0.5)
    target = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    assert_close_to_float64(lambda *a: kernels.linear_cross_entropy(*a, fused=True), float64_linear_cross_entropy,
                            [x, weight, target], dtype)


@needs_triton
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("param_dtype", DTYPES)
def test_fused_adam_step_matches_the_float64_update_in_one_pass(clipped, param_dtype):
    state = adam_state(device="cuda", param_dtype=param_dtype)
    scale = torch.tensor(0.25) if clipped else None
    wide = {name: tensor.double().cpu() if tensor.is_floating_point() else tensor.cpu() for name, tensor in state.items()}
    reference.adam_step(**wide, grad_scale=None if scale is None else scale.double(), step=7, **ADAM)
    kernels.adam_step(**state, grad_scale=None if scale is None else scale.cuda(), step=7, fused=True, **ADAM)
    for name in ("master", "exp_avg", "exp_avg_sq"):  # float32 rounding of each tensor's scale
        error = (state[name].double().cpu() - wide[name]).abs().max().item()
        assert error < 1e-6 * wide[name].abs().max().item(), name
    # The low-precision weights are the new masters rounded to their dtype.
    assert torch.equal(state["param"], state["master"].to(param_dtype))


@needs_triton
@pytest.mark.parametrize("param_dtype", DTYPES)
def test_fused_adam_step_reading_its_schedule_from_device_memory_is_the_same_update(param_dtype):
    by_arguments, from_memory = adam_state(device="cuda", param_dtype=param_dtype), \
        adam_state(device="cuda", param_dtype=param_dtype)
    scale = torch.tensor(0.25, device="cuda")
    kernels.adam_step(**by_arguments, grad_scale=scale, step=7, fused=True, **ADAM)
    numbers = kernels.adam_schedule(ADAM["lr"], ADAM["beta1"], ADAM["beta2"], ADAM["weight_decay"], 7)
    schedule = torch.tensor(numbers, dtype=torch.float32, device="cuda")
    # lr and step given here are wrong on purpose: the kernel must take the schedule's numbers.
    kernels.adam_step(**from_memory, grad_scale=scale, fused=True, schedule=schedule,
                      **{**ADAM, "lr": 5.0}, step=1)
    for name in ("param", "master", "exp_avg", "exp_avg_sq"):
        assert torch.equal(by_arguments[name], from_memory[name]), name


@needs_triton
@pytest.mark.parametrize("grad_dtype", DTYPES)
def test_fused_gradient_accumulator_adds_every_gradient_as_one_add_per_tensor(grad_dtype):
    # 19 tensors (three launches of up to eight), sizes around the 4096-element chunk, two without a gradient.
    numels = [1, 7, 4095, 4096, 4097, 12288, 3, 768, 50000, 2, 9000, 1, 4096, 64, 5, 8193, 100, 17, 30000]
    offsets = [sum(numels[:index]) for index in range(len(numels))]
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(sum(numels), generator=generator).cuda()
    grads = [torch.randn(numel, generator=generator).to("cuda", grad_dtype) for numel in numels]
    grads[4] = grads[11] = None
    ours, expected = start.clone(), start.clone()
    fused = kernels.gradient_accumulator(numels, offsets, ours, fused=True)
    assert type(fused).__module__.endswith("fused")
    for _ in range(2):
        fused.add(grads)
        reference.GradientAccumulator(numels, offsets, expected).add(grads)
    assert torch.equal(ours, expected)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(300, 1000), (5, 7, 3072)])
def test_fused_bias_gelu_one_pass_backward_on_partial_tiles_matches_float64(dtype, shape):
    # Rows and columns that do not fill the backward's programs (256 rows of 128 features).
    inputs = [random(*shape, dtype=dtype, device="cuda"), random(shape[-1], dtype=dtype, device="cuda", seed=1)]
    assert_close_to_float64(lambda x, b: kernels.bias_gelu(x, b, "none", fused=True),
                            lambda x, b: float64_gelu(x, b, "none"), inputs, dtype)


@needs_triton
@pytest.mark.parametrize("launch", ["4096,4,forwards", "2048,8,backwards", "8192,16,forwards", "16384,32,backwards"])
def test_fused_loss_kernel_gives_float64_losses_and_gradients_however_it_is_launched(launch):
    from ckptkit.kernels import fused
    logits = random(3000, 50304 // 8, dtype=torch.bfloat16, device="cuda", scale=4.0)
    target = torch.randint(0, logits.shape[1], (3000,), generator=torch.Generator().manual_seed(0)).cuda()
    exact = logits.double()
    expected_loss = torch.logsumexp(exact, 1) - exact.gather(1, target[:, None])[:, 0]
    expected_grad = torch.softmax(exact, 1) - torch.nn.functional.one_hot(target, logits.shape[1]).double()
    loss = torch.empty(3000, device="cuda")
    fused.cross_entropy_loss_and_grad(logits, target, loss, fused.LossKernelLaunch.parse(launch))
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits, expected_grad.to(torch.bfloat16), rtol=0, atol=2 ** -8)


@needs_triton
def test_fused_loss_kernel_walking_its_second_pass_backwards_writes_the_same_bits():
    from ckptkit.kernels import fused
    forwards = random(300, 50304 // 8, dtype=torch.bfloat16, device="cuda", scale=4.0)
    backwards = forwards.clone()
    target = torch.randint(0, forwards.shape[1], (300,), generator=torch.Generator().manual_seed(0)).cuda()
    losses = torch.empty(2, 300, device="cuda")
    fused.cross_entropy_loss_and_grad(forwards, target, losses[0], fused.LossKernelLaunch(1024, 4, False))
    fused.cross_entropy_loss_and_grad(backwards, target, losses[1], fused.LossKernelLaunch(1024, 4, True))
    assert torch.equal(losses[0], losses[1]) and torch.equal(forwards, backwards)


def test_a_loss_kernel_launch_reads_as_it_is_written():
    fused = pytest.importorskip("ckptkit.kernels.fused", exc_type=ImportError)
    assert str(fused.LossKernelLaunch.parse("8192,16,backwards")) == "8192,16,backwards"
    with pytest.raises(ValueError, match="'forwards' or 'backwards'"):
        fused.LossKernelLaunch.parse("8192,16,sideways")


@needs_triton
def test_fused_row_scaling_of_the_loss_backward_is_the_float32_product_rounded_once():
    from ckptkit.kernels import fused
    x, scale = random(300, 1000, dtype=torch.bfloat16, device="cuda"), torch.rand(300, device="cuda")
    assert torch.equal(fused._scale_rows(x, scale), (x.float() * scale[:, None]).to(torch.bfloat16))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("from_derivative", [False, True])
@pytest.mark.parametrize("rows_per_program", [32, 256])
def test_fused_bias_gelu_backward_looping_over_rows_matches_float64(dtype, from_derivative, rows_per_program):
    from ckptkit.kernels import fused
    x, bias = random(300, 1000, dtype=dtype, device="cuda"), random(1000, dtype=dtype, device="cuda", seed=1)
    grad = random(300, 1000, dtype=dtype, device="cuda", seed=2)
    out, derivative = fused.bias_gelu_and_derivative(x, bias, "none")
    grad_x, grad_bias = fused.bias_gelu_backward_rows(grad, derivative if from_derivative else x, bias, "none",
                                                      from_derivative, rows_per_program)
    wide_x, wide_bias = x.double().cpu().requires_grad_(), bias.double().cpu().requires_grad_()
    expected = float64_gelu(wide_x, wide_bias, "none")
    expected.backward(grad.double().cpu())
    for ours, theirs in ((out, expected.detach()), (grad_x, wide_x.grad), (grad_bias, wide_bias.grad)):
        assert (ours.double().cpu() - theirs).abs().max().item() < TOLERANCE[dtype] * max(1.0, theirs.abs().max().item())


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_operator_backward_from_the_saved_derivative_matches_float64(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "GELU_OPERATOR_BACKWARD_FROM", "derivative")
    inputs = [random(5, 7, 3072, dtype=dtype, device="cuda"), random(3072, dtype=dtype, device="cuda", seed=1)]
    assert_close_to_float64(lambda x, b: kernels.bias_gelu_operator(x, b, "none"),
                            lambda x, b: float64_gelu(x, b, "none"), inputs, dtype)


@needs_triton
def test_fused_cross_entropy_statistics_combine_over_vocabulary_slices_like_megatron():
    from ckptkit.kernels.fused import cross_entropy_partial_stats

    logits = random(32, 1024, dtype=torch.float32, device="cuda", scale=4.0)
    target = torch.randint(0, 1024, (32,), generator=torch.Generator().manual_seed(0)).cuda()
    slices = [cross_entropy_partial_stats(piece.contiguous(), target - start)
              for start, piece in zip((0, 512), logits.split(512, dim=-1))]
    # What the all-reduces of combine_partial_stats compute across two tensor-parallel ranks:
    global_max = torch.maximum(slices[0][0], slices[1][0])
    total = sum(s[1] * torch.exp(s[0] - global_max) for s in slices)
    loss = torch.log(total) + global_max - (slices[0][2] + slices[1][2])
    expected = float64_cross_entropy(logits.double().cpu(), target.cpu())
    assert (loss.double().cpu() - expected).abs().max().item() < 1e-5
