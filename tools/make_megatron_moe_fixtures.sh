#!/usr/bin/env bash
# Make the real Megatron-LM mixture-of-experts fixtures tests/fixtures/{moe_mixtral_ep2_torch,
# moe_qwen2_ep2_torch,moe_qwen3_tp1ep2}.
#
# Megatron-LM itself (pretrain_gpt.py, --transformer-impl local, float32, experts as
# SequentialMLP, alltoall token dispatcher) trains three small MoE models for 10 iterations on
# its mock data at TP1 EP2 (DP2) on 2 GPUs, then tools/megatron_logits.py loads each checkpoint
# and saves the logits Megatron computes for fixed tokens (torch.manual_seed(0);
# randint(0, 1000, (2, 32))).
#
#   mixtral: 2 layers, hidden 96, 6 heads, 2 query groups, RoPE, RMSNorm, SwiGLU, no biases,
#            untied; every layer MoE: 4 experts of ffn 64, top-2 (top-k, then softmax over
#            the chosen). Saved with --ckpt-format torch (per-rank files, one per EP rank).
#   qwen2:   3 layers, --moe-layer-freq [0,1,1] (layer 0 dense, ffn 160), 3 query groups,
#            QKV bias, 4 experts of ffn 48, top-2 after a softmax over all experts
#            (--moe-router-pre-softmax), shared expert of ffn 64 with a sigmoid gate.
#            Saved with --ckpt-format torch.
#   qwen3:   like qwen2 without QKV bias and shared expert, with --qk-layernorm and
#            --kv-channels 32, default routing (top-k, then softmax). Saved as torch_dist.
#
# Per-rank files cannot be resharded at load, so their logits come from the same layout
# (2 processes, --expert-model-parallel-size 2); the torch_dist one is loaded at TP1 EP1 on one
# GPU. --use-checkpoint-args does not restore qk_layernorm or moe_shared_expert_gate, so the
# logits runs are given every model flag again.
#
# Needs a Megatron-LM source tree (MEGATRON_PATH) and 2 GPUs. Run from the repo root:
#   MEGATRON_PATH=$PWD/.devdata/megatron OUT=/tmp/moe-fixtures bash tools/make_megatron_moe_fixtures.sh
# Leaves $OUT/NAME.tgz (torch/ or dist/, logits.pt; tokenizer/ folders dropped) and
# $OUT/NAME.log for each model. SIDE_BY_SIDE=1 (the default) runs the three models at once on
# the same 2 GPUs (each job has its own process group and port; the models are tiny);
# SIDE_BY_SIDE=0 runs them one after another.
# The committed fixtures were made with Megatron-LM d98e8a64ddf34856e74b24714e3bedb2f5a39553
# on 2 H100s, side by side (90 seconds for the three models, trainings and logits).
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/megatron-moe-fixtures}"
: "${WORK:=/tmp/megatron-moe-fixtures-work}"
MODELS=${MODELS:-"mixtral qwen2 qwen3"}
SIDE_BY_SIDE=${SIDE_BY_SIDE:-1}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export MEGATRON_PATH PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$WORK"

# Megatron's own fusions off and no Transformer Engine (as tools/make_megatron_fixtures.sh).
IMPL=(--transformer-impl local --no-gradient-accumulation-fusion --no-masked-softmax-fusion
  --no-bias-gelu-fusion --no-bias-dropout-fusion --no-persist-layer-norm --no-rope-fusion
  --attention-backend unfused)
COMMON=(--hidden-size 96 --num-attention-heads 6 --group-query-attention --swiglu
  --normalization RMSNorm --position-embedding-type rope --disable-bias-linear
  --untie-embeddings-and-output-weights --max-position-embeddings 64 --init-method-std 0.05
  --num-experts 4 --moe-router-topk 2 --moe-token-dispatcher-type alltoall
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01)
TRAIN=(--mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --seq-length 64
  --micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 5e-4 --min-lr 5e-5
  --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01 --clip-grad 1.0 --seed 42
  --log-interval 1 --eval-iters 0 --eval-interval 1000 --tensor-model-parallel-size 1
  --pipeline-model-parallel-size 1 --expert-model-parallel-size 2 --save-interval 10
  --no-save-optim --no-save-rng)

# Sets NAME (fixture), FMT (torch or torch_dist), SUB (torch or dist) and ARGS (model flags).
model_args() {
  case $1 in
    mixtral) NAME=moe_mixtral_ep2_torch FMT=torch SUB=torch
      ARGS=(--num-layers 2 --num-query-groups 2 --ffn-hidden-size 64 --moe-ffn-hidden-size 64) ;;
    qwen2) NAME=moe_qwen2_ep2_torch FMT=torch SUB=torch
      ARGS=(--num-layers 3 --moe-layer-freq '[0,1,1]' --num-query-groups 3 --ffn-hidden-size 160
        --moe-ffn-hidden-size 48 --add-qkv-bias --moe-router-pre-softmax
        --moe-shared-expert-intermediate-size 64 --moe-shared-expert-gate) ;;
    qwen3) NAME=moe_qwen3_tp1ep2 FMT=torch_dist SUB=dist
      ARGS=(--num-layers 3 --moe-layer-freq '[0,1,1]' --num-query-groups 3 --ffn-hidden-size 160
        --moe-ffn-hidden-size 48 --qk-layernorm --kv-channels 32) ;;
    *) echo "unknown model $1" >&2; return 1 ;;
  esac
}

