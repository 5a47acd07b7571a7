#!/usr/bin/env bash
# Make the real Megatron-LM DeepSeek-style fixtures tests/fixtures/deepseek_*.
#
# Megatron-LM itself (pretrain_gpt.py through tools/megatron_deepseek_pretrain.py, which makes
# the two build-time changes tools/megatron_deepseek_local.py explains; --transformer-impl local, float32, fusions off, mock
# data, NullTokenizer, vocabulary 1000, sequence 64, seed 42) trains small multi-latent
# attention (MLA) mixture-of-experts models for 10 iterations and saves them; then
# tools/megatron_deepseek_logits.py loads each checkpoint and saves the logits Megatron
# computes for fixed tokens (torch.manual_seed(0); randint(0, 1000, (2, 32))), with the
# multi-token prediction (MTP) head's logits where the model has one.
#
#   v3:    DeepSeek-V3 style. 2 layers, hidden 64, 4 heads; MLA with q_lora_rank 48,
#          kv_lora_rank 32, qk_head_dim 16, qk_pos_emb_head_dim 8, v_head_dim 16, q/kv
#          RMSNorms (--qk-layernorm), YaRN rope (factor 4, mscale 1, mscale_all_dim 1; Megatron
#          keeps original_max_position_embeddings 4096, beta_fast 32, beta_slow 1 for MLA).
#          Layer 0 dense (ffn 128), layer 1 MoE: 8 experts of ffn 16, sigmoid scores with
#          expert bias (aux-loss-free balancing, updated each step), group-limited top-4 (4
#          groups, 2 chosen), routed scaling factor 2.5, shared expert of ffn 32; one MTP layer.
#          TP1 EP2 (DP2), saved as torch_dist; logits at TP1 EP1 on one GPU.
#   v3tp2: the same model at TP2 EP1 (experts TP2, sequence parallel), saved as per-rank files
#          (--ckpt-format torch); logits at TP2 (vocabulary slices gathered). Fails with
#          Megatron-LM d98e8a6: it refuses MoE at TP2 without sequence parallelism, and its local
#          spec refuses sequence parallelism with torch's LayerNorm (the default MODELS leave it out).
#   v2:    DeepSeek-V2 style. MLA as v3 with plain rope, 4 experts of ffn 32, top-2 of a softmax
#          over all experts (--moe-router-pre-softmax; Hugging Face's topk_method "greedy"),
#          routed scaling factor 1.5, shared expert of ffn 64, layer 0 dense; no MTP. TP1 EP2,
#          per-rank files; logits at EP2 on 2 GPUs (per-rank files load only at the layout that
#          wrote them).
#
# No model here lacks q_lora_rank (DeepSeek-V2-Lite's plain linear_q_proj): Megatron-LM d98e8a6's
# local spec cannot build MLA with q/kv norms and no q_lora_rank (its QKNormConfigResolver wants
# the q norm fused into linear_q_proj, which needs Transformer Engine), and without the norms it
# is not a DeepSeek model.
#
# Needs a Megatron-LM source tree (MEGATRON_PATH) and 2 GPUs. Run from the repo root:
#   MEGATRON_PATH=$PWD/.devdata/megatron OUT=/tmp/ds-fixtures bash tools/make_megatron_deepseek_fixture.sh
# Leaves $OUT/NAME.tgz (dist/ or torch/, logits.pt; tokenizer/ dropped) and $OUT/NAME.log per
# model. The three models train side by side on the same 2 GPUs (own ports; they are tiny).
set -u
: "${MEGATRON_PATH:?set MEGATRON_PATH to a Megatron-LM source tree}"
: "${OUT:=/tmp/megatron-deepseek-fixtures}"
: "${WORK:=/tmp/megatron-deepseek-fixtures-work}"
MODELS=${MODELS:-"v3 v2"}
REPO=$(cd "$(dirname "$0")/.." && pwd)
export MEGATRON_PATH PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$WORK"

# IMPL, COMMON (every model), V3 and V2 (each model's own flags).
source "$REPO/tools/megatron_deepseek_flags.sh"
TRAIN=(--mock-data --seq-length 64 --micro-batch-size 2 --global-batch-size 8 --train-iters 10
  --lr 5e-4 --min-lr 5e-5 --lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01
  --clip-grad 1.0 --seed 42 --log-interval 1 --eval-iters 0 --eval-interval 1000
  --pipeline-model-parallel-size 1 --save-interval 10 --no-save-optim --no-save-rng)

