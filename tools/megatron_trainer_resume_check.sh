#!/usr/bin/env bash
# Megatron-LM resumes training from a checkpoint of ckptkit's trainer, optimizer state
# included, and its losses show the state was read as ckptkit reads it.
#
# 1. The trainer (ckptkit train, CPU processes over gloo, bf16 weights and compute with
#    float32 master weights, as on a GPU) trains the "gpt2" preset
#    (4 layers, hidden 128, 4 heads, ffn 512, vocabulary 1000 padded to 1024, learned
#    positions up to 1024, tied embeddings) at TP1 PP1 DP2 with the distributed optimizer,
#    sequence 64, micro-batch 2, global batch 8, lr 5e-4 -> 5e-5 cosine with 2 warm-up
#    iterations over 15, and saves per-rank files (model_optim_rng.pt + distrib_optim.pt)
#    at iteration 10 (and 15, removed; the tracker is set back to 10).
# 2. ckptkit reshards iteration 10 (weights with ckptkit.convert.reshard, optimizer state
#    with ckptkit.optimizer.write_optimizer_state) to
#      tp2      TP2 PP1 DP1, distributed optimizer      (2 GPUs)
#      dp1      TP1 PP1 DP1, distributed optimizer      (1 GPU)
#      nodist   TP1 PP1 DP1, non-distributed optimizer  (1 GPU)
# 3. Megatron-LM resumes to iteration 15 (mock data: every run sees the same tokens) from
#      direct   the trainer's own files, TP1 DP2, distributed optimizer (2 GPUs)
#      tp2, dp1, nodist   the reshards
#      fresh    the trainer's own files with --no-load-optim (2 GPUs): the control; without
#               the state Megatron starts a new Adam (and LR schedule).
#    Every load must be strict: Megatron retries a failed strict load non-strictly and
#    prints "load_return: ...", and such a line, a traceback or a nonzero exit is FAILED.
# 4. The per-iteration losses side by side, and each run's largest difference from "direct"
#    over iterations 11..15. Iteration 11's loss depends on the weights only; from 12 on it
#    depends on the Adam state. "direct" equal to the reshards means Megatron reads the
#    trainer's files as ckptkit reads them (ckptkit's reshards were checked against
#    Megatron's own checkpoints in tools/megatron_resume_check.sh); "fresh" differing from
#    12 on shows the state is used. The second logged iteration of a run is the mean of its
#    first two (training_log keeps accumulating after the first), so the table gives
#    2 x logged - first there.
#
# bf16, not float32: Megatron d98e8a6 cannot load a float32 distributed-optimizer state from
# per-rank files (load_parameter_state_from_dp_zero copies the masters into the model's own
# float32 parameters, leaves that require grad, outside no_grad: "a view of a leaf Variable
# that requires grad is being used in an in-place operation"; a float32 run of this check
# failed so in its direct, tp2 and dp1 resumes, while nodist and fresh ran).
#
# Megatron at d98e8a6 needs the local fixes of tools/megatron_resume_check.sh to resume the
# distributed optimizer with PyTorch's Adam (no Transformer Engine or apex), including its
# STEP_FIX (each parameter its own step tensor); they are applied to a copy of the tree,
# and the script stops if their code is not found. Every resume passes --no-load-rng.
#
# Needs 2 GPUs and a Megatron-LM source tree. From the repo root:
#   MEGATRON_PATH=$PWD/.devdata/megatron OUT=/tmp/trainer-resume bash tools/megatron_trainer_resume_check.sh
# The five resumes run side by side (the model is tiny). WAIT_FOR=FILE runs the 1-GPU ones
# first, on the second GPU, and holds the 2-GPU ones back until FILE exists, so that another
# job can use the first GPU meanwhile.
# Leaves $OUT/NAME.log per Megatron run, $OUT/trainer.log, $OUT/reshard_NAME.log and
# $OUT/losses.txt. On 2 H200s the whole check took about 65 s; its figures are in
# docs/trainer.md (Checkpoints).
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/trainer-resume}"
: "${WORK:=/tmp/trainer-resume-work}"
: "${RUN_TIMEOUT:=150}"
: "${WAIT_FOR:=}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
IFS=, read -r -a VISIBLE <<<"${CUDA_VISIBLE_DEVICES:-0,1}"
BOTH="${VISIBLE[0]},${VISIBLE[1]:-${VISIBLE[0]}}"
SECOND="${VISIBLE[1]:-${VISIBLE[0]}}"

# A copy of Megatron with the fixes of tools/megatron_resume_check.sh (STEP_FIX=1).
cp -r "$MEGATRON_PATH" "$WORK/megatron"
python3 "$REPO/tools/megatron_local_fixes.py" "$WORK/megatron" --step-fix || exit 1
MEGATRON=$WORK/megatron
make -C "$MEGATRON/megatron/core/datasets" >/dev/null || exit 1

# 1. the trainer, on CPU processes (gloo), bf16 with float32 masters
SCHEDULE_TRAINER="--lr 5e-4 --min-lr 5e-5 --warmup-steps 2 --weight-decay 0.01 --clip-grad 1.0"
(cd "$REPO" && timeout "$RUN_TIMEOUT" python3 -m ckptkit.train --model gpt2 --device cpu --dtype bfloat16 \
  --tp 1 --pp 1 --dp 2 --distributed-optimizer --steps 15 --save-interval 10 --save "$WORK/trainer" \
  --micro-batch-size 2 --global-batch-size 8 --seq-length 64 $SCHEDULE_TRAINER \
  --log-json "$OUT/trainer_losses.jsonl") >"$OUT/trainer.log" 2>&1
