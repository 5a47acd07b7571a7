#!/usr/bin/env bash
# Make the real Megatron-LM BERT and T5 fixtures tests/fixtures/{bert_core_tp2pp2,t5_tp2,
# bert_legacy_tp2pp2}.
#
# Megatron-LM trains each model for 10 iterations on random batches (tools/
# megatron_encoder_pretrain.py: Megatron's pretrain(), model provider and forward step from its
# examples/bert and examples/t5 scripts; only the dataset is ours, Megatron has no mock data for
# these models), float32, --transformer-impl local, fusions off, NullTokenizer --vocab-size 1000
# (padded vocabulary 1024), seed 42. Then tools/megatron_encoder_logits.py loads each checkpoint
# with Megatron's load_checkpoint (strict) and saves the logits Megatron computes for fixed inputs.
#
#   bert_core   Megatron-Core BertModel, local layer spec (--spec local --attention-backend
#               local: BertModel accepts no other backend with that spec), 4 layers, hidden 64,
#               4 heads, ffn 128, learned positions (64), binary head and 2 token types, tied
#               output layer. TP2 PP2, saved as torch_dist (dist/), converted to per-rank files
#               by Megatron's own --ckpt-convert-format torch (conv/torch/).
#   t5          Megatron-Core T5Model, local block specs, 2 encoder + 2 decoder layers, hidden 64,
#               4 heads, kv-channels 16, ffn 128, encoder length 32, decoder length 16, learned
#               positions (32), tied output layer, final LayerNorms on encoder and decoder (without
#               Transformer Engine the local block spec would drop them: see
#               tools/megatron_encoder_common.py). TP2 only: examples/t5/pretrain_t5.py raises
#               "Pipeline parallelism is not supported for T5." for any PP > 1. dist/ and conv/torch/.
#   bert_legacy The pre-Core megatron.legacy.model.BertModel of a 2024 Megatron-LM (fd5cfec0ba,
#               --use-legacy-models; tools/megatron_encoder_legacy_fixes.py makes it run without
#               apex), same sizes, TP2 PP2, per-rank files as the training run wrote them (torch/;
#               that version's legacy models have no torch_dist).
#
# Logits: bert_core and t5 at TP1 PP1 from dist/ (logits.pt) and at the training layout from
# conv/torch/ (logits_torch.pt); bert_legacy at TP2 PP2 from torch/ (logits.pt) and at TP1 PP1
# after that version's own tools/checkpoint/convert.py resharded a copy (tp1/, logits_tp1.pt).
# logits_tp1.pt is no reference: that converter leaves BERT's tokentype_embeddings freshly
# initialised and lm_head.bias at zero (seen on the committed fixture: its logits differ by 2.1).
#
# Needs MEGATRON_PATH (Megatron-LM d98e8a6 with examples/bert and examples/t5) and, for
# bert_legacy, MEGATRON_2024 (a copy of fd5cfec0ba's megatron/ and pretrain_bert.py; the fixes are
# applied to it here), 4 GPUs. Run from the repo root:
#   MEGATRON_PATH=... MEGATRON_2024=... OUT=/tmp/encoder-fixtures bash tools/megatron_encoder_fixtures.sh
# Leaves $OUT/NAME.tgz and $OUT/NAME.log per model. MODELS picks a subset.
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/encoder-fixtures}"
: "${WORK:=/tmp/encoder-fixtures-work}"
MEGATRON_2024=${MEGATRON_2024:-}
MODELS=${MODELS:-"bert_core t5 bert_legacy"}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$WORK"
FIRST_GPU=${CUDA_VISIBLE_DEVICES:-0}
FIRST_GPU=${FIRST_GPU%%,*}

source "$REPO/tools/megatron_encoder_flags.sh"

# Sets MODEL (bert or t5), TREE (Megatron source), ARGS (model flags), TP, PP, NPROC, FORMATS.
fixture_args() {
  TREE=$MEGATRON_PATH
  case $1 in
    bert_core) MODEL=bert TP=2 PP=2 NPROC=4 FORMATS=torch_dist
      ARGS=("${BERT_CORE[@]}") ;;
    t5) MODEL=t5 TP=2 PP=1 NPROC=2 FORMATS=torch_dist
      ARGS=("${T5[@]}") ;;
    bert_legacy) MODEL=bert TP=2 PP=2 NPROC=4 FORMATS=torch TREE=$MEGATRON_2024
      ARGS=("${BERT_LEGACY[@]}") ;;
    *) echo "unknown fixture $1" >&2; return 1 ;;
  esac
}