# Sets NAME (fixture), FMT, SUB, ARGS (model flags), PAR (training layout), LOGITS_PAR and NPROC
# (the layout the logits are computed at).
model_args() {
  case $1 in
    v3) NAME=deepseek_v3_tp1ep2 FMT=torch_dist SUB=dist ARGS=("${V3[@]}")
      PAR=(--tensor-model-parallel-size 1 --expert-model-parallel-size 2)
      LOGITS_PAR=(--tensor-model-parallel-size 1 --expert-model-parallel-size 1) NPROC=1 ;;
    v3tp2) NAME=deepseek_v3_tp2_torch FMT=torch SUB=torch ARGS=("${V3[@]}")
      # Megatron refuses to train MoE at TP > 1 without sequence parallelism (moe_layer.py);
      # it changes no weight, and the logits run (eval) goes without it.
      PAR=(--tensor-model-parallel-size 2 --expert-model-parallel-size 1 --sequence-parallel)
      LOGITS_PAR=(--tensor-model-parallel-size 2 --expert-model-parallel-size 1) NPROC=2 ;;
    v2) NAME=deepseek_v2_ep2_torch FMT=torch SUB=torch ARGS=("${V2[@]}")
      PAR=(--tensor-model-parallel-size 1 --expert-model-parallel-size 2)
      LOGITS_PAR=("${PAR[@]}") NPROC=2 ;;
    *) echo "unknown model $1" >&2; return 1 ;;
  esac
}

# PRINT_ARGS=MODEL prints that model's training flags and exits (to check them with Megatron's
# argument parser elsewhere).
if [ -n "${PRINT_ARGS:-}" ]; then
  model_args "$PRINT_ARGS" || exit 1
  echo "${ARGS[@]}" "${COMMON[@]}" "${IMPL[@]}" "${TRAIN[@]}" "${PAR[@]}" --ckpt-format "$FMT"
  exit 0
fi

# The C++ dataset helpers, compiled once before any run starts.
timeout 120 make -C "$MEGATRON_PATH/megatron/core/datasets" >/dev/null || echo "make of the dataset helpers failed"
python3 -c "import torch; torch.manual_seed(0); torch.save({'tokens': torch.randint(0, 1000, (2, 32))}, '$WORK/tokens.pt')"

