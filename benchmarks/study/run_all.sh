#!/usr/bin/env bash
# The whole CPU study in one command (about 2 hours on 2 cores). Each step
# skips the runs already in its raw log under benchmarks/study/results/ and
# appends the new ones.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/study/results

# Table 1, language modelling: 5 cells, each sweeping its learning rate (seed
# 0) until the best is interior, then seed 1 at the best; two runs at a time.
python -m benchmarks.study.lm_grid --out "$out/lm" --jobs 2

# MQAR: every cell swept over six rates at lengths 64 and 128 (seed 0), then
# seed 1 at each best rate; two runs at a time, one thread each.
python -m benchmarks.study.mqar --out "$out/mqar_cpu"

# Softmax / Muon below the sweep's lowest rate: at length 128 in 600 steps, and
# at 128 and 256 in the GPU sweep's 2,000. Does its optimum lie lower?
python -m benchmarks.study.mqar --out "$out/mqar_cpu" --seq-lens 128 --attentions softmax --optimizers muon \
    --muon-lr 0.000625 0.00125 0.0025 0.005 0.01 0.02 0.04 0.08
python -m benchmarks.study.mqar --out "$out/mqar_cpu" --seq-lens 128 256 --steps 2000 --attentions softmax \
    --optimizers muon --muon-lr 0.000625 0.00125 0.0025

python -m benchmarks.study.report --results "$out" > "$out/tables.md"