# The C++ dataset helpers, compiled once before any run starts.
make -C "$MEGATRON_PATH/megatron/core/datasets" >/dev/null || exit 1
python3 -c "import torch; torch.manual_seed(0); torch.save({'tokens': torch.randint(0, 1000, (2, 32))}, '$WORK/tokens.pt')"

run_model() {  # MODEL PORT
  local model=$1 port=$2 NAME FMT SUB ARGS
  model_args "$model" || return 1
  local w=$WORK/$NAME log=$OUT/$NAME.log
  rm -rf "$w"; mkdir -p "$w"; : >"$log"
  echo "== $NAME: train (TP1 EP2 DP2, --ckpt-format $FMT)" >>"$log"
  timeout ${TRAIN_TIMEOUT:-240} torchrun --nproc-per-node 2 --master-port "$port" \
    "$MEGATRON_PATH/pretrain_gpt.py" "${ARGS[@]}" "${COMMON[@]}" "${IMPL[@]}" "${TRAIN[@]}" \
    --ckpt-format "$FMT" --save "$w/$SUB" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
  local layout=(--nproc-per-node 2) ep=2
  if [ "$FMT" = torch_dist ]; then layout=(--nproc-per-node 1) ep=1; fi
  echo "== $NAME: logits (TP1 EP$ep from $SUB/)" >>"$log"
  timeout ${LOGITS_TIMEOUT:-180} torchrun "${layout[@]}" --master-port $((port + 1)) \
    "$REPO/tools/megatron_logits.py" --load "$w/$SUB" --ckpt-format "$FMT" \
    --tokens-file "$WORK/tokens.pt" --logits-out "$w/raw_logits.pt" --use-checkpoint-args \
    --no-load-optim --no-load-rng --exit-on-missing-checkpoint --micro-batch-size 2 \
    --seq-length 32 --tokenizer-type NullTokenizer --vocab-size 1000 \
    --tensor-model-parallel-size 1 --expert-model-parallel-size $ep \
    "${ARGS[@]}" "${COMMON[@]}" "${IMPL[@]}" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
  echo "== $NAME: logits.pt with the training args" >>"$log"
  python3 - "$w" "$SUB" "$ep" >>"$log" 2>&1 <<'EOF'
import os, sys
import torch
sys.path.insert(0, os.environ["MEGATRON_PATH"])
w, sub, ep = sys.argv[1], sys.argv[2], sys.argv[3]
if sub == "dist":
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict
    args = load_common_state_dict(f"{w}/dist/iter_0000010")["args"]
else:
    args = torch.load(f"{w}/torch/iter_0000010/mp_rank_00_000/model_optim_rng.pt",
                      weights_only=False, map_location="cpu")["args"]
keys = """num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups
group_query_attention kv_channels seq_length max_position_embeddings vocab_size padded_vocab_size
make_vocab_size_divisible_by normalization norm_epsilon swiglu position_embedding_type
rotary_base rotary_percent qk_layernorm untie_embeddings_and_output_weights add_bias_linear
add_qkv_bias bf16 fp16 params_dtype init_method_std num_experts moe_ffn_hidden_size
moe_router_topk moe_layer_freq moe_router_pre_softmax moe_router_score_function
moe_router_topk_scaling_factor moe_router_enable_expert_bias moe_shared_expert_intermediate_size
moe_shared_expert_gate moe_shared_expert_overlap moe_grouped_gemm moe_token_dispatcher_type
moe_router_load_balancing_type moe_aux_loss_coeff tensor_model_parallel_size
pipeline_model_parallel_size expert_model_parallel_size expert_tensor_parallel_size
transformer_impl ckpt_format seed train_iters micro_batch_size global_batch_size lr min_lr
lr_decay_style lr_warmup_iters weight_decay clip_grad""".split()
raw = torch.load(f"{w}/raw_logits.pt", weights_only=True)
out = {"tokens": raw["tokens"], "logits": raw["logits"], "vocab": 1000,
       "args": {k: str(getattr(args, k, None)) for k in keys}}
out["args"]["logits_computed_at"] = f"TP1 EP{ep}, float32, after loading {sub}/"
torch.save(out, f"{w}/logits.pt")
print(out["args"])
print("logits", tuple(out["logits"].shape), out["logits"].dtype)
EOF
  echo "rc=$?" >>"$log"
  ls -lR "$w" >>"$log"
  tar -C "$w" --exclude=tokenizer -czf "$OUT/$NAME.tgz" "$SUB" logits.pt >>"$log" 2>&1
  echo "== $NAME: done" >>"$log"
}

port=29500
for model in $MODELS; do
  if [ "$SIDE_BY_SIDE" = 1 ]; then run_model "$model" $port & else run_model "$model" $port; fi
  port=$((port + 10))
done
wait
for model in $MODELS; do
  model_args "$model" || continue
  echo "##### $NAME"
  grep -E "^== |rc=| iteration +[0-9]+/|saved logits|ranks agree|load_return|Error|error:|Traceback|^logits" \
    "$OUT/$NAME.log" | head -60
done
ls -la "$OUT"