echo "trainer rc=$?" | tee -a "$OUT/trainer.log"
[ -d "$WORK/trainer/iter_0000010" ] || { echo "no trainer checkpoint at iteration 10"; exit 1; }
rm -rf "$WORK/trainer/iter_0000015" && echo 10 >"$WORK/trainer/latest_checkpointed_iteration.txt"
ls -lR "$WORK/trainer" >>"$OUT/trainer.log"
(cd "$REPO" && python3 -m ckptkit.cli verify "$WORK/trainer" 2>&1 | tail -n 20) >>"$OUT/trainer.log"

# 2. ckptkit reshards weights and optimizer state
reshard() {  # NAME TP PP DP DISTRIBUTED
  (cd "$REPO" && python3 - "$WORK/trainer" "$WORK/$1" "$2" "$3" "$4" "$5") >"$OUT/reshard_$1.log" 2>&1 <<'EOF'
import sys
import torch
from ckptkit.convert import reshard
from ckptkit.optimizer import OptimizerTarget, read_optimizer_state, write_optimizer_state
source, out = sys.argv[1:3]
tp, pp, dp, distributed = map(int, sys.argv[3:7])
print(reshard(source, out, tp=tp, pp=pp).notes)
with read_optimizer_state(source) as state:
    print(state.info.summary())
    print(write_optimizer_state(state, out, OptimizerTarget(tp=tp, pp=pp, dp=dp, distributed=bool(distributed),
                                                            iteration=10, param_dtype=torch.bfloat16)))
EOF
  echo "reshard $1 rc=$?" | tee -a "$OUT/reshard_$1.log"
}
reshard tp2 2 1 1 1 &
reshard dp1 1 1 1 1 &
reshard nodist 1 1 1 0 &
wait

# 3. Megatron resumes
MODEL="--num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 512
  --seq-length 64 --max-position-embeddings 1024 --bf16"
IMPL="--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion
  --attention-backend unfused"
TRAIN="--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --micro-batch-size 2
  --global-batch-size 8 --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine --lr-warmup-iters 2
  --lr-decay-iters 15 --weight-decay 0.01 --clip-grad 1.0 --seed 42 --log-interval 1
  --eval-iters 0 --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0
  --ckpt-format torch --train-iters 15 --no-load-rng --exit-on-missing-checkpoint"
resume() {  # NAME FROM GPUS DEVICES PORT TP ARGS...
  local name=$1 from=$2 gpus=$3 devices=$4 port=$5 tp=$6; shift 6
  echo "== $name" >"$OUT/$name.log"
  CUDA_VISIBLE_DEVICES=$devices timeout "$RUN_TIMEOUT" torchrun --nproc-per-node "$gpus" --master-port "$port" \
    "$MEGATRON/pretrain_gpt.py" $MODEL $IMPL $TRAIN --tensor-model-parallel-size "$tp" \
    --pipeline-model-parallel-size 1 --load "$WORK/$from" "$@" >>"$OUT/$name.log" 2>&1
  echo "rc=$?" >>"$OUT/$name.log"
  echo "$name: $(tail -n 1 "$OUT/$name.log")"
}
resume dp1 dp1 1 "$SECOND" 29710 1 --use-distributed-optimizer &
resume nodist nodist 1 "$SECOND" 29720 1 &
if [ -n "$WAIT_FOR" ]; then
  wait
  echo "waiting for $WAIT_FOR before the 2-GPU runs"
  while [ ! -e "$WAIT_FOR" ]; do sleep 1; done
fi
resume direct trainer 2 "$BOTH" 29730 1 --use-distributed-optimizer &
resume tp2 tp2 2 "$BOTH" 29740 2 --use-distributed-optimizer &
resume fresh trainer 2 "$BOTH" 29750 1 --use-distributed-optimizer --no-load-optim &
wait

# 4. losses side by side
REPO=$REPO python3 - "$OUT" direct tp2 dp1 nodist fresh <<'EOF' | tee "$OUT/losses.txt"
import json, os, sys
sys.path.insert(0, os.path.join(os.environ["REPO"], "tools"))
from megatron_losses import read_runs
out, runs = sys.argv[1], sys.argv[2:]
losses = read_runs(out, runs)
trainer = {}
if os.path.exists(f"{out}/trainer_losses.jsonl"):
    for line in open(f"{out}/trainer_losses.jsonl"):
        record = json.loads(line)
        trainer[record["step"]] = record["loss"]
print("iteration " + " ".join(f"{run:>12}" for run in runs) + f" {'trainer*':>12}")
for iteration in range(11, 16):
    print(f"{iteration:9d} " + " ".join(f"{losses[run].get(iteration, float('nan')):12.6f}" for run in runs)
          + f" {trainer.get(iteration, float('nan')):12.6f}")
print("* the trainer's own run on its synthetic corpus (other tokens than Megatron's mock data)")
for run in runs[1:]:
    diffs = {i: abs(losses[run][i] - losses["direct"][i]) for i in range(11, 16)
             if i in losses[run] and i in losses["direct"]}
    later = [value for i, value in diffs.items() if i >= 12]
    print(f"{run}: {len(diffs)} iterations, |loss - direct| at 11: {diffs.get(11, float('nan')):.3g}, "
          f"max over 12..15: {max(later) if later else float('nan'):.3g}")
EOF
