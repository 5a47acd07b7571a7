#!/usr/bin/env bash
# Megatron-LM resumes training from ckptkit's reshards of real BERT and T5 checkpoints with
# optimizer state, with the losses it has resuming from its own checkpoints.
#
# PREPARED is what tools/megatron_encoder_resume_prepare.py wrote on the CPU: runs.txt (NAME
# MODEL FORMAT TP PP DP DISTRIBUTED SHARDING VPP SOURCE per line: ckptkit's reshard PREPARED/NAME
# of SOURCE), sources.txt (SOURCE MODEL FORMAT TP PP DP DISTRIBUTED SHARDING VPP) and sources/
# (the checkpoints tools/megatron_encoder_optimizer.sh made, saved at iteration 10).
#
# 1. For each source: Megatron trains from scratch to iteration 15 at its layout
#    (SOURCE_train.log, the uninterrupted run) and resumes from the source to 15
#    (SOURCE_baseline.log), side by side.
# 2. Megatron resumes from each reshard at the reshard's layout to iteration 15 (NAME.log), side
#    by side; a torch_dist reshard loads with --dist-ckpt-strictness log_all, which logs every
#    key of the checkpoint the run does not ask for and every key it asks for that is missing
#    (raise_all stops at rerun_state_machine_state, a key Megatron's own torch_dist checkpoints
#    hold and a run with --no-load-rng does not ask for).
# 3. The losses of iterations 11..15 of each resumed run, with the largest difference from its
#    source's baseline and uninterrupted runs (tools/megatron_losses.py: a run with a
#    traceback, a non-strict retry or a nonzero exit is FAILED).
# Megatron-LM gets tools/megatron_local_fixes.py --step-fix (see tools/megatron_resume_check.sh);
# every resume passes --no-load-rng (dropout is 0: nothing draws random numbers).
#   MEGATRON_PATH=... PREPARED=... OUT=/tmp/encoder-resume bash tools/megatron_encoder_resume.sh
# Leaves $OUT/NAME.log per Megatron run and $OUT/losses.txt.
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree with examples/bert and examples/t5}"
: "${PREPARED:?set PREPARED to the folder tools/megatron_encoder_resume_prepare.py wrote}"
: "${OUT:=/tmp/encoder-resume}"
: "${WORK:=/tmp/encoder-resume-work}"
: "${RUN_TIMEOUT:=170}"
: "${PORT:=29500}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
cp -r "$MEGATRON_PATH" "$WORK/megatron"
python3 "$REPO/tools/megatron_local_fixes.py" "$WORK/megatron" --step-fix || exit 1
MEGATRON=$WORK/megatron
make -C "$MEGATRON/megatron/core/datasets" >/dev/null 2>&1 || echo "dataset helpers did not build (not needed by the mock data)"
source "$REPO/tools/megatron_encoder_optimizer_flags.sh"
# Megatron writes nothing into the folders it loads from here (no --save), but a copy keeps PREPARED as shipped.
cp -r "$PREPARED" "$WORK/prepared"

megatron() {  # NAME MODEL GPUS PORT ARGS...
  local name=$1 model=$2 gpus=$3 port=$4 args; shift 4
  if [ "$model" = bert ]; then args=("${OPT_BERT[@]}"); else args=("${OPT_T5[@]}"); fi
  echo "\$ torchrun --nproc-per-node $gpus megatron_encoder_pretrain.py $model ${args[*]} ${OPT_TRAIN[*]} $*" >"$OUT/$name.log"
  timeout -k 5 "$RUN_TIMEOUT" env MEGATRON_PATH="$MEGATRON" torchrun --nproc-per-node "$gpus" \
    --master-port "$port" "$REPO/tools/megatron_encoder_pretrain.py" "$model" "${args[@]}" \
    "${OPT_TRAIN[@]}" "$@" >>"$OUT/$name.log" 2>&1
  echo "rc=$?" >>"$OUT/$name.log"
  echo "$name: $(tail -n 1 "$OUT/$name.log")"
}

echo "sources $(date -u +%T)"
port=$PORT
while read -r source model fmt tp pp dp distributed sharding vpp; do
  [ -n "$source" ] || continue
  opt_layout_flags "$fmt" "$tp" "$pp" "$dp" "$distributed" "$sharding" "$vpp"
  megatron "${source}_train" "$model" $((tp * pp * dp)) $port "${LAYOUT[@]}" </dev/null &
  megatron "${source}_baseline" "$model" $((tp * pp * dp)) $((port + 5)) "${LAYOUT[@]}" \
    --load "$WORK/prepared/sources/$source" --no-load-rng --exit-on-missing-checkpoint </dev/null &
  port=$((port + 10))
done <"$PREPARED/sources.txt"
wait

echo "reshards $(date -u +%T)"
while read -r name model fmt tp pp dp distributed sharding vpp source; do
  [ -n "$name" ] || continue
  opt_layout_flags "$fmt" "$tp" "$pp" "$dp" "$distributed" "$sharding" "$vpp"
  strict=()
  [ "$fmt" = torch_dist ] && strict=(--dist-ckpt-strictness log_all)
  megatron "$name" "$model" $((tp * pp * dp)) $port "${LAYOUT[@]}" --load "$WORK/prepared/$name" --no-load-rng \
    --exit-on-missing-checkpoint "${strict[@]}" </dev/null &
  port=$((port + 10))
done <"$PREPARED/runs.txt"
wait
echo "done $(date -u +%T)"

REPO=$REPO python3 - "$OUT" "$PREPARED/runs.txt" <<'PY' | tee "$OUT/losses.txt"
import os, sys
sys.path.insert(0, os.path.join(os.environ["REPO"], "tools"))
from megatron_losses import read_runs
out, runs_file = sys.argv[1:]
runs = [line.split() for line in open(runs_file) if line.strip()]
sources = sorted({run[9] for run in runs})
names = [f"{source}_{kind}" for source in sources for kind in ("train", "baseline")] + [run[0] for run in runs]
losses = read_runs(out, names)
print("iteration " + " ".join(f"{name:>19}" for name in names))
for iteration in range(9, 16):
    print(f"{iteration:9d} " + " ".join(f"{losses[name].get(iteration, float('nan')):19.6f}" for name in names))
def largest(run, reference):
    diffs = [abs(losses[run][i] - losses[reference][i]) for i in range(11, 16)
             if i in losses[run] and i in losses[reference]]
    return len(diffs), max(diffs) if diffs else float("nan")
for source in sources:
    count, diff = largest(f"{source}_baseline", f"{source}_train")
    print(f"{source} (Megatron's own checkpoint): {count} resumed iterations, max |baseline - uninterrupted| = {diff:.3g}")
for name, model, fmt, tp, pp, dp, distributed, sharding, vpp, source in runs:
    count, baseline = largest(name, f"{source}_baseline")
    layout = (f"{fmt} TP{tp} PP{pp}{' VPP' if vpp != '-' else ''} DP{dp} "
              f"{'distributed' if distributed == '1' else 'plain'}{'' if sharding == '-' else ' ' + sharding}")
    print(f"{name} ({source} -> {layout}): {count} resumed iterations, max |loss - baseline| = {baseline:.3g}, "
          f"max |loss - uninterrupted| = {largest(name, f'{source}_train')[1]:.3g}")
PY
