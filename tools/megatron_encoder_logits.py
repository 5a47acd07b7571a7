"""Load a BERT or T5 checkpoint with real Megatron-LM and save the logits it computes for the
fixed inputs of tools/megatron_encoder_common.fixed_inputs.

    MEGATRON_PATH=/path/to/Megatron-LM torchrun --nproc-per-node N \
        tools/megatron_encoder_logits.py bert --load CKPT --logits-out logits.pt \
        <the model's Megatron arguments> --tensor-model-parallel-size T --pipeline-model-parallel-size P

The model is built by Megatron's own provider (examples/bert/pretrain_bert.py or
examples/t5/pretrain_t5.py; the root pretrain_bert.py of 2024 versions, which also builds the
pre-Core ``megatron.legacy.model.BertModel`` under --use-legacy-models), the checkpoint is read
by Megatron's ``load_checkpoint`` (strict), and the batch goes through the example's own
``get_batch`` (which, for T5, turns the token ids into Megatron's attention masks). The forward
pass runs through Megatron's forward-only pipeline schedule, so any TP/PP layout loads: per-rank
(--ckpt-format torch) files at the layout that wrote them, torch_dist at any layout. The last
stage gathers the vocabulary-parallel logits over its tensor-parallel group and its first
tensor- and data-parallel rank writes the file:

    bert: {"model": "bert", "tokens", "types", "padding_mask": LongTensor[2, 32],
           "mlm_logits": FloatTensor[2, 32, padded_vocab], "binary_logits": FloatTensor[2, 2] or None,
           "layout": "TP2 PP2", "load": CKPT, "iteration": int}
    t5:   {"model": "t5", "encoder_tokens": LongTensor[2, 32], "decoder_tokens": LongTensor[2, 16],
           "encoder_mask", "decoder_mask", "encoder_decoder_mask": BoolTensor[2, 1, q, k] (True = may
           NOT attend, as Megatron builds them), "logits": FloatTensor[2, 16, padded_vocab], ...}
"""
import sys

import torch

from megatron_encoder_common import (MEGATRON_PATH, MODELS, fixed_inputs, has_argument_parsing_of_its_own,
                                     import_training_script)

sys.path.insert(0, str(MEGATRON_PATH))
from megatron.core import mpu  # noqa: E402
from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region  # noqa: E402
from megatron.training import get_args, get_model  # noqa: E402
from megatron.training.checkpointing import load_checkpoint  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402

# Set by main() (or use_model()); nothing model-specific runs at import, so that a process
# Megatron spawns can re-import this module (as tools/megatron_encoder_pretrain.py must).
MODEL = None
example = None


def use_model(model: str) -> None:
    """Pick bert or t5 and import Megatron's training script for it."""
    global MODEL, example
    MODEL, example = model, import_training_script(model)


def add_arguments(parser):
    group = parser.add_argument_group("ckptkit encoder logits")
    group.add_argument("--logits-out", required=True)
    return parser


def initialize():
    defaults = {"tokenizer_type": "NullTokenizer"}
    if not has_argument_parsing_of_its_own():
        initialize_megatron(extra_args_provider=add_arguments, args_defaults=defaults)
        return
    from megatron.training.arguments import parse_and_validate_args
    parse_and_validate_args(extra_args_provider=add_arguments, args_defaults=defaults)
    extra = {}
    if MODEL == "t5":
        extra = {"get_embedding_ranks": example.t5_embedding_ranks,
                 "get_position_embedding_ranks": example.t5_position_embedding_ranks}
    initialize_megatron(**extra)


def batch_of(inputs: dict) -> dict:
    """The dict the example's get_batch reads, with the keys it needs but we do not (labels,
    loss mask, sentence order) filled with harmless values."""
    if MODEL == "bert":
        tokens = inputs["tokens"]
        return {"text": tokens, "types": inputs["types"], "labels": tokens, "is_random": torch.zeros(2, dtype=torch.long),
                "loss_mask": inputs["padding_mask"], "padding_mask": inputs["padding_mask"]}
    encoder, decoder = inputs["encoder_tokens"], inputs["decoder_tokens"]
    return {"text_enc": encoder, "text_dec": decoder, "labels": decoder, "loss_mask": (decoder > 0).long(),
            "enc_mask": (encoder > 0).long(), "dec_mask": (decoder > 0).long()}


def megatron_logits(model: list, inputs: dict, args) -> dict | None:
    """Run INPUTS through MODEL (the list get_model returns) with Megatron's forward-only schedule;
    on the last pipeline stage return the saved dict (logits gathered over tensor parallelism),
    elsewhere None."""
    saved = {"model": MODEL, **inputs}
    outputs = []

    def forward_step(data_iterator, chunk):
        if MODEL == "bert":
            tokens, types, _, _, _, padding_mask = example.get_batch(data_iterator)
            output = chunk(tokens, padding_mask, tokentype_ids=types if args.bert_binary_head else None)
        else:
            tokens_enc, tokens_dec, _, _, enc_mask, dec_mask, enc_dec_mask = example.get_batch(
                data_iterator, args.transformer_impl == "local")
            saved.update(encoder_mask=enc_mask.cpu(), decoder_mask=dec_mask.cpu(), encoder_decoder_mask=enc_dec_mask.cpu())
            output = chunk(tokens_enc, tokens_dec, enc_mask, dec_mask, enc_dec_mask)

        def keep(output_tensor, non_loss_data=False):
            outputs.append(output_tensor)
            return output_tensor
        return output, keep

    batch = batch_of(inputs)
    decoder_length = inputs["decoder_tokens"].shape[1] if MODEL == "t5" else None
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=model, num_microbatches=1,
            seq_length=batch["text" if MODEL == "bert" else "text_enc"].shape[1], micro_batch_size=2,
            decoder_seq_length=decoder_length, forward_only=True, collect_non_loss_data=True)
    if not mpu.is_pipeline_last_stage():
        return None
    if MODEL == "bert":
        logits, binary_logits = outputs[0]
        saved["binary_logits"] = None if binary_logits is None else binary_logits.float().cpu()
        key = "mlm_logits"
    else:
        logits, key = outputs[0], "logits"
    saved[key] = gather_from_tensor_model_parallel_region(logits.float()).cpu()
    saved.update(layout=f"TP{args.tensor_model_parallel_size} PP{args.pipeline_model_parallel_size}",
                 load=args.load, padded_vocab_size=args.padded_vocab_size, vocab=args.vocab_size,
                 params_dtype=str(args.params_dtype))
    return saved


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in MODELS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(MODELS)}}} --load CKPT --logits-out FILE MEGATRON_ARGS...")
    use_model(sys.argv.pop(1))
    initialize()
    args = get_args()
    model = get_model(example.model_provider, ModelType.encoder_or_decoder, wrap_with_ddp=False)
    iteration = load_checkpoint(model, None, None, strict=True)
    print(f"loaded checkpoint (iteration {iteration})")
    for chunk in model:
        chunk.eval()
    saved = megatron_logits(model, fixed_inputs(MODEL, args.vocab_size), args)
    if saved is not None and mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0:
        saved["iteration"] = iteration
        key = "mlm_logits" if MODEL == "bert" else "logits"
        torch.save(saved, args.logits_out)
        print(f"saved logits {key} {tuple(saved[key].shape)} at {saved['layout']} to {args.logits_out}")


if __name__ == "__main__":
    main()
