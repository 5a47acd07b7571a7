#!/usr/bin/env bash
# Convert a Megatron checkpoint to Hugging Face and refuse the release unless the
# result is provably the same model. Used by release-gate.yml; runnable anywhere.
#
#   MEGATRON_CKPT=checkpoints/gpt2 OUT=build/gpt2-hf bash docs/ci/release-gate.sh
set -euo pipefail
: "${MEGATRON_CKPT:?path of the Megatron checkpoint}"
: "${OUT:?output folder for the Hugging Face model}"
DTYPE="${DTYPE:-}"            # empty: keep the checkpoint's dtype (bit-exact check below)
RESHARD_TP="${RESHARD_TP:-1}"  # also prove a reshard round trip at this layout
RESHARD_PP="${RESHARD_PP:-1}"
REPORTS="${REPORTS:-$OUT.reports}"

mkdir -p "$REPORTS"
ckptkit inspect "$MEGATRON_CKPT" --json > "$REPORTS/inspect.json"
ckptkit megatron-to-hf "$MEGATRON_CKPT" "$OUT" ${DTYPE:+--dtype "$DTYPE"} --overwrite --json > "$REPORTS/convert.json"
ckptkit verify "$OUT" --json > "$REPORTS/integrity.json"
if [ -z "$DTYPE" ]; then
  ckptkit verify "$MEGATRON_CKPT" "$OUT" --json > "$REPORTS/equivalence.json"
else
  ckptkit verify "$MEGATRON_CKPT" "$OUT" --ignore-dtype --atol 1e-2 --json > "$REPORTS/equivalence.json"
fi
ckptkit reshard "$MEGATRON_CKPT" "$OUT.reshard" --tp "$RESHARD_TP" --pp "$RESHARD_PP" --overwrite --json > "$REPORTS/reshard.json"
ckptkit verify "$MEGATRON_CKPT" "$OUT.reshard" --json > "$REPORTS/reshard-equivalence.json"
echo "release gate passed: reports in $REPORTS"
