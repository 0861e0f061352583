#!/usr/bin/env bash
# The seed's command: bash scripts/mm_run.sh <task> <model> [extra modeltest flags...]
#
# Reads configs/task/<task>.yaml and configs/model/<model>.yaml (an unknown name lists the available
# ones and exits 2) and writes to output/<date>/modeltest/<model>/precision_result/ (a task with
# task_type: performance or performance_maxbs: .../performance_result/), or to MODELTEST_OUTPUT_DIR. Tensor (TP) and data (DP) parallel, on one node or many:
#
#   processes per node  the visible devices: the comma-separated entries of ASCEND_RT_VISIBLE_DEVICES,
#                       else of CUDA_VISIBLE_DEVICES (empty = unset); with neither, NPROC_PER_NODE
#                       (CPU runs), else 1
#   NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=20050
#                       several nodes: run this script on each, with its NODE_RANK
#   world               processes per node x NNODES
#   TP, DP              --tp N / --dp M among the flags (or --tp=N / --dp=M), else the variables TP / DP;
#                       neither: TP = processes per node, DP = world / TP; one: the other is world / it.
#                       TP x DP must equal the world. The script passes --tp and --dp to modeltest itself.
#   PYTHON=python       the interpreter; torchrun is "$PYTHON -m torch.distributed.run", the one beside it
#
# Numbers are decimal (08 is 8): NPROC_PER_NODE, NNODES, TP, DP >= 1, 0 <= NODE_RANK < NNODES,
# MASTER_PORT from 1 to 65535; an empty variable counts as unset.
#
# World 1: exec $PYTHON -m modeltest. World > 1: a pre-flight `$PYTHON -m modeltest ... --check_only` in one
# process (configs, dataset, model folder, TP against the model, the output folder's lock; its exit code
# is this script's when it fails), then exec torchrun with one process per device. Bad values exit 2
# with one line on stderr before anything starts. Inherited WORLD_SIZE / RANK / LOCAL_RANK /
# LOCAL_WORLD_SIZE are cleared (this script decides the layout; torchrun sets them for its processes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIGS="${MODELTEST_CONFIG_DIR:-$ROOT/configs}"

