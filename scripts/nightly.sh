#!/usr/bin/env bash
# A nightly regression job: TextVQA and captions on one model, each run recorded in a history and
# compared with its baseline there, the captions' CLIP scores gated against a reference run, an HTML
# report written; the exit code says whether anything regressed or failed. Run it from cron or CI:
#
#   MODEL_CONFIG=configs/model/qwen_vl.yaml TEXTVQA_DATA=/data/textvqa_val.jsonl COCO_IMAGES=/data/val2014 \
#   CLIP_WEIGHTS=/data/open_clip_pytorch_model.bin CLIP_REFERENCE=/data/gpu_coco_rst.json \
#   bash scripts/nightly.sh
#
# Variables (only MODEL_CONFIG is required; a task whose data is not given is skipped):
#   MODEL_CONFIG      the model YAML
#   TEXTVQA_DATA      textvqa_val.jsonl (or a datasets folder)          -> TextVQA
#   COCO_IMAGES       a folder of COCO images                            -> captions
#   CLIP_WEIGHTS      open_clip weights, CLIP_MODEL (ViT-H-14), CLIP_REFERENCE (the reference run's
#                     captions, e.g. gpu_coco_rst.json): all three -> the captions' CLIP gate
#   OUT_ROOT          where each night's runs go: $OUT_ROOT/<date>/<task> (default output/nightly)
#   NIGHT             the night's folder name (default: today, YYYY-MM-DD); the same night run again resumes
#   HISTORY           the SQLite history (default $OUT_ROOT/history.db)
#   REPORT            the HTML report (default $OUT_ROOT/report.html), PLOT its PNG (default $OUT_ROOT/trend.png)
#   LIMIT             samples per task (default: all); DEVICE (default: the best available)
#   MAX_DROP (0.01), GATE (abs|stat), CLIP_TOLERANCE (0.01): the gates
#   PYTHON            the interpreter (default python)
# Exit code: 0 everything ran and passed; otherwise the first failing step's code (1 a regression,
# 2 bad input, 3 too many failed samples, ...), after every step has run and the report is written.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
OUT_ROOT="${OUT_ROOT:-output/nightly}"
NIGHT="${NIGHT:-$(date +%Y-%m-%d)}"
HISTORY="${HISTORY:-$OUT_ROOT/history.db}"
REPORT="${REPORT:-$OUT_ROOT/report.html}"
PLOT="${PLOT:-$OUT_ROOT/trend.png}"
MAX_DROP="${MAX_DROP:-0.01}"
GATE="${GATE:-abs}"
CLIP_TOLERANCE="${CLIP_TOLERANCE:-0.01}"
CLIP_MODEL="${CLIP_MODEL:-ViT-H-14}"

if [ -z "${MODEL_CONFIG:-}" ]; then
    echo "nightly.sh: MODEL_CONFIG is not set: the model YAML to evaluate (see the header of this script)" >&2
    exit 2
fi
if [ -z "${TEXTVQA_DATA:-}" ] && [ -z "${COCO_IMAGES:-}" ]; then
    echo "nightly.sh: neither TEXTVQA_DATA nor COCO_IMAGES is set: nothing to evaluate" >&2
    exit 2
fi

STATUS=0
SUMMARY=()
step() {  # step <label> <command...>: run it, remember the first failure, go on
    local label="$1"
    shift
    echo "== nightly: $label" >&2
    "$@"
    local code=$?
    SUMMARY+=("$label: $([ "$code" -eq 0 ] && echo ok || echo "exit $code")")
    if [ "$code" -ne 0 ] && [ "$STATUS" -eq 0 ]; then
        STATUS=$code
    fi
    return "$code"
}

COMMON=(--model_config_path "$MODEL_CONFIG" --history "$HISTORY" --no_progress)
[ -n "${DEVICE:-}" ] && COMMON+=(--device "$DEVICE")
[ -n "${LIMIT:-}" ] && COMMON+=(--limit "$LIMIT")

run_and_compare() {  # run_and_compare <label> <task> <data>: the run, then (if it finished) its comparison
    local label="$1" task="$2" data="$3"
    out="$OUT_ROOT/$NIGHT/$task"
    step "$label run" "$PYTHON" -m modeltest --task_config_path "$ROOT/configs/task/$task.yaml" \
        --dataset_path "$data" --output_dir "$out" "${COMMON[@]}" || return
    step "$label compare" "$PYTHON" -m modeltest compare --history "$HISTORY" "$out" --max_drop "$MAX_DROP" --gate "$GATE"
    return 0  # a failed comparison is remembered by step; what follows a finished run still runs
}

if [ -n "${TEXTVQA_DATA:-}" ]; then
    run_and_compare textvqa textvqa "$TEXTVQA_DATA"
fi

if [ -n "${COCO_IMAGES:-}" ]; then
    if run_and_compare captions coco_caption "$COCO_IMAGES"; then
        if [ -n "${CLIP_WEIGHTS:-}" ] && [ -n "${CLIP_REFERENCE:-}" ]; then
            rst="$(find "$out/results" -name '*_coco_rst.json' | head -n 1)"
            step "captions CLIP score against the reference" "$PYTHON" -m modeltest.clip_score --image_info "$rst" \
                --dataset_path "$COCO_IMAGES" --model_weights_path "$CLIP_WEIGHTS" --model_name "$CLIP_MODEL" \
                --reference "$CLIP_REFERENCE" --tolerance "$CLIP_TOLERANCE" --no_progress \
                ${DEVICE:+--device "$DEVICE"}
        fi
    fi
fi

step "report" "$PYTHON" -m modeltest history --db "$HISTORY" --last 60 --plot "$PLOT" --html "$REPORT" >/dev/null
echo "== nightly $NIGHT: $([ "$STATUS" -eq 0 ] && echo PASS || echo "FAIL (exit $STATUS)")" >&2
for line in "${SUMMARY[@]}"; do
    echo "   $line" >&2
done
echo "   report: $REPORT" >&2
exit "$STATUS"
