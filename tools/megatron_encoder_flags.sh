# Megatron-LM flags of the BERT and T5 fixtures, in one place for tools/megatron_encoder_fixtures.sh
# (which made them) and tools/megatron_encoder_check.sh (which loads ckptkit's rewrites of them).
# Sourced by bash; defines arrays only.
#
# Float32, --transformer-impl local and Megatron's fusions off (no Transformer Engine or apex on
# the machines used), NullTokenizer with 1000 ids (padded vocabulary 1024 up to TP 4).
FUSIONS_OFF=(--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion)
VOCAB=(--tokenizer-type NullTokenizer --vocab-size 1000)
BERT=(--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128
  --max-position-embeddings 64 --init-method-std 0.05 "${VOCAB[@]}" "${FUSIONS_OFF[@]}")
T5=(--encoder-num-layers 2 --decoder-num-layers 2 --hidden-size 64 --num-attention-heads 4
  --kv-channels 16 --ffn-hidden-size 128 --encoder-seq-length 32 --decoder-seq-length 16
  --max-position-embeddings 32 --init-method-std 0.05 "${VOCAB[@]}" "${FUSIONS_OFF[@]}"
  --attention-backend unfused)
TRAIN=(--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 5e-4 --min-lr 5e-5
  --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01 --clip-grad 1.0 --seed 42
  --log-interval 1 --eval-iters 0 --eval-interval 1000 --save-interval 10 --no-save-optim --no-save-rng)
LOAD=(--no-load-optim --no-load-rng --exit-on-missing-checkpoint --micro-batch-size 2)
# Core BertModel with the local layer spec: BertModel accepts only the local (or auto) attention
# backend with that spec (megatron/core/models/bert/bert_model.py). The pre-Core BERT of the 2024
# Megatron-LM: --use-legacy-models (that version has no --attention-backend).
BERT_CORE=("${BERT[@]}" --spec local --attention-backend local)
BERT_LEGACY=("${BERT[@]}" --use-legacy-models)
