#!/usr/bin/env bash
# Make the real Megatron-LM fixtures tests/fixtures/{qwen3_tp2,llama31_tp2}.
#
# Megatron-LM itself (pretrain_gpt.py, --transformer-impl local, float32) trains two small
# models for 10 iterations on its mock data at TP2 PP1 on 2 GPUs and saves them in the
# torch_dist format; Megatron's own --ckpt-convert-format torch turns each into per-rank
# files; tools/megatron_logits.py loads dist/ at TP1 PP1 and saves the logits Megatron
# computes for fixed tokens (torch.manual_seed(0); randint(0, 1000, (2, 32))).
#
#   qwen3:   4 layers, hidden 128, 8 heads, 2 query groups, kv_channels 32 (not 128/8),
#            q/k RMSNorm (--qk-layernorm), SwiGLU ffn 256, RMSNorm eps 1e-6, RoPE base 1e6,
#            no biases, untied output layer
#   llama31: the same without --qk-layernorm and --kv-channels (head dim 16),
#            RoPE base 500000 with Llama-3 scaling (--use-rope-scaling, factor 8)
#
# Needs a Megatron-LM source tree (MEGATRON_PATH) and 2 GPUs. Run from the repo root:
#   MEGATRON_PATH=$PWD/.devdata/megatron OUT=/tmp/fixtures bash tools/make_megatron_fixtures.sh
# Leaves $OUT/NAME_tp2.tgz (dist/, conv/torch/, logits.pt; tokenizer/ folders dropped) and
# $OUT/NAME.log for each model. The two models run side by side on the same 2 GPUs.
# The committed fixtures were made with Megatron-LM d98e8a64ddf34856e74b24714e3bedb2f5a39553
# on 2 H100s (about 2.5 minutes for both models).
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/megatron-fixtures}"
: "${WORK:=/tmp/megatron-fixtures-work}"
MODELS=${MODELS:-"qwen3 llama31"}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$WORK"

# Megatron's own fusions off and no Transformer Engine (as tools/megatron_load_check.sh).
IMPL="--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion
  --attention-backend unfused"
MODEL="--num-layers 4 --hidden-size 128 --num-attention-heads 8 --group-query-attention
  --num-query-groups 2 --ffn-hidden-size 256 --swiglu --normalization RMSNorm --norm-epsilon 1e-6
  --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights
  --seq-length 64 --max-position-embeddings 64 --init-method-std 0.05"
TRAIN="--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --micro-batch-size 2
  --global-batch-size 8 --train-iters 10 --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine
  --lr-warmup-iters 2 --weight-decay 0.01 --clip-grad 1.0 --seed 42 --log-interval 1
  --eval-iters 0 --eval-interval 1000 --tensor-model-parallel-size 2
  --pipeline-model-parallel-size 1"

model_args() {
  case $1 in
    qwen3) echo "--kv-channels 32 --qk-layernorm --rotary-base 1000000" ;;
    # This Megatron's gpt_builders.py passes use_rope_scaling but not the factor to GPTModel,
    # so the factor is GPTModel's default 8.0 whatever --rope-scaling-factor says.
    llama31) echo "--rotary-base 500000 --use-rope-scaling --rope-scaling-factor 8" ;;
  esac
}

# The C++ dataset helpers, compiled once before the two runs start side by side.
make -C "$MEGATRON_PATH/megatron/core/datasets" >/dev/null || exit 1
python3 -c "import torch; torch.manual_seed(0); torch.save({'tokens': torch.randint(0, 1000, (2, 32))}, '$WORK/tokens.pt')"