run_model() {  # MODEL PORT
  local model=$1 port=$2 NAME FMT SUB ARGS PAR LOGITS_PAR NPROC
  model_args "$model" || return 1
  local w=$WORK/$NAME log=$OUT/$NAME.log
  rm -rf "$w"; mkdir -p "$w"; : >"$log"
  echo "== $NAME: train (${PAR[*]}, --ckpt-format $FMT)" >>"$log"
  timeout ${TRAIN_TIMEOUT:-150} torchrun --nproc-per-node 2 --master-port "$port" \
    "$REPO/tools/megatron_deepseek_pretrain.py" "${ARGS[@]}" "${COMMON[@]}" "${IMPL[@]}" "${TRAIN[@]}" \
    "${PAR[@]}" --ckpt-format "$FMT" --save "$w/$SUB" >>"$log" 2>&1
  echo "rc=$?" >>"$log"
  echo "== $NAME: logits (${LOGITS_PAR[*]}, $NPROC processes, from $SUB/)" >>"$log"
  timeout ${LOGITS_TIMEOUT:-90} torchrun --nproc-per-node $NPROC --master-port $((port + 1)) \
    "$REPO/tools/megatron_deepseek_logits.py" --load "$w/$SUB" --ckpt-format "$FMT" \
    --tokens-file "$WORK/tokens.pt" --logits-out "$w/raw_logits.pt" --no-load-optim --no-load-rng \
    --exit-on-missing-checkpoint --micro-batch-size 2 --seq-length 32 \
    "${LOGITS_PAR[@]}" "${ARGS[@]}" "${COMMON[@]}" "${IMPL[@]}" >>"$log" 2>&1
  local rc=$?
  echo "rc=$rc" >>"$log"
  if [ $rc -ne 0 ] && [ "$NPROC" = 1 ]; then
    echo "== $NAME: logits again at the training layout (${PAR[*]}, 2 processes)" >>"$log"
    LOGITS_PAR=("${PAR[@]}")
    timeout ${LOGITS_TIMEOUT:-90} torchrun --nproc-per-node 2 --master-port $((port + 2)) \
      "$REPO/tools/megatron_deepseek_logits.py" --load "$w/$SUB" --ckpt-format "$FMT" \
      --tokens-file "$WORK/tokens.pt" --logits-out "$w/raw_logits.pt" --no-load-optim --no-load-rng \
      --exit-on-missing-checkpoint --micro-batch-size 2 --seq-length 32 \
      "${LOGITS_PAR[@]}" "${ARGS[@]}" "${COMMON[@]}" "${IMPL[@]}" >>"$log" 2>&1
    echo "rc=$?" >>"$log"
  fi
  echo "== $NAME: logits.pt with the training args" >>"$log"
  timeout 60 python3 - "$w" "$SUB" "${LOGITS_PAR[*]}" >>"$log" 2>&1 <<'PY'
import os, sys
import torch
sys.path.insert(0, os.environ["MEGATRON_PATH"])
w, sub, layout = sys.argv[1], sys.argv[2], sys.argv[3]
if sub == "dist":
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict
    args = load_common_state_dict(f"{w}/dist/iter_0000010")["args"]
else:
    args = torch.load(f"{w}/torch/iter_0000010/mp_rank_00_000/model_optim_rng.pt",
                      weights_only=False, map_location="cpu")["args"]
keys = """num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups kv_channels
multi_latent_attention q_lora_rank kv_lora_rank qk_head_dim qk_pos_emb_head_dim v_head_dim
qk_layernorm rope_type rotary_base rotary_scaling_factor mscale mscale_all_dim rotary_percent
seq_length max_position_embeddings vocab_size padded_vocab_size make_vocab_size_divisible_by
normalization norm_epsilon swiglu position_embedding_type untie_embeddings_and_output_weights
add_bias_linear bf16 fp16 params_dtype init_method_std num_experts moe_ffn_hidden_size
moe_router_topk moe_layer_freq moe_router_pre_softmax moe_router_score_function
moe_router_topk_scaling_factor moe_router_enable_expert_bias moe_router_bias_update_rate
moe_router_num_groups moe_router_group_topk moe_shared_expert_intermediate_size
moe_shared_expert_gate moe_grouped_gemm moe_token_dispatcher_type moe_router_load_balancing_type
moe_aux_loss_coeff mtp_num_layers mtp_loss_scaling_factor tensor_model_parallel_size
pipeline_model_parallel_size expert_model_parallel_size expert_tensor_parallel_size
transformer_impl ckpt_format seed train_iters micro_batch_size global_batch_size lr min_lr
lr_decay_style lr_warmup_iters weight_decay clip_grad""".split()
raw = torch.load(f"{w}/raw_logits.pt", weights_only=True)
out = {"tokens": raw["tokens"], "logits": raw["logits"], "vocab": 1000,
       "args": {k: str(getattr(args, k, None)) for k in keys}}
if "mtp_logits" in raw:
    out["mtp_logits"] = raw["mtp_logits"]
out["args"]["logits_computed_at"] = f"{layout}, float32, after loading {sub}/"
torch.save(out, f"{w}/logits.pt")
print(out["args"])
print("logits", tuple(out["logits"].shape), out["logits"].dtype,
      "mtp_logits", tuple(out["mtp_logits"].shape) if "mtp_logits" in out else None)
PY
  echo "rc=$?" >>"$log"
  ls -lR "$w" >>"$log"
  tar -C "$w" --exclude=tokenizer -czf "$OUT/$NAME.tgz" "$SUB" $( [ -f "$w/logits.pt" ] && echo logits.pt ) >>"$log" 2>&1
  echo "== $NAME: done" >>"$log"
}

port=29600
for model in $MODELS; do
  run_model "$model" $port &
  port=$((port + 10))
done
wait
for model in $MODELS; do
  model_args "$model" || continue
  echo "##### $NAME"
  grep -E "^== |rc=| iteration +[0-9]+/|saved logits|mtp logits|ranks agree|Error|error:|Traceback|^logits" \
    "$OUT/$NAME.log" | head -60
done
ls -la "$OUT"
