#!/usr/bin/env bash
# Make real Megatron-LM torch_dist checkpoints with distributed-optimizer state, the fixtures
# tests/fixtures/gpt2do_dist_*.
#
# Megatron-LM (pretrain_gpt.py, --transformer-impl local, float32) trains a tiny GPT-2-style
# model (2 layers, hidden 64, 4 heads, ffn 256, LayerNorm, GELU, learned positions, tied
# embeddings; mock data) with --use-distributed-optimizer for 10 iterations and saves it with
# --ckpt-format torch_dist, optimizer state included. RUNS picks the runs, each
# NAME:GPUS:TP:PP:SHARDING (SHARDING dp_reshardable, Megatron's default, or fully_reshardable,
# --dist-ckpt-optim-fully-reshardable; DP = GPUS / (TP x PP)):
#   tp1dp2_dp_reshardable:2:1:1:dp_reshardable  tp1dp2_fully_reshardable:2:1:1:fully_reshardable
#       (tests/fixtures/gpt2do_dist_tp1dp2/{dp_reshardable,fully_reshardable}: vocabulary 1000)
#   tp2pp2_dp_reshardable:4:2:2:dp_reshardable
#       (tests/fixtures/gpt2do_dist_tp2pp2: VOCAB=250, padded to 256, to keep the files small)
# The runs go side by side on the same GPUs (own ports and process groups).
# The Megatron tree gets the two local fixes tools/megatron_resume_check.sh applies (they
# touch an empty optimizer's state_dict and loading only, neither is on this save's path).
#
# From the repo root, with the packed tree:
#   mkdir -p /tmp/m && tar -xJf .devdata/pack/megatron.tar.xz -C /tmp/m
#   MEGATRON_PATH=/tmp/m/megatron OUT=/tmp/optfix RUNS="tp2pp2_dp_reshardable:4:2:2:dp_reshardable" VOCAB=250 \
#     bash tools/make_megatron_optimizer_fixtures.sh
# Leaves $OUT/NAME.tgz (the checkpoint folder, latest_checkpointed_iteration.txt and
# iter_0000010/) and $OUT/NAME.log for each run.
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/megatron-optimizer-fixtures}"
: "${WORK:=/tmp/megatron-optimizer-fixtures-work}"
: "${RUNS:=tp1dp2_dp_reshardable:2:1:1:dp_reshardable tp1dp2_fully_reshardable:2:1:1:fully_reshardable}"
: "${VOCAB:=1000}"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
cp -r "$MEGATRON_PATH" "$WORK/megatron"
python3 - "$WORK/megatron/megatron/core/optimizer/distrib_optimizer.py" <<'PY' || exit 1
import sys
path = sys.argv[1]
text = open(path).read()
for old, new in [
    ("            assert len(steps) == 1\n            step = steps[0]\n",
     "            assert len(steps) <= 1\n            step = steps[0] if steps else 0\n"),
    ("                if not isinstance(tensors[key], torch.Tensor):\n",
     "                if not isinstance(tensors.get(key), torch.Tensor):\n")]:
    if text.count(old) != 1:
        sys.exit(f"{path}: the code to fix was not found once: {old!r}")
    text = text.replace(old, new)
open(path, "w").write(text)
print("applied 2 fixes")
PY
MEGATRON=$WORK/megatron
make -C "$MEGATRON/megatron/core/datasets" >/dev/null || exit 1

IMPL="--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion
  --attention-backend unfused"
MODEL="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256
  --seq-length 64 --max-position-embeddings 64"
TRAIN="--mock-data --tokenizer-type NullTokenizer --vocab-size $VOCAB --micro-batch-size 2
  --global-batch-size 8 --train-iters 10 --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine
  --lr-warmup-iters 2 --lr-decay-iters 20 --weight-decay 0.01 --clip-grad 1.0 --seed 42
  --log-interval 1 --eval-iters 0 --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0
  --init-method-std 0.05 --use-distributed-optimizer --ckpt-format torch_dist --save-interval 10"

run() {  # NAME:GPUS:TP:PP:SHARDING PORT
  local name gpus tp pp sharding port=$2 extra=""
  IFS=: read -r name gpus tp pp sharding <<<"$1"
  [ "$sharding" = fully_reshardable ] && extra=--dist-ckpt-optim-fully-reshardable
  echo "== $name" >"$OUT/$name.log"
  timeout "${RUN_TIMEOUT:-150}" torchrun --nproc-per-node "$gpus" --master-port "$port" "$MEGATRON/pretrain_gpt.py" \
    $MODEL $IMPL $TRAIN --tensor-model-parallel-size "$tp" --pipeline-model-parallel-size "$pp" \
    --save "$WORK/$name" $extra >>"$OUT/$name.log" 2>&1
  echo "rc=$?" >>"$OUT/$name.log"
  ls -lR "$WORK/$name" >>"$OUT/$name.log" 2>&1
  [ -d "$WORK/$name/iter_0000010" ] && tar -C "$WORK/$name" -czf "$OUT/$name.tgz" .
}
port=29700
for spec in $RUNS; do run "$spec" $port & port=$((port + 10)); done
wait
for spec in $RUNS; do
  name=${spec%%:*}
  echo "##### $name"
  grep -E "^== |rc=| iteration +[0-9]+/|Error|error:|Traceback|saved checkpoint|successfully saved" "$OUT/$name.log" | head -30
done
ls -la "$OUT"
