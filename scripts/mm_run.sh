#!/usr/bin/env bash
# The seed's command: bash scripts/mm_run.sh <task> <model> [extra modeltest flags...]
# Reads configs/model/<model>.yaml and configs/task/<task>.yaml; the tensor-parallel size is the
# number of visible devices (ASCEND_RT_VISIBLE_DEVICES, else CUDA_VISIBLE_DEVICES, else 1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIGS="${MODELTEST_CONFIG_DIR:-$ROOT/configs}"

usage() {
    echo "usage: bash scripts/mm_run.sh <task> <model> [modeltest flags...]" >&2
    echo "tasks:  $(ls "$CONFIGS/task" 2>/dev/null | sed -n 's/\.yaml$//p' | tr '\n' ' ')" >&2
    echo "models: $(ls "$CONFIGS/model" 2>/dev/null | sed -n 's/\.yaml$//p' | tr '\n' ' ')" >&2
}

if [ "$#" -lt 2 ]; then usage; exit 2; fi
TASK="$1"; MODEL="$2"; shift 2
TASK_CFG="$CONFIGS/task/$TASK.yaml"
MODEL_CFG="$CONFIGS/model/$MODEL.yaml"
if [ ! -f "$TASK_CFG" ]; then echo "mm_run.sh: unknown task '$TASK'" >&2; usage; exit 2; fi
if [ ! -f "$MODEL_CFG" ]; then echo "mm_run.sh: unknown model '$MODEL'" >&2; usage; exit 2; fi

DEVICES="${ASCEND_RT_VISIBLE_DEVICES:-${CUDA_VISIBLE_DEVICES:-}}"
if [ -n "$DEVICES" ]; then
    IFS=',' read -r -a DEVICE_LIST <<< "$DEVICES"
    TP="${#DEVICE_LIST[@]}"
else
    TP=1
fi

# Determinism for nightly runs (the seed exports the same kind of switches).
export PYTHONHASHSEED="${PYTHONHASHSEED:-0}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export HCCL_DETERMINISTIC="${HCCL_DETERMINISTIC:-true}"
export LCCL_DETERMINISTIC="${LCCL_DETERMINISTIC:-1}"

OUTPUT_DIR="${MODELTEST_OUTPUT_DIR:-output/$(date +%Y-%m-%d)/modeltest/$MODEL/precision_result/}"
PYTHON="${PYTHON:-python}"
ARGS=(--model_config_path "$MODEL_CFG" --task_config_path "$TASK_CFG" --tp "$TP" --output_dir "$OUTPUT_DIR" "$@")

if [ "$TP" -gt 1 ]; then
    exec torchrun --nproc_per_node "$TP" --master_port "${MASTER_PORT:-20050}" -m modeltest "${ARGS[@]}"
else
    exec "$PYTHON" -m modeltest "${ARGS[@]}"
fi