step() {  # LOG TIMEOUT TITLE COMMAND...
  local log=$1 limit=$2 title=$3; shift 3
  echo "== $title" >>"$log"
  echo "\$ $*" >>"$log"
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "rc=$rc ($title)" >>"$log"
  return $rc
}

# The training args Megatron pickled into the first per-rank file, as strings, for the README.
dump_args() {  # TREE PER_RANK_DIR OUT_JSON
  MEGATRON_PATH=$1 python3 - "$2" "$3" <<'EOF'
import glob, json, os, sys
import torch
sys.path.insert(0, os.environ["MEGATRON_PATH"])
first = sorted(glob.glob(f"{sys.argv[1]}/iter_*/mp_rank_*/model_optim_rng.pt"))[0]
state = torch.load(first, weights_only=False, map_location="cpu")
json.dump({k: str(v) for k, v in sorted(vars(state["args"]).items())}, open(sys.argv[2], "w"), indent=1)
print("args from", first, "->", sys.argv[2])
EOF
}

run_fixture() {  # NAME PORT
  local name=$1 port=$2 MODEL TREE ARGS TP PP NPROC FORMATS
  fixture_args "$name" || return 1
  local w=$WORK/$name log=$OUT/$name.log seq=()
  rm -rf "$w"; mkdir -p "$w"; : >"$log"
  [ "$MODEL" = bert ] && seq=(--seq-length 64)
  local layout=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
  if [ "$FORMATS" = torch_dist ]; then
    step "$log" 150 "train $name (TP$TP PP$PP, torch_dist)" \
      env MEGATRON_PATH="$TREE" torchrun --nproc-per-node "$NPROC" --master-port "$port" \
      "$REPO/tools/megatron_encoder_pretrain.py" "$MODEL" "${ARGS[@]}" "${seq[@]}" "${TRAIN[@]}" \
      "${layout[@]}" --ckpt-format torch_dist --save "$w/dist"
    step "$log" 100 "convert $name torch_dist -> torch (TP$TP PP$PP)" \
      env MEGATRON_PATH="$TREE" torchrun --nproc-per-node "$NPROC" --master-port $((port + 1)) \
      "$REPO/tools/megatron_encoder_pretrain.py" "$MODEL" "${ARGS[@]}" "${seq[@]}" "${TRAIN[@]}" \
      "${layout[@]}" --ckpt-format torch_dist --load "$w/dist" --no-load-optim --no-load-rng \
      --exit-on-missing-checkpoint --ckpt-convert-format torch --ckpt-convert-save "$w/conv"
    [ "$MODEL" = bert ] && seq=(--seq-length 32)
    step "$log" 100 "logits $name at TP1 PP1 from dist/" \
      env MEGATRON_PATH="$TREE" CUDA_VISIBLE_DEVICES="$FIRST_GPU" torchrun \
      --nproc-per-node 1 --master-port $((port + 2)) "$REPO/tools/megatron_encoder_logits.py" "$MODEL" \
      "${ARGS[@]}" "${seq[@]}" "${LOAD[@]}" --ckpt-format torch_dist --load "$w/dist" \
      --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --logits-out "$w/logits.pt" &
    step "$log.2" 100 "logits $name at TP$TP PP$PP from conv/torch/" \
      env MEGATRON_PATH="$TREE" torchrun --nproc-per-node "$NPROC" --master-port $((port + 3)) \
      "$REPO/tools/megatron_encoder_logits.py" "$MODEL" "${ARGS[@]}" "${seq[@]}" "${LOAD[@]}" \
      --ckpt-format torch --load "$w/conv/torch" "${layout[@]}" --logits-out "$w/logits_torch.pt"
    wait
    cat "$log.2" >>"$log"; rm -f "$log.2"
    dump_args "$TREE" "$w/conv/torch" "$w/args.json" >>"$log" 2>&1
  else
    step "$log" 150 "train $name (TP$TP PP$PP, per-rank torch files)" \
      env MEGATRON_PATH="$TREE" torchrun --nproc-per-node "$NPROC" --master-port "$port" \
      "$REPO/tools/megatron_encoder_pretrain.py" "$MODEL" "${ARGS[@]}" "${seq[@]}" "${TRAIN[@]}" \
      "${layout[@]}" --save "$w/torch"
    seq=(--seq-length 32)
    step "$log" 100 "logits $name at TP$TP PP$PP from torch/" \
      env MEGATRON_PATH="$TREE" torchrun --nproc-per-node "$NPROC" --master-port $((port + 3)) \
      "$REPO/tools/megatron_encoder_logits.py" "$MODEL" "${ARGS[@]}" "${seq[@]}" "${LOAD[@]}" \
      --load "$w/torch" "${layout[@]}" --logits-out "$w/logits.pt" &
    # Megatron's own converter of that version reshards a copy to TP1 PP1 (see the header).
    if step "$log.2" 100 "convert $name to TP1 PP1 with Megatron's tools/checkpoint/convert.py" \
      env CUDA_VISIBLE_DEVICES="$FIRST_GPU" python3 "$TREE/tools/checkpoint/convert.py" --model-type BERT \
      --loader megatron --saver megatron --load-dir "$w/torch" --save-dir "$w/tp1" \
      --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1 --megatron-path "$TREE"; then
      step "$log.2" 100 "logits $name at TP1 PP1 from tp1/ (Megatron's conversion)" \
        env MEGATRON_PATH="$TREE" CUDA_VISIBLE_DEVICES="$FIRST_GPU" torchrun --nproc-per-node 1 \
        --master-port $((port + 4)) "$REPO/tools/megatron_encoder_logits.py" "$MODEL" "${ARGS[@]}" \
        "${seq[@]}" "${LOAD[@]}" --load "$w/tp1" --tensor-model-parallel-size 1 \
        --pipeline-model-parallel-size 1 --logits-out "$w/logits_tp1.pt"
    fi
    wait
    cat "$log.2" >>"$log"; rm -f "$log.2"
    dump_args "$TREE" "$w/torch" "$w/args.json" >>"$log" 2>&1
  fi
  python3 - "$w" >>"$log" 2>&1 <<'EOF'
import glob, sys
import torch
for path in sorted(glob.glob(f"{sys.argv[1]}/logits*.pt")):
    saved = torch.load(path, weights_only=False)
    print(path, {k: (tuple(v.shape), str(v.dtype)) if torch.is_tensor(v) else v for k, v in saved.items()})
files = sorted(glob.glob(f"{sys.argv[1]}/logits*.pt"))
if len(files) == 2:
    a, b = (torch.load(f, weights_only=False) for f in files)
    for key in ("mlm_logits", "binary_logits", "logits"):
        if torch.is_tensor(a.get(key)):
            print(f"{key}: {a['layout']} vs {b['layout']} max abs {(a[key] - b[key]).abs().max().item():.3g}")
EOF
  ls -lR "$w" >>"$log"
  (cd "$w" && tar --exclude=tokenizer -czf "$OUT/$name.tgz" $(ls -d dist conv torch tp1 logits*.pt args.json 2>/dev/null)) >>"$log" 2>&1
  echo "== $name: done" >>"$log"
}

make -C "$MEGATRON_PATH/megatron/core/datasets" >/dev/null 2>&1 || echo "dataset helpers did not build (not needed by the mock data)"
if [ -n "$MEGATRON_2024" ]; then
  make -C "$MEGATRON_2024/megatron/core/datasets" >/dev/null 2>&1 || echo "2024 dataset helpers did not build"
fi

port=29600
for name in $MODELS; do
  if [ "$name" = bert_legacy ] && [ -z "$MEGATRON_2024" ]; then echo "bert_legacy needs MEGATRON_2024"; continue; fi
  run_fixture "$name" $port &
  port=$((port + 10))
done
wait
for name in $MODELS; do
  echo "##### $name"
  [ -f "$OUT/$name.log" ] && grep -E "^== |^rc=| iteration +[0-9]+/|saved logits|loaded checkpoint|load_return|max abs|Error|error:|Traceback|^/tmp" \
    "$OUT/$name.log" | grep -v Warning | head -80
done
ls -la "$OUT"
