# Sourced by tools/make_megatron_deepseek_fixture.sh and tools/megatron_deepseek_check.sh: the
# Megatron-LM flags of the DeepSeek-style models (the fixtures' and the ones ckptkit writes for
# the check are the same models).
#
# Megatron's own fusions off and no Transformer Engine (as tools/make_megatron_moe_fixtures.sh).
IMPL=(--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-persist-layer-norm
  --no-rope-fusion --attention-backend unfused)
COMMON=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --multi-latent-attention
  --kv-lora-rank 32 --qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 16 --kv-channels 16 --qk-layernorm
  --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --position-embedding-type rope
  --rotary-base 10000 --disable-bias-linear --untie-embeddings-and-output-weights
  --max-position-embeddings 64 --init-method-std 0.05 --ffn-hidden-size 128 --moe-layer-freq '[0,1]'
  --moe-token-dispatcher-type alltoall --moe-aux-loss-coeff 0.001
  --tokenizer-type NullTokenizer --vocab-size 1000)
V3=(--q-lora-rank 48 --rope-type yarn --rotary-scaling-factor 4 --mscale 1.0 --mscale-all-dim 1.0
  --num-experts 8 --moe-ffn-hidden-size 16 --moe-router-topk 4 --moe-router-score-function sigmoid
  --moe-router-enable-expert-bias --moe-router-num-groups 4 --moe-router-group-topk 2
  --moe-router-topk-scaling-factor 2.5 --moe-shared-expert-intermediate-size 32
  --moe-router-load-balancing-type seq_aux_loss --mtp-num-layers 1)
V2=(--q-lora-rank 48 --rope-type rope --num-experts 4 --moe-ffn-hidden-size 32 --moe-router-topk 2
  --moe-router-pre-softmax --moe-router-topk-scaling-factor 1.5
  --moe-shared-expert-intermediate-size 64 --moe-router-load-balancing-type aux_loss)
