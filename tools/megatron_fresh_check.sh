#!/usr/bin/env bash
# Megatron-LM trains from the fresh optimizer state that `ckptkit hf-to-megatron --optimizer
# fresh` writes, with the losses of a run that builds its optimizer itself.
#
#   prepare (CPU):  the real bf16 Llama fixture (tests/fixtures/llama_tp2pp2/conv/torch,
#                   TP2 PP2) -> ckptkit megatron-to-hf -> ckptkit hf-to-megatron --tp 1 --pp 1
#                   --optimizer fresh --megatron-args "$TRAIN" (plain optimizer, DP 1):
#                   $CHECK/hf and $CHECK/fresh.
#   run (1 GPU):    Megatron's pretrain_gpt.py, 5 iterations on mock data, twice side by side
#                   on the same GPU from $CHECK/fresh:
#                     fresh     --load, optimizer and LR schedule loaded from the checkpoint
#                               (no --no-load-optim, no --finetune; --no-load-rng: ckptkit
#                               writes no rng_state)
#                     finetune  --load --finetune --no-load-optim: the weights alone, an optimizer
#                               and LR schedule built by Megatron itself
#                   then checks that both loaded strictly (Megatron retries a failed strict load
#                   non-strictly and prints "load_return: ..."), exited 0, started at iteration
#                   1, and prints their losses side by side with the largest difference.
#
# The plain (non-distributed) optimizer: with the distributed one and PyTorch's AdamW,
# Megatron d98e8a6 gives every parameter of a rank one shared step tensor on load
# (docs/optimizer.md), so its first updates would differ for that reason alone.
#
# From the repo root, with ckptkit from a clean copy of the commit:
#   mkdir -p .devdata/ckptkit-fresh && git archive HEAD ckptkit | tar -x -C .devdata/ckptkit-fresh
#   CKPTKIT_PATH=$PWD/.devdata/ckptkit-fresh bash tools/megatron_fresh_check.sh prepare
#   (prepare also packs $CHECK/fresh as .devdata/freshpack/fresh.tar.xz, 2.6 MB, to carry)
#   # on the GPU machine, with the packed checkpoint and the packed Megatron tree:
#   mkdir -p /tmp/m /tmp/fc && tar -xJf .devdata/pack/megatron.tar.xz -C /tmp/m
#   tar -xJf .devdata/freshpack/fresh.tar.xz -C /tmp/fc
#   CHECK=/tmp/fc MEGATRON_PATH=/tmp/m/megatron OUT=/tmp/fresh RUN_TIMEOUT=140 \
#     bash tools/megatron_fresh_check.sh run
# Leaves $OUT/{fresh,finetune}.log and $OUT/losses.txt; `report` prints the table again from
# them. The figures in docs/optimizer.md were made so on one H100 (the two runs took 40 s).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
: "${CHECK:=$REPO/.devdata/freshcheck}"
: "${OUT:=/tmp/fresh-check}"
: "${CKPTKIT_PATH:=$REPO}"
FIXTURE=$REPO/tests/fixtures/llama_tp2pp2/conv/torch

# The training flags: given to ckptkit (--megatron-args) and to Megatron alike.
TRAIN="--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --micro-batch-size 2
  --global-batch-size 8 --train-iters 5 --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine
  --lr-warmup-iters 2 --lr-decay-iters 20 --weight-decay 0.01 --clip-grad 1.0 --seed 42
  --log-interval 1 --eval-iters 0 --eval-interval 1000 --hidden-dropout 0 --attention-dropout 0
  --ckpt-format torch"
# The fixture's model (its args), given again: --use-checkpoint-args is not used.
MODEL="--num-layers 4 --hidden-size 128 --num-attention-heads 8 --group-query-attention
  --num-query-groups 2 --ffn-hidden-size 320 --swiglu --normalization RMSNorm
  --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
  --seq-length 64 --max-position-embeddings 64 --bf16"
IMPL="--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion
  --attention-backend unfused"

ckptkit() {  # from /tmp, so that the ckptkit of the current folder does not shadow CKPTKIT_PATH
  (cd /tmp && PYTHONPATH=$CKPTKIT_PATH python3 -c \
    'import sys; sys.argv[0] = "ckptkit"; from ckptkit.cli import main; sys.exit(main())' "$@")
}

