#!/usr/bin/env bash
# INT8 accuracy table for docs/INT8.md: every shared model, FP32 and each
# calibration method, on coco128, calibrated on calibration-80.
#   benches/int8_accuracy.sh [nanodetd binary] > table.md
# EXTRA_METHODS adds `--method` values (e.g. mse); QUANTIZE_FLAGS is passed
# to every quantize call: the defaults are issue 22's combination, and
# "--no-auto-float --no-threshold-choice --no-adaround --no-bias-correction"
# gives each method alone. With FIDELITY_PYTHON set to a
# Python that has onnxruntime, numpy and pillow, the Plus models' rows get
# tools/int8_fidelity.py's measures on the same 128 images (it reads the
# Plus layout only).
set -euo pipefail
bin=${1:-target/release/nanodetd}
assets=${NANODETD_ASSETS:-../shared}
coco=$assets/datasets/coco128
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
map() {
    "$bin" eval --model "$1" --images "$coco/images" \
        --annotations "$coco/annotations/instances_coco128.json" --json 2>/dev/null |
        python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["stats"][0])'
}
fidelity() {
    case "$2" in
    nanodet-plus-*)
        if [ -n "${FIDELITY_PYTHON:-}" ]; then
            "$FIDELITY_PYTHON" "$here/tools/int8_fidelity.py" "$assets/models/$2.onnx" \
                "$coco/images" "$1" | sed -E 's/.*score MAE ([0-9.]+), top-class agreement ([0-9.]+%), box-distance MAE ([0-9.]+) px.*/\1 | \2 | \3/'
            return
        fi
        ;;
    esac
    echo " | | "
}
echo "| model | FP32 mAP | method | INT8 mAP | drop (points) | INT8 share of Conv MACs | quantize time (s) | score MAE | top-class agreement | box MAE (px) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for model in nanodet-plus-m_320 nanodet-plus-m_416 nanodet-m_320 nanodet-m-0.5x_320; do
    fp32=$(map "$assets/models/$model.onnx")
    for method in entropy percentile minmax ${EXTRA_METHODS:-}; do
        out=$work/$model.$method.onnx
        start=$(date +%s.%N)
        # shellcheck disable=SC2086 # QUANTIZE_FLAGS is a list of flags
        "$bin" quantize --model "$assets/models/$model.onnx" \
            --calibration "$assets/datasets/calibration-80" --method "$method" \
            --out "$out" ${QUANTIZE_FLAGS:-} >"$work/log" 2>&1
        secs=$(echo "$(date +%s.%N) - $start" | bc)
        # quantize's last line: "... N Convs INT8 (P % of the Convs' MACs) ..."
        share=$(grep -o "[0-9.]* % of the Convs' MACs" "$work/log" | tail -1 | cut -d' ' -f1-2)
        int8=$(map "$out")
        drop=$(echo "($fp32 - $int8) * 100" | bc -l)
        printf "| %s | %s | %s | %s | %.2f | %s | %.1f | %s |\n" "$model" "$fp32" "$method" "$int8" "$drop" "$share" "$secs" "$(fidelity "$out" "$model")"
    done
done
