#!/usr/bin/env bash
# The whole CPU study in one command (about 90 minutes on 2 cores). Each step
# skips or appends to the raw logs under benchmarks/study/results/.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/study/results

# Table 1, language modelling: 5 cells x learning-rate sweep (seed 0), then the
# best rate of each cell with seed 1; two runs at a time, one thread each.
python -m benchmarks.study.lm_grid --out "$out/lm" --jobs 2

# Table 2, MQAR: the 2x2 at sequence lengths 64 and 128 (600 steps, seed 0),
# a second seed at 64, and 2000-step runs at both lengths.
mqar() { OMP_NUM_THREADS=1 python -m benchmarks.study.mqar --out "$out" "$@"; }
mqar --seq-lens 64 & mqar --seq-lens 128; wait
mqar --seq-lens 64 --seeds 1 --optimizers adamw & mqar --seq-lens 64 --seeds 1 --optimizers muon; wait
mqar --seq-lens 64 --steps 2000 --optimizers adamw & mqar --seq-lens 64 --steps 2000 --optimizers muon; wait
mqar --seq-lens 128 --steps 2000 --optimizers adamw & mqar --seq-lens 128 --steps 2000 --optimizers muon; wait

# MQAR learning-rate sweeps at length 64: six rates over about 30x per
# optimizer (seed 0), then seed 1 at each cell's best rate of that sweep.
sweep() { OMP_NUM_THREADS=1 python -m benchmarks.study.mqar --out "$out/mqar_sweep" --seq-lens 64 "$@"; }
sweep --optimizers muon --muon-lr 0.0025 0.005 0.01 0.02 0.04 0.08 &
sweep --optimizers adamw --adamw-lr 0.0003 0.001 0.002 0.003 0.006 0.01; wait
best() {  # the best swept rate of <attention> <optimizer> (report.best_rate)
    python -c 'import sys; from benchmarks.study.report import best_sweep_rate; print(best_sweep_rate(*sys.argv[1:]))' \
        "$out/mqar_sweep/mqar.jsonl" "$1" "$2"
}
for attention in softmax parallax; do
    sweep --seeds 1 --optimizers muon --muon-lr "$(best "$attention" muon)" --attentions "$attention" &
    sweep --seeds 1 --optimizers adamw --adamw-lr "$(best "$attention" adamw)" --attentions "$attention"; wait
done

python -m benchmarks.study.report --results "$out" > "$out/tables.md"