prepare() {
  rm -rf "$CHECK" && mkdir -p "$CHECK" "$REPO/.devdata/freshpack"
  (cd /tmp && PYTHONPATH=$CKPTKIT_PATH python3 -c 'import ckptkit; print("ckptkit from", ckptkit.__file__)')
  ckptkit megatron-to-hf "$FIXTURE" "$CHECK/hf" || exit 1
  ckptkit hf-to-megatron "$CHECK/hf" "$CHECK/fresh" --tp 1 --pp 1 --optimizer fresh \
    --megatron-args "$TRAIN" || exit 1
  ckptkit inspect "$CHECK/fresh"
  ckptkit verify "$CHECK/fresh"
  ls -lR "$CHECK/fresh"
  tar -C "$CHECK" -cf - fresh | xz -9 >"$REPO/.devdata/freshpack/fresh.tar.xz"
}

run() {
  : "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
  export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  mkdir -p "$OUT"
  make -C "$MEGATRON_PATH/megatron/core/datasets" >/dev/null || exit 1
  megatron() {  # NAME PORT ARGS...
    local name=$1 port=$2; shift 2
    echo "== $name: $*" >"$OUT/$name.log"
    timeout "${RUN_TIMEOUT:-150}" torchrun --nproc-per-node 1 --master-port "$port" \
      "$MEGATRON_PATH/pretrain_gpt.py" $MODEL $IMPL $TRAIN \
      --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 \
      --load "$CHECK/fresh" --no-load-rng --exit-on-missing-checkpoint "$@" >>"$OUT/$name.log" 2>&1
    echo "rc=$?" >>"$OUT/$name.log"
    echo "$name: $(tail -n 1 "$OUT/$name.log")"
  }
  megatron fresh 29700 &
  megatron finetune 29710 --finetune --no-load-optim &
  wait
  report
}

report() {
  python3 - "$OUT" <<'EOF' | tee "$OUT/losses.txt"
import re, sys
out = sys.argv[1]
runs = ["fresh", "finetune"]
losses, raw = {}, {}
for run in runs:
    lines = open(f"{out}/{run}.log", errors="replace").read().splitlines()
    problems = [l for l in lines if l.startswith("load_return") or re.match(r"\w*(Error|Exception)\b", l)]
    strict = not any(l.startswith("load_return") for l in lines)
    found = {}
    for line in lines:
        m = re.search(r"iteration\s+(\d+)/\s*\d+ \|.*lm loss: ([0-9.E+-]+)", line)
        if m:
            found[int(m.group(1))] = float(m.group(2))
    raw[run] = dict(found)
    if 1 in found and 2 in found:  # the second logged iteration averages the first two
        found[2] = 2 * found[2] - found[1]
    losses[run] = found
    print(f"{run}: rc=0 {'rc=0' in lines}; strict load (no load_return) {strict}; "
          f"first iteration {min(found) if found else None}; iterations {sorted(found)}")
    for line in [l for l in lines if "loading checkpoint" in l or "successfully loaded" in l][:3]:
        print("   ", line.strip())
    for p in problems[:4]:
        print("  PROBLEM:", p)
print("iteration " + " ".join(f"{r:>12}" for r in runs) + "   (logged: " + " ".join(runs) + ")")
for i in range(1, 6):
    print(f"{i:9d} " + " ".join(f"{losses[r].get(i, float('nan')):12.6f}" for r in runs)
          + "   " + " ".join(f"{raw[r].get(i, float('nan')):.6E}" for r in runs))
diffs = [abs(losses["fresh"][i] - losses["finetune"][i]) for i in range(1, 6)
         if i in losses["fresh"] and i in losses["finetune"]]
print(f"{len(diffs)} iterations compared, max |fresh - finetune| = {max(diffs) if diffs else float('nan'):.3g}")
EOF
}

case ${1:-} in
  prepare) prepare ;;
  run) run ;;
  report) report ;;
  *) echo "usage: $0 prepare|run|report"; exit 2 ;;
esac
