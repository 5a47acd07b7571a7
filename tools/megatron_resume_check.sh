#!/usr/bin/env bash
# Megatron-LM resumes training from optimizer state ckptkit resharded, with the losses it
# has when resuming from its own checkpoint.
#
# 1. Megatron trains a small Llama-style model (bf16, GQA, SwiGLU, RoPE, untied; or GPT-2
#    style fp32 with MODEL_KIND=gpt2) with the distributed optimizer at the layout SOURCE
#    ("FORMAT TP PP DP", default "torch 1 1 2": per-rank files, model_optim_rng.pt +
#    distrib_optim.pt; "torch_dist 1 1 2" saves Megatron's torch_dist with its default
#    dp_reshardable optimizer sharding) and saves at iteration 10. It goes on uninterrupted
#    to iteration 15 (the "train" column); its save at 15 is removed and the tracker set back
#    to 10.
# 2. baseline: Megatron resumes from its own checkpoint (same layout) to iteration 15.
# 3. ckptkit reshards weights and optimizer state (ckptkit.convert.reshard, in the order
#    RUNS lists them) to each run's layout, and Megatron resumes from each to iteration 15.
#    RUNS holds NAME:FROM:FORMAT:TP:PP:DP:DISTRIBUTED[:SHARDING[:EP]] entries (FROM:
#    "source" or an earlier run; DISTRIBUTED 1 for the distributed optimizer, 0 for the plain
#    one; SHARDING the torch_dist optimizer sharding, dp_reshardable or fully_reshardable, "-"
#    for the default; EP the expert-parallel size, default the source's; the run takes
#    TP x PP x DP GPUs). SOURCE may add EP as a fifth field; SOURCE_DISTRIBUTED=0 trains the
#    source with the plain optimizer; SOURCE_FLAGS go to the source run and its baseline
#    resume (--num-layers-per-virtual-pipeline-stage 1 for an interleaved source). MODEL_KIND llama4g has 4 query groups (for TP4), moe is
#    a Mixtral-style bf16 model with 4 experts. The default, for a per-rank source:
#      tp2:source:torch:2:1:1:1       a TP change
#      pp2:source:torch:1:2:1:1       a PP change
#      dp1:source:torch:1:1:1:1       a DP change (1 GPU)
#      nodist:source:torch:1:1:2:0    the other optimizer format
# 4. The per-iteration losses are printed side by side, with each resumed run's largest
#    difference over iterations 11..15 from the baseline and from the uninterrupted run
#    ("train"). Megatron does not reset its loss accumulator after logging a run's first
#    iteration (training_log: should_reset = not is_first_iteration), so the "lm loss" it
#    logs at a run's second iteration (2, or 12 after resuming) is the mean of the first two;
#    the table gives that iteration's own loss, 2 x logged - first. A resumed run must load strictly:
#    Megatron retries a failed strict load non-strictly and prints "load_return: ...", so
#    such a line (or a traceback, or a nonzero exit) is reported as FAILED.
#
# Every resume passes --no-load-rng (RNG state belongs to each rank of the old layout;
# dropout is 0, so nothing here draws random numbers). Megatron at d98e8a6 needs two local
# fixes in megatron/core/optimizer/distrib_optimizer.py to resume with PyTorch's Adam
# (neither Transformer Engine nor apex on the image; see ../shared/docs/formats.md): the
# script applies them to a copy of the tree and stops if their code is not found.
#
# STEP_FIX=1 applies two more fixes. Without Transformer Engine or apex,
# DistributedOptimizer.load_state_dict puts one step tensor into the state of every
# parameter, and torch's AdamW then adds 1 to it once per parameter at each step, so from the
# second resumed iteration on Adam's bias correction uses step 10 + N*k (N: the parameters in
# the rank's shard, which depend on the layout) instead of 10 + k; the fix gives each
# parameter its own copy. Loading torch_dist (dp_reshardable), the parameter state also
# carries the step the optimizer had before loading (0), which _set_main_param_and_optimizer_states
# copied over the loaded one, so every torch_dist resume restarted Adam's bias correction at
# step 1; the fix leaves the step to the param groups, as the code's comments intend. With
# STEP_FIX=0 (the default, as the first figures in docs/optimizer.md were made) resumed runs
# drift from the uninterrupted one from iteration 12 on for these reasons; the
# non-distributed optimizer (its own step per parameter) is unaffected.
#
# The reshards run one after another on the CPU, and the resumes side by side on the same
# GPUs (each its own process group and port; the model is tiny); SIDE_BY_SIDE=0 runs them
# one after another.
#
# Needs as many GPUs as the largest layout (2 for the default) and a Megatron-LM source tree.
# From the repo root:
#   MEGATRON_PATH=$PWD/.devdata/megatron OUT=/tmp/resume-check bash tools/megatron_resume_check.sh
# CKPTKIT_PATH is where ckptkit is imported from (default: this repo), for one a clean copy
# of a commit: mkdir -p .devdata/ckptkit-head && git archive HEAD ckptkit | tar -x -C .devdata/ckptkit-head
# Leaves $OUT/NAME.log per Megatron run, $OUT/reshard_NAME.log and $OUT/losses.txt.
# The figures in docs/optimizer.md were made on 2 H100s with the Megatron tree packed as
# .devdata/pack/megatron.tar.xz and ckptkit from .devdata/ckptkit-head (both carried), in
# about 90 s:
#   mkdir -p /tmp/m && tar -xJf .devdata/pack/megatron.tar.xz -C /tmp/m
#   MEGATRON_PATH=/tmp/m/megatron OUT=/tmp/rc WORK=/tmp/rcw CKPTKIT_PATH=$PWD/.devdata/ckptkit-head \
#     RUN_TIMEOUT=150 bash tools/megatron_resume_check.sh
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/resume-check}"
: "${WORK:=/tmp/resume-check-work}"
: "${MODEL_KIND:=llama}"
: "${SOURCE:=torch 1 1 2}"
: "${SOURCE_DISTRIBUTED:=1}"
: "${SOURCE_FLAGS:=}"  # more flags of the source run and its baseline resume, e.g. --num-layers-per-virtual-pipeline-stage 1
: "${RUNS:=tp2:source:torch:2:1:1:1 pp2:source:torch:1:2:1:1 dp1:source:torch:1:1:1:1 nodist:source:torch:1:1:2:0}"
: "${SIDE_BY_SIDE:=1}"
: "${STEP_FIX:=0}"
: "${PORT:=29600}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
: "${CKPTKIT_PATH:=$REPO}"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"

