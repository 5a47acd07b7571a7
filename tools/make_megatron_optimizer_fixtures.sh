#!/usr/bin/env bash
# Make real Megatron-LM torch_dist checkpoints with distributed-optimizer state, the fixtures
# tests/fixtures/gpt2do_dist_*.
#
# Megatron-LM (pretrain_gpt.py, --transformer-impl local, float32) trains a tiny model for 10
# iterations on mock data and saves it with its optimizer state. RUNS picks the runs, each
# NAME:GPUS:TP:PP:OPTIMIZER[:FORMAT[:MODEL]] (DP = GPUS / (TP x PP x EP)):
#   OPTIMIZER  dp_reshardable     --use-distributed-optimizer (Megatron's default torch_dist sharding)
#              fully_reshardable  the same with --dist-ckpt-optim-fully-reshardable
#              distributed        --use-distributed-optimizer (for FORMAT torch)
#              plain              the non-distributed optimizer
#   FORMAT     torch_dist (default) or torch (per-rank files)
#   MODEL      gpt2 (default: 2 layers, hidden 64, 4 heads, ffn 256, LayerNorm, GELU, learned
#              positions, tied embeddings), gpt2_bf16 (the same in bf16) or moe (Mixtral style: 2 layers, hidden 32, 4 heads,
#              2 query groups, RoPE, RMSNorm, SwiGLU, untied, 4 experts of ffn 16, top-2, EP2).
#              A per-rank moe run also gets logits.pt: the logits Megatron computes for fixed
#              tokens after loading it at TP1 EP2 (tools/megatron_logits.py), as the MoE fixtures'.
# The fixtures in tests/fixtures:
#   tp1dp2_dp_reshardable:2:1:1:dp_reshardable  tp1dp2_fully_reshardable:2:1:1:fully_reshardable
#       (gpt2do_dist_tp1dp2/{dp_reshardable,fully_reshardable}, vocabulary 1000, the default RUNS)
#   tp2pp2_dp_reshardable:4:2:2:dp_reshardable ... with VOCAB=250 (padded to 256: small files)
#   gpt2o_dist_plain_tp2: tp2_plain:2:2:1:plain with VOCAB=250
#   moe_optim_ep2/{torch_distributed,dist,torch_plain}: one run saved three ways, VOCAB=120
#       (padded to 128): moe_distributed_torch:2:1:1:distributed:torch:moe,
#       moe_dp_reshardable:2:1:1:dp_reshardable:torch_dist:moe, moe_plain_torch:2:1:1:plain:torch:moe
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
python3 "$(dirname "$0")/megatron_local_fixes.py" "$WORK/megatron" || exit 1
MEGATRON=$WORK/megatron
make -C "$MEGATRON/megatron/core/datasets" >/dev/null || exit 1

IMPL="--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion
  --attention-backend unfused"
GPT2="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256
  --seq-length 64 --max-position-embeddings 64"
MOE="--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention --num-query-groups 2
  --ffn-hidden-size 64 --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
  --untie-embeddings-and-output-weights --seq-length 64 --max-position-embeddings 64
  --num-experts 4 --moe-ffn-hidden-size 16 --moe-router-topk 2 --moe-token-dispatcher-type alltoall
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01 --expert-model-parallel-size 2"
REPO=$(cd "$(dirname "$0")/.." && pwd)
TRAIN="--mock-data --tokenizer-type NullTokenizer --vocab-size $VOCAB --micro-batch-size 2
  --global-batch-size 8 --train-iters 10 --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine
  --lr-warmup-iters 2 --lr-decay-iters 20 --weight-decay 0.01 --clip-grad 1.0 --seed 42
  --log-interval 1 --eval-iters 0 --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0
  --init-method-std 0.05 --save-interval 10"

run() {  # NAME:GPUS:TP:PP:OPTIMIZER[:FORMAT[:MODEL]] PORT
  local name gpus tp pp optimizer format model port=$2 extra model_flags
  IFS=: read -r name gpus tp pp optimizer format model <<<"$1"
  format=${format:-torch_dist} model=${model:-gpt2}
  case $optimizer in
    dp_reshardable|distributed) extra=--use-distributed-optimizer ;;
    fully_reshardable) extra="--use-distributed-optimizer --dist-ckpt-optim-fully-reshardable" ;;
    plain) extra="" ;;
    *) echo "$name: unknown optimizer $optimizer"; return 1 ;;
  esac
  case $model in
    gpt2) model_flags=$GPT2 ;;
    gpt2_bf16) model_flags="$GPT2 --bf16" ;;
    moe) model_flags=$MOE ;;
    *) echo "$name: unknown model $model"; return 1 ;;
  esac
  echo "== $name" >"$OUT/$name.log"
  timeout "${RUN_TIMEOUT:-150}" torchrun --nproc-per-node "$gpus" --master-port "$port" "$MEGATRON/pretrain_gpt.py" \
    $model_flags $IMPL $TRAIN --tensor-model-parallel-size "$tp" --pipeline-model-parallel-size "$pp" \
    --ckpt-format "$format" --save "$WORK/$name" $extra >>"$OUT/$name.log" 2>&1
  echo "rc=$?" >>"$OUT/$name.log"
  if [ "$model" = moe ] && [ "$format" = torch ]; then logits "$name" "$model_flags" $((port + 1)); fi
  ls -lR "$WORK/$name" >>"$OUT/$name.log" 2>&1
  [ -d "$WORK/$name/iter_0000010" ] && tar -C "$WORK/$name" -czf "$OUT/$name.tgz" .
}

logits() {  # NAME MODEL_FLAGS PORT: $WORK/NAME/logits.pt from Megatron loading the per-rank run at TP1 EP2
  local name=$1 model_flags=$2 port=$3
  python3 -c "import torch; torch.manual_seed(0); torch.save({'tokens': torch.randint(0, $VOCAB, (2, 32))}, '$WORK/$name.tokens.pt')"
  timeout 150 torchrun --nproc-per-node 2 --master-port "$port" "$REPO/tools/megatron_logits.py" \
    --load "$WORK/$name" --ckpt-format torch --tokens-file "$WORK/$name.tokens.pt" \
    --logits-out "$WORK/$name.raw_logits.pt" --use-checkpoint-args --no-load-optim --no-load-rng \
    --exit-on-missing-checkpoint --micro-batch-size 2 --seq-length 32 --tokenizer-type NullTokenizer \
    --vocab-size "$VOCAB" --tensor-model-parallel-size 1 $model_flags $IMPL >>"$OUT/$name.log" 2>&1
  echo "logits rc=$?" >>"$OUT/$name.log"
  python3 - "$WORK/$name" "$WORK/$name.raw_logits.pt" "$VOCAB" >>"$OUT/$name.log" 2>&1 <<'PY'
import sys
import torch
folder, raw, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
raw = torch.load(raw, weights_only=True)
torch.save({"tokens": raw["tokens"], "logits": raw["logits"], "vocab": vocab,
            "args": {"logits_computed_at": "TP1 EP2, float32, after loading the per-rank files"}},
           f"{folder}/logits.pt")
print("logits", tuple(raw["logits"].shape))
PY
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
