#!/usr/bin/env bash
# The whole CPU study in one command (about 70 minutes on 2 cores). Each step
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

python -m benchmarks.study.report --results "$out" > "$out/tables.md"
