#!/usr/bin/env bash
# The speculative-decoding and forest benchmarks on a GPU, as run for the README's GPU numbers. Needs the embedded
# model in the project cache (`fot prepare-model default`). fp32 for the two speculative benchmarks, so that their
# greedy outputs should equal plain decoding token for token (bf16 forwards over several tokens round differently).
# Each benchmark's whole log goes to LOGS/NAME.log (default: .), its last lines to the terminal; one that fails
# does not stop the others, but the script then exits 1.
#
#     bash benchmarks/gpu.sh [LOGS]
export PYTHONUNBUFFERED=1
logs=${1:-.}
device=${DEVICE:-cuda}
mkdir -p "$logs"
status=0
run() {
    local name=$1
    shift
    echo "== python benchmarks/$*"
    "${PYTHON:-python3}" "benchmarks/$@" >"$logs/$name.log" 2>&1 || status=1
    grep -v -E '(it/s|s/it)\]?$' "$logs/$name.log" | tail -n 25
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
run ems_sd ems_sd.py --device "$device" --dtype float32
run kangaroo kangaroo.py --device "$device" --dtype float32
run forest forest.py --device "$device"
exit $status