names() {  # the .yaml files in a folder, without the extension, on one line
    local f out=()
    for f in "$1"/*.yaml; do
        [ -f "$f" ] && out+=("$(basename "$f" .yaml)")
    done
    echo "${out[*]}"
}

usage() {
    echo "usage: bash scripts/mm_run.sh <task> <model> [modeltest flags...]" >&2
    echo "tasks:  $(names "$CONFIGS/task")" >&2
    echo "models: $(names "$CONFIGS/model")" >&2
}

die() {
    echo "mm_run.sh: $*" >&2
    exit 2
}

# uint NAME VALUE MIN [WHERE]: VALUE as a decimal integer >= MIN (leading zeros are not octal), or die
uint() {
    local what="$1" value="$2" min="$3" where="${4:-}" kind="a non-negative integer"
    [ "$min" -gt 0 ] && kind="a positive integer"
    if ! [[ "$value" =~ ^[0-9]{1,9}$ ]] || [ "$((10#$value))" -lt "$min" ]; then
        die "$what must be $kind, got '$value'${where:+ (from $where)}"
    fi
    echo "$((10#$value))"
}

if [ "$#" -lt 2 ]; then usage; exit 2; fi
TASK="$1"; MODEL="$2"; shift 2
TASK_CFG="$CONFIGS/task/$TASK.yaml"
MODEL_CFG="$CONFIGS/model/$MODEL.yaml"
if [ ! -f "$TASK_CFG" ]; then echo "mm_run.sh: unknown task '$TASK'" >&2; usage; exit 2; fi
if [ ! -f "$MODEL_CFG" ]; then echo "mm_run.sh: unknown model '$MODEL'" >&2; usage; exit 2; fi

# --tp / --dp among the pass-through flags: taken out here (the last one wins, as in argparse)
TP_ARG="" TP_FROM="" DP_ARG="" DP_FROM="" PASS=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --tp|--dp)
            [ "$#" -ge 2 ] || die "$1 needs a value"
            if [ "$1" = --tp ]; then TP_ARG="$2" TP_FROM="--tp"; else DP_ARG="$2" DP_FROM="--dp"; fi
            shift 2 ;;
        --tp=*) TP_ARG="${1#--tp=}" TP_FROM="--tp"; shift ;;
        --dp=*) DP_ARG="${1#--dp=}" DP_FROM="--dp"; shift ;;
        *) PASS+=("$1"); shift ;;
    esac
done
if [ -z "$TP_FROM" ] && [ -n "${TP:-}" ]; then TP_ARG="$TP" TP_FROM="TP"; fi
if [ -z "$DP_FROM" ] && [ -n "${DP:-}" ]; then DP_ARG="$DP" DP_FROM="DP"; fi

# processes per node
count_devices() {  # the non-blank comma-separated entries of $1
    local entry n=0 list
    IFS=',' read -r -a list <<< "$1"
    for entry in "${list[@]}"; do
        [ -n "${entry// /}" ] && n=$((n + 1))
    done
    echo "$n"
}
plural() {  # plural 2 device -> "2 devices"
    if [ "$1" -eq 1 ]; then echo "1 $2"; else echo "$1 $2s"; fi
}
if [ -n "${ASCEND_RT_VISIBLE_DEVICES:-}" ]; then
    NPROC="$(count_devices "$ASCEND_RT_VISIBLE_DEVICES")"; NPROC_FROM="ASCEND_RT_VISIBLE_DEVICES"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    NPROC="$(count_devices "$CUDA_VISIBLE_DEVICES")"; NPROC_FROM="CUDA_VISIBLE_DEVICES"
else
    NPROC="" NPROC_FROM=""
fi
if [ -n "$NPROC_FROM" ]; then
    [ "$NPROC" -gt 0 ] || die "$NPROC_FROM='${!NPROC_FROM}' lists no device"
    NPROC_DESC="$(plural "$NPROC" "visible device") in $NPROC_FROM"
elif [ -n "${NPROC_PER_NODE:-}" ]; then
    NPROC="$(uint NPROC_PER_NODE "$NPROC_PER_NODE" 1)"
    NPROC_DESC="NPROC_PER_NODE=$NPROC"
else
    NPROC=1 NPROC_DESC="1 process per node: no visible devices, no NPROC_PER_NODE"
fi

# nodes
NNODES="$(uint NNODES "${NNODES:-1}" 1)"
NODE_RANK="$(uint NODE_RANK "${NODE_RANK:-0}" 0)"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="$(uint MASTER_PORT "${MASTER_PORT:-20050}" 1)"
[ "$MASTER_PORT" -le 65535 ] || die "MASTER_PORT must be at most 65535, got $MASTER_PORT"
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK $NODE_RANK must be below NNODES $NNODES (ranks count from 0)"
WORLD=$((NPROC * NNODES))
if [ "$NNODES" -gt 1 ]; then NODES_DESC="$NNODES nodes in NNODES"; else NODES_DESC="1 node"; fi
WORLD_DESC="$WORLD = $NPROC_DESC x $NODES_DESC"

# tensor and data parallel sizes
if [ -n "$TP_FROM" ]; then TP="$(uint TP "$TP_ARG" 1 "$TP_FROM")"; else TP=""; fi
if [ -n "$DP_FROM" ]; then DP="$(uint DP "$DP_ARG" 1 "$DP_FROM")"; else DP=""; fi
if [ -z "$TP" ] && [ -z "$DP" ]; then
    TP="$NPROC" TP_FROM="the processes per node"
fi
if [ -z "$DP" ]; then
    [ $((WORLD % TP)) -eq 0 ] || die "TP $TP (from $TP_FROM) does not divide the world of $WORLD_DESC"
    DP=$((WORLD / TP)) DP_FROM="world / TP"
elif [ -z "$TP" ]; then
    [ $((WORLD % DP)) -eq 0 ] || die "DP $DP (from $DP_FROM) does not divide the world of $WORLD_DESC"
    TP=$((WORLD / DP)) TP_FROM="world / DP"
fi
if [ $((TP * DP)) -ne "$WORLD" ]; then
    die "TP $TP (from $TP_FROM) x DP $DP (from $DP_FROM) = $((TP * DP)), but the world is $WORLD_DESC"
fi

# Determinism for nightly runs (the seed exports the same kind of switches).
export PYTHONHASHSEED="${PYTHONHASHSEED:-0}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export HCCL_DETERMINISTIC="${HCCL_DETERMINISTIC:-true}"
export LCCL_DETERMINISTIC="${LCCL_DETERMINISTIC:-1}"
unset WORLD_SIZE RANK LOCAL_RANK LOCAL_WORLD_SIZE

KIND=precision
if grep -Eq "^task_type:[[:space:]]*[\"']?performance" "$TASK_CFG"; then KIND=performance; fi
OUTPUT_DIR="${MODELTEST_OUTPUT_DIR:-output/$(date +%Y-%m-%d)/modeltest/$MODEL/${KIND}_result/}"
PYTHON="${PYTHON:-python}"
ARGS=(--model_config_path "$MODEL_CFG" --task_config_path "$TASK_CFG" --tp "$TP" --dp "$DP"
      --output_dir "$OUTPUT_DIR" ${PASS[@]+"${PASS[@]}"})

if [ "$WORLD" -eq 1 ]; then
    exec "$PYTHON" -m modeltest "${ARGS[@]}"
fi
# pre-flight in one process: a run that cannot start fails here, with modeltest's own one-line error
rc=0
"$PYTHON" -m modeltest "${ARGS[@]}" --check_only || rc=$?
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --nproc_per_node "$NPROC" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m modeltest "${ARGS[@]}"
