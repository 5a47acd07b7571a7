#!/usr/bin/env bash
# Megatron-LM resumes training from optimizer state ckptkit resharded, with the losses it
# has when resuming from its own checkpoint.
#
# 1. Megatron trains a small Llama-style model (bf16, GQA, SwiGLU, RoPE, untied; or GPT-2
#    style fp32 with MODEL_KIND=gpt2) for 10 iterations at TP1 PP1 DP2 with the distributed
#    optimizer and saves per-rank files (--ckpt-format torch: model_optim_rng.pt +
#    distrib_optim.pt) at iteration 10.
# 2. baseline: Megatron resumes from its own checkpoint (same layout) to iteration 15.
# 3. ckptkit reshards weights and optimizer state (ckptkit.convert.reshard, then
#    ckptkit.optimizer.write_optimizer_state) to:
#      tp2       TP2 PP1 DP1, distributed optimizer        (a TP change)
#      pp2       TP1 PP2 DP1, distributed optimizer        (a PP change)
#      dp1       TP1 PP1 DP1, distributed optimizer, 1 GPU (a DP change)
#      nodist    TP1 PP1 DP2, non-distributed optimizer    (the other optimizer format)
#    and Megatron resumes from each to iteration 15.
# 4. The per-iteration losses of 11..15 are printed side by side with the baseline's.
#
# Every resume passes --no-load-rng (RNG state belongs to each rank of the old layout;
# dropout is 0, so nothing here draws random numbers). Megatron at d98e8a6 needs two local
# fixes in megatron/core/optimizer/distrib_optimizer.py to resume with PyTorch's Adam
# (neither Transformer Engine nor apex on the image; see ../shared/docs/formats.md): the
# script applies them to a copy of the tree and stops if their code is not found.
#
# Needs 2 GPUs and a Megatron-LM source tree. From the repo root:
#   MEGATRON_PATH=$PWD/.devdata/megatron OUT=/tmp/resume-check bash tools/megatron_resume_check.sh
# Leaves $OUT/NAME.log per run and $OUT/losses.txt.
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/resume-check}"
: "${WORK:=/tmp/resume-check-work}"
: "${MODEL_KIND:=llama}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"

# A copy of Megatron with the two fixes for resuming the distributed optimizer with torch Adam.
cp -r "$MEGATRON_PATH" "$WORK/megatron"
python3 - "$WORK/megatron/megatron/core/optimizer/distrib_optimizer.py" <<'EOF' || exit 1
import sys
path = sys.argv[1]
text = open(path).read()
fixes = [
    # state_dict() before the optimizer's first step: its state is empty, so there is no step yet
    ("            assert len(steps) == 1\n            step = steps[0]\n",
     "            assert len(steps) <= 1\n            step = steps[0] if steps else 0\n"),
    # loading parameter state: torch Adam's own state holds "step", which distrib_optim.pt does not
    ("                if not isinstance(tensors[key], torch.Tensor):\n",
     "                if not isinstance(tensors.get(key), torch.Tensor):\n"),
]
for old, new in fixes:
    if text.count(old) != 1:
        sys.exit(f"{path}: the code to fix was not found once: {old!r}")
    text = text.replace(old, new)
open(path, "w").write(text)
print("applied", len(fixes), "fixes")
EOF
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
  gpt2) MODEL="--num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256
          --seq-length 64 --max-position-embeddings 64"; DTYPE=float32 ;;
esac
TRAIN="--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --micro-batch-size 2
  --global-batch-size 8 --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine --lr-warmup-iters 2
  --lr-decay-iters 20 --weight-decay 0.01 --clip-grad 1.0 --seed 42 --log-interval 1
  --eval-iters 0 --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.05
  --ckpt-format torch"

megatron() {  # NAME GPUS PORT ARGS...
  local name=$1 gpus=$2 port=$3; shift 3
  echo "== $name" >"$OUT/$name.log"
  timeout 300 torchrun --nproc-per-node "$gpus" --master-port "$port" "$MEGATRON/pretrain_gpt.py" \
    $MODEL $IMPL $TRAIN "$@" >>"$OUT/$name.log" 2>&1
  echo "rc=$?" >>"$OUT/$name.log"
  tail -n 1 "$OUT/$name.log"
}

# 1. train and save at iteration 10: TP1 PP1 DP2, distributed optimizer
megatron train 2 29600 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
  --use-distributed-optimizer --train-iters 10 --save "$WORK/source" --save-interval 10

# 2. baseline: Megatron resumes from its own checkpoint
megatron baseline 2 29610 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
  --use-distributed-optimizer --train-iters 15 --load "$WORK/source" --no-load-rng --exit-on-missing-checkpoint

# 3. ckptkit reshards weights and optimizer state
reshard() {  # NAME TP PP DP DISTRIBUTED
  PYTHONPATH=$REPO python3 - "$WORK/source" "$WORK/$1" "$2" "$3" "$4" "$5" "$DTYPE" >"$OUT/reshard_$1.log" 2>&1 <<'EOF'
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
                                                            iteration=10, param_dtype=getattr(torch, sys.argv[7]))))
EOF
  echo "reshard $1 rc=$?"
}
reshard tp2 2 1 1 1
reshard pp2 1 2 1 1
reshard dp1 1 1 1 1
reshard nodist 1 1 2 0

# 4. Megatron resumes from each
megatron tp2 2 29620 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --use-distributed-optimizer \
  --train-iters 15 --load "$WORK/tp2" --no-load-rng --exit-on-missing-checkpoint
megatron pp2 2 29630 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --use-distributed-optimizer \
  --train-iters 15 --load "$WORK/pp2" --no-load-rng --exit-on-missing-checkpoint
megatron dp1 1 29640 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --use-distributed-optimizer \
  --train-iters 15 --load "$WORK/dp1" --no-load-rng --exit-on-missing-checkpoint
megatron nodist 2 29650 --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
  --train-iters 15 --load "$WORK/nodist" --no-load-rng --exit-on-missing-checkpoint

python3 - "$OUT" <<'EOF' | tee "$OUT/losses.txt"
import re, sys
out = sys.argv[1]
runs = ["train", "baseline", "tp2", "pp2", "dp1", "nodist"]
losses = {}
for run in runs:
    found = {}
    for line in open(f"{out}/{run}.log", errors="replace"):
        match = re.search(r"iteration\s+(\d+)/\s*\d+ \|.*lm loss: ([0-9.E+-]+)", line)
        if match:
            found[int(match.group(1))] = float(match.group(2))
    losses[run] = found
print("iteration " + " ".join(f"{run:>12}" for run in runs))
for iteration in range(1, 16):
    print(f"{iteration:9d} " + " ".join(f"{losses[run].get(iteration, float('nan')):12.6f}" for run in runs))
for run in runs[2:]:
    diffs = [abs(losses[run][i] - losses["baseline"][i]) for i in range(11, 16)
             if i in losses[run] and i in losses["baseline"]]
    print(f"{run}: {len(diffs)} resumed iterations, max |loss - baseline| = {max(diffs) if diffs else float('nan'):.3g}")
EOF