# A copy of Megatron with the fixes for resuming the distributed optimizer with torch Adam.
cp -r "$MEGATRON_PATH" "$WORK/megatron"
python3 "$REPO/tools/megatron_local_fixes.py" "$WORK/megatron" $([ "$STEP_FIX" = 1 ] && echo --step-fix) || exit 1
MEGATRON=$WORK/megatron
make -C "$MEGATRON/megatron/core/datasets" >/dev/null || exit 1

IMPL="--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion
  --attention-backend unfused"
case $MODEL_KIND in
  llama) MODEL="--num-layers 4 --hidden-size 128 --num-attention-heads 8 --group-query-attention
           --num-query-groups 2 --ffn-hidden-size 320 --swiglu --normalization RMSNorm
           --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
           --seq-length 64 --max-position-embeddings 64 --bf16"; DTYPE=bfloat16 ;;
  llama4g) MODEL="--num-layers 4 --hidden-size 128 --num-attention-heads 8 --group-query-attention
           --num-query-groups 4 --ffn-hidden-size 320 --swiglu --normalization RMSNorm
           --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
           --seq-length 64 --max-position-embeddings 64 --bf16"; DTYPE=bfloat16 ;;
  moe) MODEL="--num-layers 2 --hidden-size 64 --num-attention-heads 4 --group-query-attention
           --num-query-groups 2 --ffn-hidden-size 128 --swiglu --normalization RMSNorm
           --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
           --seq-length 64 --max-position-embeddings 64 --bf16 --num-experts 4 --moe-ffn-hidden-size 64
           --moe-router-topk 2 --moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss
           --moe-aux-loss-coeff 0.01"; DTYPE=bfloat16 ;;
  gpt2) MODEL="--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256
          --seq-length 64 --max-position-embeddings 64"; DTYPE=float32 ;;
