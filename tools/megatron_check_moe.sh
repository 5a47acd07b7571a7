#!/usr/bin/env bash
# Real Megatron-LM loads the mixture-of-experts checkpoints ckptkit writes (per-rank files at EP2,
# torch_dist) and computes the same logits as it did for the real fixtures they came from.
#
# Inputs come from `python3 tools/megatron_moe.py prepare $CHECK` (run on the CPU):
#   $CHECK/qwen2_torch   moe_qwen2_ep2_torch -> megatron-to-hf -> hf-to-megatron --tp 1 --pp 1 --ep 2
#   $CHECK/mixtral_dist  moe_optim_ep2/torch_distributed -> megatron-to-hf -> hf-to-megatron ... --format torch_dist --ep 2
#                        (docs/megatron-check.md's figures: the larger moe_mixtral_ep2_torch it replaced)
#   $CHECK/qwen3_torch   moe_qwen3_tp1ep2/dist -> reshard --format torch --tp 1 --pp 1 --ep 2
# and $CHECK/RUN_tokens.pt. Afterwards `python3 tools/megatron_moe.py compare $CHECK RESULTS`
# compares $OUT/RUN_logits.pt with the fixtures' logits.pt (Megatron's own).
#
#   MEGATRON_PATH=/path/to/Megatron-LM CHECK=.devdata/moecheck OUT=/tmp/moe \
#       bash tools/megatron_check_moe.sh
#
# Needs 2 GPUs. Per-rank files load only at the layout that wrote them, so qwen2_torch and
# qwen3_torch run as 2 processes at --expert-model-parallel-size 2; the torch_dist checkpoint
# (written at EP2) is loaded at EP1 by one process on GPU 0, with --dist-ckpt-strictness
# raise_all (a tensor the model does not have fails the load). The three runs go side by side
# (own ports; the models are tiny); SIDE_BY_SIDE=0 runs them one after another. A key mismatch
# in the torch format shows as "load_return: ..." in RUN.log (Megatron's strict load then retries
# with strict=False and goes on), so that line must be absent. Leaves $OUT/RUN_logits.pt,
# $OUT/RUN.log and $OUT/moe.tar (all of them).
set -u
: "${CHECK:=.devdata/moecheck}"
: "${OUT:=/tmp/megatron-moe-check}"
RUNS=${RUNS:-"qwen2_torch mixtral_dist qwen3_torch"}
SIDE_BY_SIDE=${SIDE_BY_SIDE:-1}
source "$(dirname "$0")/megatron_check_common.sh"

# Float32 (as tools/make_megatron_moe_fixtures.sh). The dispatcher is not restored by
# --use-checkpoint-args (it keeps a set value) and is given as the fixtures were made; routing,
# expert sizes and moe_layer_freq come from the checkpoint.
COMMON="$COMMON --tensor-model-parallel-size 1 --moe-token-dispatcher-type alltoall"

# --use-checkpoint-args does not restore qk_layernorm or moe_shared_expert_gate: given again.
case_args() {
  case $1 in
    qwen2_*) echo "--moe-shared-expert-gate" ;;
    qwen3_*) echo "--qk-layernorm" ;;
    mixtral_*) echo "--vocab-size 120" ;;  # moe_optim_ep2's vocabulary (the others': 1000)
  esac
}

run_one() {  # RUN PORT
  local run=$1 port=$2 ckpt=$CHECK/$1 fmt nproc ep gpus
  case $run in
    *_dist) fmt="torch_dist --dist-ckpt-strictness raise_all" nproc=1 ep=1 gpus=0 ;;
    *) fmt=torch nproc=2 ep=2 gpus=0,1 ;;
  esac
  {
    echo "== $run: --load $ckpt --ckpt-format $fmt --expert-model-parallel-size $ep (GPUs $gpus) $(case_args "$run")"
    CUDA_VISIBLE_DEVICES=$gpus timeout ${RUN_TIMEOUT:-150} torchrun --nproc-per-node $nproc \
      --master-port $port "$REPO/tools/megatron_logits.py" --load "$ckpt" --ckpt-format $fmt \
      --expert-model-parallel-size $ep --tokens-file "$CHECK/${run}_tokens.pt" \
      --logits-out "$OUT/${run}_logits.pt" $COMMON $(case_args "$run")
    echo "rc=$?"
  } >"$OUT/$run.log" 2>&1
}

port=29700
for run in $RUNS; do
  if [ "$SIDE_BY_SIDE" = 1 ]; then run_one "$run" $port & else run_one "$run" $port; fi
  port=$((port + 10))
done
wait

summarize "^== |rc=|saved logits|ranks agree|load_return|Setting (num_experts|moe_|num_query_groups|kv_channels)|Error|error:|Traceback|[Mm]issing key|[Uu]nexpected key" \
  30 moe.tar
