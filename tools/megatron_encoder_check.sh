#!/usr/bin/env bash
# Real Megatron-LM loads the BERT and T5 checkpoints ckptkit writes from the real fixtures
# (tests/fixtures/bert_core_tp2pp2, t5_tp2, bert_legacy_tp2pp2) and computes the logits it
# computed for the fixtures themselves.
#
#   MEGATRON_PATH=... MEGATRON_2024=... OUT=/tmp/encoder-check bash tools/megatron_encoder_check.sh
#
# 1. `python3 tools/megatron_encoder_check.py prepare $CHECK` runs ckptkit (reshard to other
#    TP/PP/formats, megatron-to-hf and hf-to-megatron; the cases are listed there) and the HF
#    model's logits, unless $CHECK/cases.txt exists already (PREPARED=1).
# 2. tools/megatron_encoder_logits.py loads each case with Megatron's strict load_checkpoint at
#    the layout ckptkit wrote (torch_dist with --dist-ckpt-strictness raise_all), the current
#    Megatron-LM for Core names, the 2024 one (MEGATRON_2024, fixed by
#    tools/megatron_encoder_legacy_fixes.py) for pre-Core names. All cases run side by side on
#    the GPUs (own ports; the models are tiny).
# 3. `python3 tools/megatron_encoder_check.py compare $CHECK $OUT` prints the table.
# Leaves $OUT/NAME.log, $OUT/NAME_logits.pt, $OUT/table.txt, $OUT/rows.json.
# The figures in tests/fixtures/{bert_core_tp2pp2,t5_tp2,bert_legacy_tp2pp2}/README.md were made
# with it on 4 H200s (ckptkit 3f8e032, step 1 run on the CPU beforehand and its folder shipped,
# PREPARED=1): the ten Megatron runs side by side in 42 s.
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/encoder-check}"
: "${CHECK:=/tmp/encoder-check-work}"
MEGATRON_2024=${MEGATRON_2024:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$CHECK"
source "$REPO/tools/megatron_encoder_flags.sh"

if [ "${PREPARED:-0}" != 1 ] || [ ! -f "$CHECK/cases.txt" ]; then
  echo "== prepare (ckptkit) into $CHECK"
  timeout -k 5 "${PREPARE_TIMEOUT:-150}" python3 "$REPO/tools/megatron_encoder_check.py" prepare "$CHECK" 2>&1 | tee "$OUT/prepare.log"
fi

run_case() {  # NAME MODEL TREE FORMAT TP PP NAMING PORT
  local name=$1 model=$2 tree=$3 fmt=$4 tp=$5 pp=$6 naming=$7 port=$8 args=() seq=() load=() root=$MEGATRON_PATH
  case $model/$naming in
    bert/core) args=("${BERT_CORE[@]}") seq=(--seq-length 32) ;;
    bert/legacy) args=("${BERT_LEGACY[@]}") seq=(--seq-length 32) ;;
    t5/*) args=("${T5[@]}") ;;
  esac
  if [ "$tree" = 2024 ]; then root=$MEGATRON_2024; fi
  if [ "$fmt" = torch_dist ]; then load=(--ckpt-format torch_dist --dist-ckpt-strictness raise_all)
  elif [ "$tree" != 2024 ]; then load=(--ckpt-format torch); fi
  {
    echo "== $name: $tree Megatron-LM, $naming names, TP$tp PP$pp, $fmt"
    MEGATRON_PATH=$root timeout -k 5 "${RUN_TIMEOUT:-150}" torchrun --nproc-per-node $((tp * pp)) \
      --master-port "$port" "$REPO/tools/megatron_encoder_logits.py" "$model" "${args[@]}" "${seq[@]}" \
      "${LOAD[@]}" "${load[@]}" --load "$CHECK/$name" --tensor-model-parallel-size "$tp" \
      --pipeline-model-parallel-size "$pp" --logits-out "$OUT/${name}_logits.pt"
    echo "rc=$?"
  } >"$OUT/$name.log" 2>&1
}

port=29800
while read -r name model tree fmt tp pp naming; do
  [ -n "$name" ] || continue
  if [ "$tree" = 2024 ] && [ -z "$MEGATRON_2024" ]; then echo "$name: needs MEGATRON_2024" >"$OUT/$name.log"; continue; fi
  run_case "$name" "$model" "$tree" "$fmt" "$tp" "$pp" "$naming" $port &
  port=$((port + 10))
done <"$CHECK/cases.txt"
wait

for log in "$OUT"/*.log; do
  echo "##### $(basename "$log")"
  grep -E "^== |^rc=|saved logits|loaded checkpoint|load_return|[Mm]issing key|[Uu]nexpected key|Error|error:|Traceback" "$log" \
    | grep -v Warning | head -20
done
python3 "$REPO/tools/megatron_encoder_check.py" compare "$CHECK" "$OUT" --json "$OUT/rows.json" | tee "$OUT/table.txt"
