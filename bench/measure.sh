#!/usr/bin/env bash
# Produce the figures in docs/benchmarks.md: each benchmark at the size the doc quotes, one
# after another, each started only once the 1-minute load average is below MAX_LOAD (other
# work on a shared machine skews timings), with the load printed before and after.
#
#     bash bench/measure.sh [NAME ...] > measured.txt     # default: all of them
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
MAX_LOAD="${MAX_LOAD:-2.5}"
WAIT_S="${WAIT_S:-900}"

declare -A COMMAND=(
    [traversal_cost]="-m bench.traversal_cost --size small"
    [cpu_efficiency]="-m bench.cpu_efficiency --size small"
    [caption_pipeline]="-m bench.caption_pipeline --size small"
    [caption_pipeline_1008]="-m bench.caption_pipeline --size small --images 1008 --repeats 1"
    [caption_faults]="-m bench.caption_faults --size small --scenario all"
    [train_step]="-m bench.train_step --size tiny --steps 300"
    [digits_ablation]="-m bench.digits_ablation --size small"
)
ORDER=(traversal_cost cpu_efficiency caption_pipeline caption_pipeline_1008 caption_faults train_step digits_ablation)

wait_for_quiet() {
    local waited=0
    while awk -v max="$MAX_LOAD" '{exit !($1 >= max)}' /proc/loadavg; do
        if (( waited >= WAIT_S )); then echo "# load stayed above $MAX_LOAD for ${WAIT_S}s; measuring anyway"; return; fi
        sleep 10; waited=$((waited + 10))
    done
}

if (( $# == 0 )); then set -- "${ORDER[@]}"; fi
for name in "$@"; do
    wait_for_quiet
    echo "## python ${COMMAND[$name]}"
    echo "# before: $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%SZ)"
    start=$(date +%s)
    $PY ${COMMAND[$name]} 2>/dev/null
    echo "# after: $(cut -d' ' -f1-3 /proc/loadavg) at $(date -u +%H:%M:%SZ), $(( $(date +%s) - start )) s"
done