esac
TRAIN="--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --micro-batch-size 2
  --global-batch-size 8 --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine --lr-warmup-iters 2
  --lr-decay-iters 20 --weight-decay 0.01 --clip-grad 1.0 --seed 42 --log-interval 1
  --eval-iters 0 --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.05
"

megatron() {  # NAME GPUS PORT ARGS...
  local name=$1 gpus=$2 port=$3; shift 3
  echo "== $name" >"$OUT/$name.log"
  timeout "${RUN_TIMEOUT:-300}" torchrun --nproc-per-node "$gpus" --master-port "$port" "$MEGATRON/pretrain_gpt.py" \
    $MODEL $IMPL $TRAIN "$@" >>"$OUT/$name.log" 2>&1
  echo "rc=$?" >>"$OUT/$name.log"
  echo "$name: $(tail -n 1 "$OUT/$name.log")"
}
background() { if [ "$SIDE_BY_SIDE" = 1 ]; then "$@" & else "$@"; fi; }

read -r SOURCE_FORMAT SOURCE_TP SOURCE_PP SOURCE_DP SOURCE_EP <<<"$SOURCE"
SOURCE_EP=${SOURCE_EP:-1}
SOURCE_OPTIMIZER=--use-distributed-optimizer
[ "$SOURCE_DISTRIBUTED" = 1 ] || SOURCE_OPTIMIZER=""
NAMES=""
for spec in $RUNS; do NAMES="$NAMES ${spec%%:*}"; done

# 1. train to iteration 15, saving at 10, with the distributed optimizer
megatron train $((SOURCE_TP * SOURCE_PP * SOURCE_DP)) "$PORT" --ckpt-format "$SOURCE_FORMAT" \
  --tensor-model-parallel-size "$SOURCE_TP" --pipeline-model-parallel-size "$SOURCE_PP" \
  --expert-model-parallel-size "$SOURCE_EP" $SOURCE_OPTIMIZER $SOURCE_FLAGS --train-iters 15 --save "$WORK/source" \
  --save-interval 10
[ -d "$WORK/source/iter_0000010" ] || { echo "no checkpoint at iteration 10"; exit 1; }
rm -rf "$WORK/source/iter_0000015" && echo 10 >"$WORK/source/latest_checkpointed_iteration.txt"
ls -lR "$WORK/source" >>"$OUT/train.log"

