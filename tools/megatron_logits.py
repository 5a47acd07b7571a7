"""Load a checkpoint with real Megatron-LM and save the logits it computes for fixed tokens.

This is how ckptkit's Megatron output is checked against Megatron-LM itself: the
checkpoint is loaded by Megatron's own ``load_checkpoint`` (strict), run by its own
``GPTModel``, and the logits are compared with those of the Hugging Face model the
checkpoint came from. Needs a Megatron-LM source tree (``MEGATRON_PATH``) and a GPU;
run under ``torchrun`` (one process per GPU of the layout it loads at):

    MEGATRON_PATH=/path/to/Megatron-LM torchrun --nproc-per-node 1 tools/megatron_logits.py \
        --load ckpt/ --tokens-file tokens.pt --logits-out logits.pt \
        --use-checkpoint-args --no-load-optim --no-load-rng --micro-batch-size 2 --seq-length 32 \
        --tokenizer-type NullTokenizer --transformer-impl local --no-gradient-accumulation-fusion

Per-rank (``--ckpt-format torch``) files load only at the layout that wrote them: an
expert-parallel checkpoint runs with ``--nproc-per-node EP --expert-model-parallel-size EP``
(TP1). Every process then feeds the same tokens (they are data-parallel ranks exchanging tokens
with their expert-parallel peers); the processes' logits are compared and rank 0 saves them.
"""
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.environ["MEGATRON_PATH"])

from gpt_builders import gpt_builder  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import get_args, get_model  # noqa: E402
from megatron.training.checkpointing import load_checkpoint  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402
from model_provider import model_provider  # noqa: E402


def add_arguments(parser):
    group = parser.add_argument_group("ckptkit logits check")
    group.add_argument("--tokens-file", required=True)
    group.add_argument("--logits-out", required=True)
    return parser


def main():
    parse_and_validate_args(extra_args_provider=add_arguments)
    initialize_megatron()
    args = get_args()
    model = get_model(partial(model_provider, gpt_builder), ModelType.encoder_or_decoder, wrap_with_ddp=False)
    load_checkpoint(model, None, None, strict=True)
    tokens = torch.load(args.tokens_file, weights_only=True)["tokens"].cuda()
    batch, length = tokens.shape
    position_ids = torch.arange(length, device=tokens.device).unsqueeze(0).expand(batch, length)
    # Megatron's convention: True marks positions that may NOT be attended to.
    attention_mask = torch.triu(torch.ones(1, 1, length, length, device=tokens.device, dtype=torch.bool), 1)
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        logits = model[0](tokens, position_ids, attention_mask).float().contiguous()
    # With TP > 1 each rank would hold a vocabulary slice; the full-vocabulary file needs TP1.
    assert args.tensor_model_parallel_size == 1, "logits are saved at TP1 only"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        gathered = [torch.empty_like(logits) for _ in range(world)]
        torch.distributed.all_gather(gathered, logits)
        spread = max((g - gathered[0]).abs().max().item() for g in gathered)
        if torch.distributed.get_rank() == 0:
            print(f"ranks agree on the logits to {spread:.3g} max abs ({world} ranks)")
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save({"tokens": tokens.cpu(), "logits": logits.cpu()}, args.logits_out)
        print(f"saved logits {tuple(logits.shape)} to {args.logits_out}")


if __name__ == "__main__":
    main()
