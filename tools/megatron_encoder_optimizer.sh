#!/usr/bin/env bash
# Real Megatron-LM BERT and T5 checkpoints with optimizer state, and the losses of resuming them.
#
# Megatron-LM (d98e8a6, with tools/megatron_local_fixes.py --step-fix applied to a copy) trains
# a tiny Core BertModel and a tiny T5Model with its own training loop on random batches
# (tools/megatron_encoder_pretrain.py), bf16, dropout 0, --lr-decay-iters 20, to iteration 15
# with a save at iteration 10 (the "train" run: its losses 11-15 are the uninterrupted ones;
# its save at 15 is removed and the tracker set back to 10). Then Megatron resumes each
# checkpoint at its own layout to iteration 15 (the baseline; --no-load-rng, nothing draws
# random numbers with dropout 0); a torch_dist checkpoint is also resumed with
# --dist-ckpt-strictness raise_all (NAME_strict.log).
#
# SOURCES holds NAME:MODEL:FORMAT:TP:PP:DP:DISTRIBUTED[:SHARDING[:VPP]] entries (MODEL bert or
# t5; DISTRIBUTED 1 for --use-distributed-optimizer, 0 for the plain optimizer; SHARDING "-"
# (Megatron's default, dp_reshardable) or fully_reshardable; VPP layers per virtual stage).
# Every run takes TP x PP x DP GPUs; all runs of a phase go side by side on the same GPUs (each
# its own port; the models are tiny).
#
# Leaves $OUT/NAME/ (the iteration-10 checkpoint, without the iteration-15 save),
# $OUT/logs/NAME_train.log and NAME_baseline.log, and $OUT/losses.txt.
#   MEGATRON_PATH=... OUT=/tmp/encopt bash tools/megatron_encoder_optimizer.sh
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree with examples/bert and examples/t5}"
: "${OUT:=/tmp/encoder-optimizer}"
: "${WORK:=/tmp/encoder-optimizer-work}"
: "${SOURCES:=bert_torch:bert:torch:2:1:2:1 bert_dist:bert:torch_dist:2:1:2:1 bert_full:bert:torch_dist:2:1:2:1:fully_reshardable bert_plain:bert:torch:2:1:2:0 bert_pp:bert:torch:1:2:2:1 bert_vpp:bert:torch:1:2:2:1:-:1 t5_torch:t5:torch:2:1:2:1 t5_dist:t5:torch_dist:2:1:2:1 t5_full:t5:torch_dist:2:1:2:1:fully_reshardable t5_plain:t5:torch:2:1:2:0}"
: "${RUN_TIMEOUT:=170}"
: "${PORT:=29700}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf "$WORK" && mkdir -p "$OUT/logs" "$WORK"

cp -r "$MEGATRON_PATH" "$WORK/megatron"
python3 "$REPO/tools/megatron_local_fixes.py" "$WORK/megatron" --step-fix || exit 1
MEGATRON=$WORK/megatron
make -C "$MEGATRON/megatron/core/datasets" >/dev/null 2>&1 || echo "dataset helpers did not build (not needed by the mock data)"

source "$REPO/tools/megatron_encoder_optimizer_flags.sh"

megatron() {  # LOG MODEL GPUS PORT ARGS...
  local log=$1 model=$2 gpus=$3 port=$4 args; shift 4
  if [ "$model" = bert ]; then args=("${OPT_BERT[@]}"); else args=("${OPT_T5[@]}"); fi
  echo "\$ torchrun --nproc-per-node $gpus megatron_encoder_pretrain.py $model ${args[*]} ${OPT_TRAIN[*]} $*" >"$log"
  timeout -k 5 "$RUN_TIMEOUT" env MEGATRON_PATH="$MEGATRON" torchrun --nproc-per-node "$gpus" \
    --master-port "$port" "$REPO/tools/megatron_encoder_pretrain.py" "$model" "${args[@]}" \
    "${OPT_TRAIN[@]}" "$@" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
  echo "$(basename "$log" .log): $(tail -n 1 "$log")"
}