# 3. ckptkit reshards weights and optimizer state
reshard() {  # NAME FROM FORMAT TP PP DP DISTRIBUTED [SHARDING [EP]]
  # from $WORK, so that the ckptkit of the current folder does not shadow CKPTKIT_PATH
  (cd "$WORK" && PYTHONPATH=$CKPTKIT_PATH python3 - "$@") >"$OUT/reshard_$1.log" 2>&1 <<'EOF'
import sys
import ckptkit
from ckptkit.convert import reshard
from ckptkit.inspection import inspect_checkpoint
print("ckptkit from", ckptkit.__file__)
name, source, target_format = sys.argv[1:4]
tp, pp, dp, distributed = map(int, sys.argv[4:8])
sharding = sys.argv[8] if len(sys.argv) > 8 and sys.argv[8] not in ("", "-") else None
ep = int(sys.argv[9]) if len(sys.argv) > 9 else None
result = reshard(source, name, tp=tp, pp=pp, ep=ep, format=target_format, dp=dp,
                 distributed_optimizer=bool(distributed), optimizer_sharding=sharding)
print(*result.notes, sep="\n")
print(inspect_checkpoint(name).optimizer)
from ckptkit.layouts import open_checkpoint
from ckptkit.optimizer.verify import master_copy_problems
for folder in (source, name):  # state in the wrong place shows as masters that are not the weights
    with open_checkpoint(folder) as weights:
        problems = master_copy_problems(weights)
    print(f"{folder}: masters match weights" if not problems else "\n".join(["MASTERS DIFFER", *problems[:8]]))
EOF
  echo "reshard $1 rc=$?" | tee -a "$OUT/reshard_$1.log"
}
for spec in $RUNS; do IFS=: read -r -a fields <<<"$spec"; reshard "${fields[@]}"; done

# 2. and 4. Megatron resumes from its own checkpoint (baseline) and from each reshard
resume() {  # NAME FORMAT TP PP DP DISTRIBUTED SHARDING EP PORT [FLAGS...]
  local name=$1 format=$2 tp=$3 pp=$4 dp=$5 distributed=$6 sharding=$7 ep=$8 port=$9 flags=""
  shift 9
  [ "$distributed" = 1 ] && flags=--use-distributed-optimizer
  [ "$sharding" = fully_reshardable ] && flags="$flags --dist-ckpt-optim-fully-reshardable"
  # Megatron refuses to train a mixture of experts at TP > 1 without sequence parallelism
  [ "$MODEL_KIND" = moe ] && [ "$tp" -gt 1 ] && flags="$flags --sequence-parallel"
  megatron "$name" $((tp * pp * dp)) "$port" --ckpt-format "$format" --tensor-model-parallel-size "$tp" \
    --pipeline-model-parallel-size "$pp" --expert-model-parallel-size "${ep:-1}" $flags --train-iters 15 \
    --load "$WORK/$name" --no-load-rng --exit-on-missing-checkpoint "$@"
}
ln -sfn "$WORK/source" "$WORK/baseline"
background resume baseline "$SOURCE_FORMAT" "$SOURCE_TP" "$SOURCE_PP" "$SOURCE_DP" "$SOURCE_DISTRIBUTED" - \
  "$SOURCE_EP" $((PORT + 10)) $SOURCE_FLAGS
port=$((PORT + 20))
for spec in $RUNS; do
  IFS=: read -r name from format tp pp dp distributed sharding ep <<<"$spec"
  background resume "$name" "$format" "$tp" "$pp" "$dp" "$distributed" "${sharding:--}" "${ep:-$SOURCE_EP}" $port
  port=$((port + 10))
done
wait

REPO=$REPO python3 - "$OUT" $NAMES <<'EOF' | tee "$OUT/losses.txt"
import os, sys
sys.path.insert(0, os.path.join(os.environ["REPO"], "tools"))
from megatron_losses import read_runs
out = sys.argv[1]
runs = ["train", "baseline"] + sys.argv[2:]
losses = read_runs(out, runs)
print("iteration " + " ".join(f"{run:>14}" for run in runs))
for iteration in range(1, 16):
    print(f"{iteration:9d} " + " ".join(f"{losses[run].get(iteration, float('nan')):14.6f}" for run in runs))
def largest(run, reference):
    diffs = [abs(losses[run][i] - losses[reference][i]) for i in range(11, 16)
             if i in losses[run] and i in losses[reference]]
    return len(diffs), max(diffs) if diffs else float("nan")
for run in runs[1:]:
    count, baseline = largest(run, "baseline")
    print(f"{run}: {count} resumed iterations, max |loss - baseline| = {baseline:.3g}, "
          f"max |loss - uninterrupted| = {largest(run, 'train')[1]:.3g}")
EOF
