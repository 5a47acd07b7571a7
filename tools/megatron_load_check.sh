#!/usr/bin/env bash
# Megatron-LM loads ckptkit's outputs and computes logits.
set -u
# Cases are NAME:FAMILY pairs: checkpoints in .devdata/NAME, tokens in .devdata/FAMILY_tokens.pt.
: "${OUT:=/tmp/megatron-check}"; mkdir -p "$OUT"
export MEGATRON_PATH=$PWD/.devdata/megatron PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
COMMON="--use-checkpoint-args --no-load-optim --no-load-rng --micro-batch-size 2 --seq-length 32 --tokenizer-type NullTokenizer --transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --attention-backend unfused --exit-on-missing-checkpoint"
for case in $CASES; do
  name=${case%%:*}; family=${case##*:}
  extra=""; [ "$family" = llama ] && extra="--bf16 --no-rope-fusion"; case $name in *dist*) extra="$extra --ckpt-format torch_dist";; *) extra="$extra --ckpt-format torch";; esac
  echo "== $name"
  timeout 300 torchrun --nproc-per-node 1 --master-port 29511 tools/megatron_logits.py --load .devdata/$name --tokens-file .devdata/${family}_tokens.pt --logits-out $OUT/${name}_logits.pt --vocab-size 1000 $COMMON $extra > /tmp/${name}.log 2>&1; echo "rc=$?"; cat /tmp/${name}.log >> $OUT/all.log
  grep -iE "error|missing|unexpected" /tmp/${name}.log | head -5; tail -n 3 /tmp/${name}.log
done
