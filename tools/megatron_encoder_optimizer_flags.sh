# Megatron-LM flags of the BERT and T5 checkpoints with optimizer state, in one place for
# tools/megatron_encoder_optimizer.sh (which makes them and their resume baselines) and
# tools/megatron_encoder_resume.sh (which resumes ckptkit's reshards of them).
# Sourced by bash; defines arrays and one function only.
#
# Tiny models, so that each checkpoint with its optimizer state stays well under 1 MB: padded
# vocabulary 256 (NullTokenizer 200 ids), hidden 32; bf16, dropout 0, fusions off (no
# Transformer Engine or apex on the machines used).
OPT_FUSIONS_OFF=(--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion)
OPT_COMMON=(--tokenizer-type NullTokenizer --vocab-size 200 --hidden-size 32 --num-attention-heads 4
  --ffn-hidden-size 64 --init-method-std 0.05 --hidden-dropout 0 --attention-dropout 0 --bf16
  "${OPT_FUSIONS_OFF[@]}")
# Core BertModel with the local layer spec (BertModel accepts only the local attention backend
# with it: megatron/core/models/bert/bert_model.py); T5Model with its local block specs.
OPT_BERT=(--num-layers 4 --seq-length 32 --max-position-embeddings 32 --spec local --attention-backend local
  "${OPT_COMMON[@]}")
OPT_T5=(--encoder-num-layers 2 --decoder-num-layers 2 --kv-channels 8 --encoder-seq-length 32
  --decoder-seq-length 16 --max-position-embeddings 32 --attention-backend unfused "${OPT_COMMON[@]}")
# The learning-rate schedule does not depend on --train-iters (--lr-decay-iters 20), so a run
# to 15 and one resumed at 10 follow the same schedule.
OPT_TRAIN=(--micro-batch-size 2 --global-batch-size 8 --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine
  --lr-warmup-iters 2 --lr-decay-iters 20 --weight-decay 0.01 --clip-grad 1.0 --seed 42
  --log-interval 1 --eval-iters 0 --eval-interval 1000 --train-iters 15 --no-save-rng)

# Megatron flags of a layout and optimizer, into LAYOUT.
opt_layout_flags() {  # FORMAT TP PP DP DISTRIBUTED SHARDING(- for the default) VPP(empty for none)
  LAYOUT=(--ckpt-format "$1" --tensor-model-parallel-size "$2" --pipeline-model-parallel-size "$3")
  [ "$5" = 1 ] && LAYOUT+=(--use-distributed-optimizer)
  [ "$6" = fully_reshardable ] && LAYOUT+=(--dist-ckpt-optim-fully-reshardable)
  [ -n "$7" ] && [ "$7" != - ] && LAYOUT+=(--num-layers-per-virtual-pipeline-stage "$7")
  return 0
}
