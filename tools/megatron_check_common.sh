# Sourced by tools/megatron_check_families.sh and tools/megatron_check_moe.sh, after they set
# CHECK, OUT and RUNS: checks MEGATRON_PATH, sets REPO and the environment of the runs, makes
# $OUT, and gives COMMON (the flags every logits run takes) and summarize.
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MEGATRON_PATH PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"

# Megatron's fusions off and no Transformer Engine (as tools/megatron_load_check.sh and the
# fixture scripts); the checkpoint gives the model, tools/megatron_logits.py the tokens.
COMMON="--use-checkpoint-args --no-load-optim --no-load-rng --exit-on-missing-checkpoint
  --micro-batch-size 2 --seq-length 32 --tokenizer-type NullTokenizer --vocab-size 1000
  --transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion
  --attention-backend unfused"

summarize() {  # PATTERN LINES TAR: each run's first LINES log lines matching PATTERN, then
  # every RUN_logits.pt and RUN.log in $OUT/TAR
  local run
  for run in $RUNS; do
    echo "##### $run"
    grep -E "$1" "$OUT/$run.log" | head -"$2"
  done
  tar -C "$OUT" -cf "$OUT/$3" $(cd "$OUT" && ls *_logits.pt *.log 2>/dev/null)
  ls -la "$OUT"
}
