#!/usr/bin/env bash
# The whole study: every run its tables still lack, then the tables.
#
#   bash benchmarks/study/run_all.sh                             # CPU: the LM grid, MQAR, then the tables
#   bash benchmarks/study/run_all.sh --budget-min 240            # the same, stopping after 4 hours
#   bash benchmarks/study/run_all.sh --jobs 2                    # two runs at once, one thread each (2 idle cores)
#   bash benchmarks/study/run_all.sh --scale gpu --budget-min 8  # the next GPU runs: MQAR T=512, then the 20m grid
#   bash benchmarks/study/run_all.sh --scale gpu --dry-run       # print what would run next, run nothing
#
# Each step skips the runs already in its log and appends each new run as it
# ends. At the budget, a language-model run in flight checkpoints (the next
# call resumes it, on this machine) and an MQAR run in flight is dropped.
# Logs and tables go under --results (default benchmarks/study/results);
# --update-results-md also regenerates the tables inside RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
scale=cpu budget="" dry=() results=benchmarks/study/results update=() jobs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --scale) scale=$2; shift 2 ;;
        --budget-min) budget=$2; shift 2 ;;
        --results) results=$2; shift 2 ;;
        --dry-run) dry=(--dry-run); shift ;;
        --jobs) jobs=(--jobs "$2" --threads 1); shift 2 ;;
        --update-results-md) update=(--update benchmarks/study/RESULTS.md); shift ;;
        *) echo "run_all.sh: unknown argument $1 (options: --scale cpu|gpu, --budget-min M, --jobs N," \
                "--results DIR, --dry-run, --update-results-md)" >&2; exit 2 ;;
    esac
done
limit=()
if [ -n "$budget" ]; then
    limit=(--deadline "$(python -c "import sys, time; print(time.time() + 60 * float(sys.argv[1]))" "$budget")")
fi
mqar() { python -m benchmarks.study.mqar "${limit[@]}" "${dry[@]}" "$@"; }

case "$scale" in
cpu)
    # Language modelling at 20 tokens per parameter: small-48, small-80, small.
    python -m benchmarks.study.lm_grid --out "$results/lm" "${jobs[@]}" "${limit[@]}" "${dry[@]}"
    # MQAR, one embedding policy for both optimizers, the parameter-matched
    # softmax, 4,000 steps: lengths 64 and 128.
    mqar --out "$results/mqar_cpu" "${jobs[@]:0:2}" --seq-lens 64 128 --steps 4000
    # The first sweeps (AdamW at one rate for every parameter; 600 steps),
    # widened where their best rate is at an edge, and softmax / Muon's low
    # rates with 2,000 steps at lengths 128 and 256.
    mqar --out "$results/mqar_cpu" "${jobs[@]:0:2}" --seq-lens 64 128 --steps 600 --attentions softmax parallax \
        --adamw-one-rate
    mqar --out "$results/mqar_cpu" "${jobs[@]:0:2}" --seq-lens 128 256 --steps 2000 --attentions softmax \
        --optimizers muon --muon-lr 0.000625 0.00125 0.0025
    ;;
gpu)
    # MQAR on the GPU (2,000 steps, bf16 autocast), length 512 first: the
    # first sweeps' policy, widened where their best rate is at an edge.
    mqar --scale gpu --out "$results/mqar_gpu" --seq-lens 512 128 256 --attentions softmax parallax --adamw-one-rate
    # The 20m grid on this machine's Python sources (no network there).
    corpus=${STUDY_CORPUS:-/tmp/study_corpus}
    if [ ${#dry[@]} -eq 0 ]; then python -m benchmarks.study.corpus "$corpus"; fi
    python -m benchmarks.study.lm_grid --scale gpu --out "$results/lm_gpu" --data "$corpus" "${limit[@]}" "${dry[@]}"
    ;;
*) echo "run_all.sh: --scale is cpu or gpu, not $scale" >&2; exit 2 ;;
esac

if [ ${#dry[@]} -eq 0 ]; then
    python -m benchmarks.study.report --results "$results" "${update[@]}" > "$results/tables.md"
fi