train() {  # NAME MODEL FORMAT TP PP DP DISTRIBUTED [SHARDING [VPP]]
  local name=$1 model=$2 port=$3; shift 3
  local LAYOUT; opt_layout_flags "$1" "$2" "$3" "$4" "$5" "${6:--}" "${7:-}"
  megatron "$OUT/logs/${name}_train.log" "$model" $(($2 * $3 * $4)) "$port" "${LAYOUT[@]}" \
    --save "$WORK/$name" --save-interval 10
  if [ -d "$WORK/$name/iter_0000010" ]; then
    rm -rf "$WORK/$name/iter_0000015" && echo 10 >"$WORK/$name/latest_checkpointed_iteration.txt"
  else
    echo "$name: no checkpoint at iteration 10"
  fi
}

resume() {  # NAME MODEL FORMAT TP PP DP DISTRIBUTED [SHARDING [VPP]]
  local name=$1 model=$2 port=$3; shift 3
  local LAYOUT; opt_layout_flags "$1" "$2" "$3" "$4" "$5" "${6:--}" "${7:-}"
  [ -d "$WORK/$name/iter_0000010" ] || return 0
  megatron "$OUT/logs/${name}_baseline.log" "$model" $(($2 * $3 * $4)) "$port" "${LAYOUT[@]}" \
    --load "$WORK/$name" --no-load-rng --exit-on-missing-checkpoint &
  # torch_dist: the same resume once more with a strict load (every key of the checkpoint and of
  # the run must match), to see whether Megatron's own checkpoint passes it
  if [ "$1" = torch_dist ]; then
    megatron "$OUT/logs/${name}_strict.log" "$model" $(($2 * $3 * $4)) $((port + 5)) "${LAYOUT[@]}" \
      --load "$WORK/$name" --no-load-rng --exit-on-missing-checkpoint --dist-ckpt-strictness raise_all
  fi
  wait
}

each() {  # train|resume
  local port=$PORT spec fields
  for spec in $SOURCES; do
    IFS=: read -r -a fields <<<"$spec"
    "$1" "${fields[0]}" "${fields[1]}" $port "${fields[@]:2}" &
    port=$((port + 10))
  done
  wait
}

echo "train $(date -u +%T)"; each train
# The checkpoints as saved, before a resume could write anything next to them.
for spec in $SOURCES; do
  name=${spec%%:*}
  [ -d "$WORK/$name/iter_0000010" ] && cp -r "$WORK/$name" "$OUT/$name"
done
echo "resume $(date -u +%T)"; each resume
echo "done $(date -u +%T)"

NAMES=""
for spec in $SOURCES; do NAMES="$NAMES ${spec%%:*}"; done
REPO=$REPO python3 - "$OUT/logs" $NAMES <<'EOF' | tee "$OUT/losses.txt"
import os, sys
sys.path.insert(0, os.path.join(os.environ["REPO"], "tools"))
from megatron_losses import read_runs
logs, names = sys.argv[1], sys.argv[2:]
runs = [f"{name}_{kind}" for name in names for kind in ("train", "baseline", "strict")
        if kind != "strict" or os.path.exists(f"{logs}/{name}_strict.log")]
losses = read_runs(logs, runs)
for name in names:
    train, baseline = losses[f"{name}_train"], losses[f"{name}_baseline"]
    print(f"{name}: " + " ".join(f"{i}:{train.get(i, float('nan')):.6f}/{baseline.get(i, float('nan')):.6f}"
                                 for i in range(9, 16)))
    diffs = [abs(train[i] - baseline[i]) for i in range(11, 16) if i in train and i in baseline]
    print(f"{name}: {len(diffs)} resumed iterations, max |baseline - uninterrupted| = "
          f"{max(diffs) if diffs else float('nan'):.3g}")
    if f"{name}_strict" in losses:
        strict = losses[f"{name}_strict"]
        diffs = [abs(strict[i] - baseline[i]) for i in range(11, 16) if i in strict and i in baseline]
        print(f"{name}: strict load (--dist-ckpt-strictness raise_all): {len(diffs)} resumed iterations, "
              f"max |strict - baseline| = {max(diffs) if diffs else float('nan'):.3g}")
EOF
du -sh "$OUT"/*