run_model() {  # NAME PORT GPU_FOR_LOGITS
  local name=$1 port=$2 gpu=$3 w=$WORK/$1 log=$OUT/$1.log
  rm -rf "$w"; mkdir -p "$w"
  echo "== $name: train (TP2, torch_dist)" >>"$log"
  timeout 240 torchrun --nproc-per-node 2 --master-port "$port" "$MEGATRON_PATH/pretrain_gpt.py" \
    $MODEL $(model_args "$name") $IMPL $TRAIN --ckpt-format torch_dist --save "$w/dist" \
    --save-interval 10 --no-save-optim --no-save-rng >>"$log" 2>&1
  echo "rc=$?" >>"$log"
  echo "== $name: convert torch_dist -> torch (TP2)" >>"$log"
  timeout 150 torchrun --nproc-per-node 2 --master-port $((port + 1)) "$MEGATRON_PATH/pretrain_gpt.py" \
    $MODEL $(model_args "$name") $IMPL $TRAIN --ckpt-format torch_dist --load "$w/dist" \
    --no-load-optim --no-load-rng --exit-on-missing-checkpoint \
    --ckpt-convert-format torch --ckpt-convert-save "$w/conv" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
  echo "== $name: logits (TP1 PP1 from dist/)" >>"$log"
  # --use-checkpoint-args does not carry qk_layernorm, use_rope_scaling or the norm epsilon:
  # they are given again here (model_args), as are the fusion switches.
  CUDA_VISIBLE_DEVICES=$gpu timeout 150 torchrun --nproc-per-node 1 --master-port $((port + 2)) \
    "$REPO/tools/megatron_logits.py" --load "$w/dist" --ckpt-format torch_dist \
    --tokens-file "$WORK/tokens.pt" --logits-out "$w/raw_logits.pt" --use-checkpoint-args \
    --no-load-optim --no-load-rng --exit-on-missing-checkpoint --micro-batch-size 2 --seq-length 32 \
    --tokenizer-type NullTokenizer --vocab-size 1000 --norm-epsilon 1e-6 $(model_args "$name") $IMPL \
    >>"$log" 2>&1
  echo "rc=$?" >>"$log"
  echo "== $name: logits.pt with the training args" >>"$log"
  python3 - "$w" >>"$log" 2>&1 <<'EOF'
import glob, os, sys
import torch
sys.path.insert(0, os.environ["MEGATRON_PATH"])
w = sys.argv[1]
try:
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict
    args = load_common_state_dict(f"{w}/dist/iter_0000010")["args"]
    print("args from dist/ common state")
except Exception as exc:  # fall back to the converted per-rank file
    print("dist common state unreadable:", repr(exc))
    f = sorted(glob.glob(f"{w}/conv/torch/iter_*/mp_rank_*/model_optim_rng.pt"))[0]
    args = torch.load(f, weights_only=False, map_location="cpu")["args"]
keys = """num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups
group_query_attention kv_channels seq_length max_position_embeddings vocab_size padded_vocab_size
make_vocab_size_divisible_by normalization layernorm_epsilon swiglu position_embedding_type
rotary_base rotary_percent rotary_interleaved use_rope_scaling rope_scaling_factor qk_layernorm
window_size untie_embeddings_and_output_weights add_bias_linear add_qkv_bias bf16 fp16 params_dtype
apply_query_key_layer_scaling openai_gelu squared_relu init_method_std tensor_model_parallel_size
pipeline_model_parallel_size transformer_impl ckpt_format seed train_iters micro_batch_size
global_batch_size lr min_lr lr_decay_style lr_warmup_iters weight_decay clip_grad""".split()
raw = torch.load(f"{w}/raw_logits.pt", weights_only=True)
out = {"tokens": raw["tokens"], "logits": raw["logits"], "vocab": 1000,
       "args": {k: str(getattr(args, k, None)) for k in keys}}
out["args"]["logits_computed_at"] = "TP1 PP1, float32, after loading dist/"
torch.save(out, f"{w}/logits.pt")
print({k: out["args"][k] for k in ("qk_layernorm", "kv_channels", "use_rope_scaling",
      "rope_scaling_factor", "rotary_base", "window_size", "layernorm_epsilon")})
print("logits", tuple(out["logits"].shape), out["logits"].dtype)
EOF
  echo "rc=$?" >>"$log"
  ls -lR "$w" >>"$log"
  tar -C "$w" --exclude=tokenizer -czf "$OUT/${name}_tp2.tgz" $(cd "$w" && ls -d dist conv logits.pt 2>/dev/null)
  echo "== $name: done" >>"$log"
}

gpu=0; port=29500
for name in $MODELS; do
  run_model "$name" $port $gpu &
  gpu=$(((gpu + 1) % 2)); port=$((port + 10))
done
wait
for name in $MODELS; do
  echo "##### $name"
  grep -E "^== |rc=| iteration +[0-9]+/|saved logits|Error|error:|Traceback|converted checkpoint|args from|\{'qk|^logits" "$OUT/$name.log" | head -60
done
ls -la "$OUT"
