"""``ckptkit inspect``: a checkpoint's layout, family, parallel sizes and tensors (over ``ckptkit.inspection``)."""
from __future__ import annotations

import click
from rich.table import Table

from .shell import emit_json, handle_errors, source_options, stdout


@click.command("inspect")
@click.argument("checkpoint", type=click.Path(exists=False))
@click.option("--tensors/--no-tensors", default=True, help="List every tensor and its partitioning.")
@source_options
@handle_errors
def inspect_command(checkpoint, tensors, strict, trust_remote_pickle, as_json):
    """Show a checkpoint's layout, family, parallel sizes, iteration, dtype, optimizer state and tensors.

    \b
    Example:
      ckptkit inspect checkpoints/gpt2/ --json
    """
    from ..inspection import inspect_checkpoint

    info = inspect_checkpoint(checkpoint, strict=strict, trust_remote_pickle=trust_remote_pickle)
    if as_json:
        emit_json(info.to_dict())
        return
    layout = info.layout
    summary = Table(title=str(checkpoint), show_header=False)
    for key, value in [("layout", layout["layout"]), ("naming", layout.get("naming")),
                       ("family", f"{info.family} ({info.architecture or 'no Hugging Face class'})"),
                       ("parallel", f"TP={layout['tp']} PP={layout['pp']} VPP={layout['vpp']}"
                                    + (f" EP={layout['ep']} ETP={layout['etp']}" if info.spec["num_experts"] else "")),
                       ("iteration", "release" if layout.get("release") else layout.get("iteration")),
                       ("checkpoint_version", layout.get("checkpoint_version")), ("dtype", layout["dtype"]),
                       ("parameters", f"{info.num_parameters:,}"),
                       ("padded vocab", layout.get("padded_vocab_size")),
                       ("optimizer", info.optimizer.describe() if info.optimizer else None)]:
        if value is not None:
            summary.add_row(key, str(value))
    spec = info.spec
    summary.add_row("model", _model_kind(spec))
    summary.add_row("architecture", f"{spec['num_layers']} layers, hidden {spec['hidden_size']}, "
                    f"{spec['num_attention_heads']} heads / {spec['num_query_groups']} groups, ffn "
                    f"{spec['ffn_hidden_size']}, vocab {spec['vocab_size']}, {spec['normalization']}, "
                    f"{spec['activation']}, {spec['position_embedding']}, "
                    f"{'tied' if spec['tied_embeddings'] else 'untied'} embeddings")
    if spec["num_experts"]:
        summary.add_row("experts", f"{spec['num_experts']} of ffn {spec['moe_ffn_hidden_size']}, top-"
                        f"{spec['moe_router_topk']}" + (f", shared expert of ffn {spec['moe_shared_expert_size']}"
                                                          if spec["moe_shared_expert_size"] else ""))
        for ep_rank, (first, last) in enumerate(info.experts_per_ep_rank):
            summary.add_row(f"EP rank {ep_rank}", f"experts {first}-{last}" if last > first else f"expert {first}")
    stdout.print(summary)
    if tensors:
        table = Table(title="tensors")
        table.add_column("name", overflow="fold", min_width=24)
        columns = ("shape", "partition", "per TP rank") + (("EP rank",) if info.experts_per_ep_rank else ())
        for column in columns:
            table.add_column(column)
        for tensor in info.tensors:
            row = [tensor.name, str(list(tensor.shape)), tensor.rule, str(list(tensor.shard_shape))]
            if info.experts_per_ep_rank:
                row.append("" if tensor.ep_rank is None else str(tensor.ep_rank))
            table.add_row(*row)
        stdout.print(table)


def _model_kind(spec: dict) -> str:
    """Which Megatron model: ``encoder (BertModel): binary head, 2 token types, MLM head``."""
    if spec["model_kind"] == "encoder_decoder":
        return (f"encoder-decoder (T5Model): {spec['encoder_num_layers']} encoder layers, {spec['num_layers']} "
                "decoder layers with cross-attention" + (", output bias" if spec["output_layer_bias"] else ""))
    if spec["model_kind"] == "encoder":
        heads = [what for present, what in ((spec["binary_head"], "pooler and binary head"),
                                            (spec["num_tokentypes"], f"{spec['num_tokentypes']} token types"),
                                            (spec["lm_head_transform"], "MLM head transform"),
                                            (spec["output_layer_bias"], "output bias")) if present]
        return "encoder (BertModel): " + ", ".join(heads)
    return "decoder (GPTModel)"


COMMANDS = (inspect_command,)
