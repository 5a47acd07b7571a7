#!/usr/bin/env bash
# Real Megatron-LM loads the DeepSeek checkpoints ckptkit writes from Hugging Face models and
# computes the logits transformers computes for them.
#
# Inputs come from `python3 tools/megatron_deepseek.py prepare $CHECK` (run on the CPU; see there):
#   $CHECK/v3_torch_tp2   DeepseekV3 -> hf-to-megatron --tp 2                      (per-rank)
#   $CHECK/v3_dist_ep2    DeepseekV3 -> hf-to-megatron --ep 2 --format torch_dist
#   $CHECK/v2_torch_ep2   DeepseekV2 -> hf-to-megatron --ep 2                      (per-rank)
#   $CHECK/v3mtp_*        DeepseekV3 with a Hub-layout MTP layer -> torch_dist EP2 / per-rank TP2
# and $CHECK/RUN_tokens.pt. Afterwards `python3 tools/megatron_deepseek.py compare $CHECK RESULTS`
# compares $OUT/RUN_logits.pt with transformers' logits ($CHECK/RUN_reference.pt).
#
#   MEGATRON_PATH=/path/to/Megatron-LM CHECK=.devdata/dscheck OUT=/tmp/dscheck \
#       bash tools/megatron_deepseek_check.sh
#
# Needs 2 GPUs; every run uses both (per-rank files load only at the layout that wrote them; the
# torch_dist one is loaded at TP2 EP1, another layout, with --dist-ckpt-strictness raise_all).
# The model is built as tools/megatron_deepseek_local.py explains, with the fixtures' flags
# (tools/megatron_deepseek_flags.sh), --mtp-num-layers only for the v3mtp runs. A key
# mismatch in the torch format shows as "load_return: ..." in RUN.log (Megatron's strict load then
# retries with strict=False), so that line must be absent. Leaves $OUT/RUN_logits.pt and $OUT/RUN.log.
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${CHECK:=.devdata/dscheck}"
: "${OUT:=/tmp/megatron-deepseek-check}"
RUNS=${RUNS:-"v3_torch_tp2 v3_dist_ep2 v2_torch_ep2 v3mtp_dist_ep2 v3mtp_torch_tp2"}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export MEGATRON_PATH PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
source "$REPO/tools/megatron_deepseek_flags.sh"

run_one() {  # RUN PORT
  local run=$1 port=$2 model fmt par
  case $run in
    v3*) model=("${V3[@]}") ;;  # v3_*, and v3mtp_* with its MTP layer
    v2*) model=("${V2[@]}") ;;
  esac
  local kept=() skip=0 flag
  for flag in "${model[@]}"; do  # --mtp-num-layers only where the HF model has an MTP layer
    if [ $skip = 1 ]; then skip=0; continue; fi
    if [ "$flag" = --mtp-num-layers ] && [ "${run#v3mtp}" = "$run" ]; then skip=1; continue; fi
    kept+=("$flag")
  done
  model=("${kept[@]}")
  case $run in
    *_dist_*) fmt=(torch_dist --dist-ckpt-strictness raise_all)
      par=(--tensor-model-parallel-size 2 --expert-model-parallel-size 1) ;;
    *_tp2) fmt=(torch) par=(--tensor-model-parallel-size 2 --expert-model-parallel-size 1) ;;
    *) fmt=(torch) par=(--tensor-model-parallel-size 1 --expert-model-parallel-size 2) ;;
  esac
  {
    echo "== $run: --load $CHECK/$run --ckpt-format ${fmt[*]} ${par[*]}"
    timeout ${RUN_TIMEOUT:-150} torchrun --nproc-per-node 2 --master-port "$port" \
      "$REPO/tools/megatron_deepseek_logits.py" --load "$CHECK/$run" --ckpt-format "${fmt[@]}" \
      --tokens-file "$CHECK/${run}_tokens.pt" --logits-out "$OUT/${run}_logits.pt" --no-load-optim \
      --no-load-rng --exit-on-missing-checkpoint --micro-batch-size 2 --seq-length 32 \
      "${par[@]}" "${model[@]}" "${COMMON[@]}" "${IMPL[@]}"
    echo "rc=$?"
  } >"$OUT/$run.log" 2>&1
}

port=29800
for run in $RUNS; do
  run_one "$run" $port &
  port=$((port + 10))
done
wait
for run in $RUNS; do
  echo "##### $run"
  grep -E "^== |rc=|saved logits|ranks agree|load_return|Error|error:|Traceback|[Mm]issing key|[Uu]nexpected key" \
    "$OUT/$run.log" | head -30
done
