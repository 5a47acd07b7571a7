"""Load a DeepSeek-style checkpoint with real Megatron-LM and save the logits it computes for
fixed tokens: the main head's and, when the model has multi-token prediction layers, each MTP
depth's.

The model is built as tools/megatron_deepseek_local.py explains (Megatron's local spec needs two
build-time changes for MLA and MTP without Transformer Engine). Run under ``torchrun`` with the
Megatron flags of the checkpoint (one process per GPU of the layout it loads at); needs
``MEGATRON_PATH``:

    torchrun --nproc-per-node 2 tools/megatron_deepseek_logits.py --load ckpt/ \
        --tokens-file tokens.pt --logits-out logits.pt [Megatron model flags ...]

Saved: ``{"tokens": [b, s], "logits": [b, s, V], "mtp_logits": [depth, b, s, V] or absent}``.
Megatron's MTP block returns the main hidden states and each depth's, concatenated along the
sequence ([(1 + depth) * s, b, h]); a forward hook on ``model.mtp`` keeps them, and each depth's
logits are the shared output layer applied to its chunk, as Megatron's process_mtp_loss does.
With TP > 1 each rank holds a vocabulary slice (the output layer is column parallel); the
slices are gathered over the tensor-parallel group.
"""
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ["MEGATRON_PATH"])

from gpt_builders import gpt_builder  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.training import get_args, get_model  # noqa: E402
from megatron.training.arguments import parse_and_validate_args  # noqa: E402
from megatron.training.checkpointing import load_checkpoint  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402
from megatron_deepseek_local import build_without_transformer_engine  # noqa: E402
from model_provider import model_provider  # noqa: E402


def add_arguments(parser):
    group = parser.add_argument_group("ckptkit deepseek logits")
    group.add_argument("--tokens-file", required=True)
    group.add_argument("--logits-out", required=True)
    return parser


def gather_vocab(logits):
    """[b, s, V/TP] on each TP rank -> [b, s, V] (TP rank order is vocabulary order)."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(size)]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def main():
    build_without_transformer_engine()
    parse_and_validate_args(extra_args_provider=add_arguments)
    initialize_megatron()
    args = get_args()
    model = get_model(partial(model_provider, gpt_builder), ModelType.encoder_or_decoder, wrap_with_ddp=False)
    load_checkpoint(model, None, None, strict=True)
    gpt = model[0]
    while hasattr(gpt, "module"):
        gpt = gpt.module
    captured = {}
    if getattr(gpt, "mtp", None) is not None:
        gpt.mtp.register_forward_hook(lambda module, inputs, output: captured.update(mtp=output))
    tokens = torch.load(args.tokens_file, weights_only=True)["tokens"].cuda()
    batch, length = tokens.shape
    position_ids = torch.arange(length, device=tokens.device).unsqueeze(0).expand(batch, length)
    # Megatron's convention: True marks positions that may NOT be attended to.
    attention_mask = torch.triu(torch.ones(1, 1, length, length, device=tokens.device, dtype=torch.bool), 1)
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        logits = gather_vocab(model[0](tokens, position_ids, attention_mask).float())
        mtp_logits = None
        if "mtp" in captured:
            chunks = torch.chunk(captured["mtp"], 1 + args.mtp_num_layers, dim=0)
            depth_logits = []
            for hidden in chunks[1:]:
                out, _ = gpt.output_layer(hidden)  # [s, b, V/TP]
                depth_logits.append(gather_vocab(out.transpose(0, 1).float()))
            mtp_logits = torch.stack(depth_logits)
    world = torch.distributed.get_world_size()
    gathered = [torch.empty_like(logits) for _ in range(world)]
    torch.distributed.all_gather(gathered, logits.contiguous())
    spread = max((g - gathered[0]).abs().max().item() for g in gathered)
    if torch.distributed.get_rank() == 0:
        print(f"ranks agree on the logits to {spread:.3g} max abs ({world} ranks)")
        saved = {"tokens": tokens.cpu(), "logits": logits.cpu()}
        if mtp_logits is not None:
            saved["mtp_logits"] = mtp_logits.cpu()
            print(f"mtp logits {tuple(mtp_logits.shape)}")
        torch.save(saved, args.logits_out)
        print(f"saved logits {tuple(logits.shape)} to {args.logits_out}")


if __name__ == "__main__":
    main()
