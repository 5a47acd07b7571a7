#!/usr/bin/env bash
# Real Megatron-LM loads what ckptkit writes for Qwen3, Llama 3.1, Mistral (sliding window)
# and Phi-3, and computes logits for fixed tokens (tools/megatron_logits.py, strict load).
#
# Inputs come from `python3 tools/megatron_families.py prepare $CHECK` (run on the CPU):
# $CHECK/NAME_{torch,dist} (hf-to-megatron --tp 1 --pp 1) and $CHECK/NAME_tokens.pt.
# Afterwards `python3 tools/megatron_families.py compare $CHECK RESULTS` compares
# $OUT/RUN_logits.pt with the references (Megatron's own fixture logits, or transformers').
#
#   MEGATRON_PATH=/path/to/Megatron-LM CHECK=.devdata/check OUT=/tmp/families \
#       bash tools/megatron_check_families.sh
#
# Needs one GPU; the runs are small and go side by side on it. Leaves $OUT/RUN_logits.pt,
# $OUT/RUN.log, and $OUT/families.tar (all of them in one file). A key mismatch in the torch
# format shows as "load_return: ..." in RUN.log: Megatron's load_checkpoint(strict=True) then
# retries with strict=False and goes on, so that line must be absent.
set -u
: "${CHECK:=.devdata/check}"
: "${OUT:=/tmp/megatron-families}"
RUNS=${RUNS:-"qwen3_torch qwen3_dist llama31_torch llama31_dist mistral_torch mistral_dist mistral_nowindow phi3_torch phi3_dist"}
source "$(dirname "$0")/megatron_check_common.sh"
# With --transformer-impl local (COMMON) the sliding window is applied only on the unfused
# softmax path.

# --use-checkpoint-args does not restore qk_layernorm, use_rope_scaling, the norm epsilon or
# window_size (megatron/training/checkpointing.py, load_args_from_checkpoint), so they are
# given again. gpt_builders.py uses Llama-3 scaling factor 8 whatever --rope-scaling-factor says.
case_args() {
  case $1 in
    qwen3_*) echo "--qk-layernorm --norm-epsilon 1e-6" ;;
    llama31_*) echo "--use-rope-scaling --norm-epsilon 1e-6" ;;
    # HF sliding_window 8: query i sees keys i-7..i, Megatron window_size (left, right) = (7, 0)
    mistral_nowindow) echo "--norm-epsilon 1e-6" ;;  # the same checkpoint, window left out
    mistral_*) echo "--norm-epsilon 1e-6 --window-size 7,0" ;;
    phi3_*) echo "--norm-epsilon 1e-5" ;;
  esac
}

port=29600
for run in $RUNS; do
  case=${run%%_*}
  case $run in
    # torch_dist: also fail on tensors in the checkpoint that the model does not have (Megatron's
    # default, assume_ok_unexpected, does not look); the torch format loads with strict=True.
    *_dist) ckpt=$CHECK/${case}_dist fmt="torch_dist --dist-ckpt-strictness raise_all" ;;
    *) ckpt=$CHECK/${case}_torch fmt=torch ;;
  esac
  (
    echo "== $run: --load $ckpt --ckpt-format $fmt $(case_args "$run")"
    timeout ${RUN_TIMEOUT:-240} torchrun --nproc-per-node 1 --master-port $port "$REPO/tools/megatron_logits.py" \
      --load "$ckpt" --ckpt-format $fmt --tokens-file "$CHECK/${case}_tokens.pt" \
      --logits-out "$OUT/${run}_logits.pt" $COMMON $(case_args "$run")
    echo "rc=$?"
  ) >"$OUT/$run.log" 2>&1 &
  port=$((port + 10))
done
wait

summarize "^== |rc=|saved logits|load_return|Setting (kv_channels|rotary_base|num_query_groups)|window|Error|error:|Traceback|[Mm]issing key|[Uu]nexpected key" \
  20 families.tar
