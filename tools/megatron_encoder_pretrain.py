"""Train a small Megatron-LM BERT or T5 on random batches, with Megatron's own training loop,
model provider and forward step (those of its examples/bert/pretrain_bert.py or
examples/t5/pretrain_t5.py; pretrain_bert.py at the root of 2024 versions). Only the data is
ours: tools/megatron_encoder_common.MockEncoderDataset, since Megatron-LM has no mock dataset for
these models.

    MEGATRON_PATH=/path/to/Megatron-LM torchrun --nproc-per-node 4 \
        tools/megatron_encoder_pretrain.py bert <Megatron's pretraining arguments>

The first argument (bert or t5) picks the model; the rest go to Megatron unchanged. The same
command with ``--load DIR --ckpt-convert-format torch --ckpt-convert-save OUT`` converts a saved
checkpoint the way pretrain_gpt.py does.
"""
import sys

from megatron_encoder_common import (MODELS, MockEncoderDataset, has_argument_parsing_of_its_own,
                                     import_training_script)

# Set by main(). Nothing else runs at import: torch_dist saves start a "spawn" Manager process
# (megatron/core/dist_checkpointing/strategies/filesystem_async.py), which re-imports this
# module as __mp_main__ with the already-shortened sys.argv.
MODEL = None


def mock_datasets_provider(train_valid_test_num_samples, vp_stage=None):
    """Train, valid and test datasets of the sizes Megatron asks for (valid and test may be 0)."""
    from megatron.training import get_args, print_rank_0
    args = get_args()
    vocab = args.vocab_size
    decoder_seq_length = getattr(args, "decoder_seq_length", None)
    datasets = [MockEncoderDataset(MODEL, max(int(n), 1), args.seed + 1000 * split, vocab,
                                   args.seq_length, decoder_seq_length)
                for split, n in enumerate(train_valid_test_num_samples)]
    print_rank_0(f"> mock {MODEL} datasets: {[len(d) for d in datasets]} samples, ids 1..{vocab - 1}")
    return tuple(datasets)


# Every rank builds its own copy: the samples depend only on their index.
mock_datasets_provider.is_distributed = True


def main():
    global MODEL
    MODEL = sys.argv.pop(1) if len(sys.argv) > 1 and sys.argv[1] in MODELS else None
    if MODEL is None:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(MODELS)}}} MEGATRON_ARGS...")
    example = import_training_script(MODEL)
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    extra = {}
    if MODEL == "t5":
        # T5 keeps its word embeddings on the first and last pipeline stages and its position
        # embeddings on the first (examples/t5/pretrain_t5.py).
        extra = {"get_embedding_ranks": example.t5_embedding_ranks,
                 "get_position_embedding_ranks": example.t5_position_embedding_ranks}
    if has_argument_parsing_of_its_own():
        from megatron.training.argument_utils import pretrain_cfg_container_from_args
        from megatron.training.arguments import parse_and_validate_args
        args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
        pretrain(pretrain_cfg_container_from_args(args), mock_datasets_provider,
                 ModelType.encoder_or_decoder, example.forward_step, example.model_provider, **extra)
    else:
        pretrain(mock_datasets_provider, example.model_provider, ModelType.encoder_or_decoder,
                 example.forward_step, args_defaults={"tokenizer_type": "NullTokenizer"}, **extra)


if __name__ == "__main__":
    main()
