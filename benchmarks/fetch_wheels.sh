#!/usr/bin/env bash
# Download the baseline wheels the GPU benchmarks compare against into .whl/
# (git-ignored; it travels with the work tree to a GPU machine that has no
# network and no pip, where benchmarks/gpu.sh unpacks them). Run from a
# checkout on a machine that reaches PyPI:
#
#     bash benchmarks/fetch_wheels.sh
#
# Wheels for CPython 3.12 on manylinux x86_64, without dependencies, about 32 MB:
#   fa3-fwd               FlashAttention 3 forward (`fa3_fwd_interface.flash_attn_with_kvcache`), bf16, sm_90
#   fla-core              fla 0.6: `fla.ops.parallax` (training) and `fla.ops.parallax.decode` (one-step decode)
#   einops                needed by fla and fa3-fwd
#   pytest, pluggy, iniconfig, packaging, pygments
#                         for `python -m pytest -m gpu` where pytest is not installed
#   nvidia-cuda-runtime   libcudart.so.13, which fa3-fwd links against; used only if torch does not bring it
#   parallax-kernel       the Parallax authors' Triton kernels (`parallax.triton.parallax_func`): a baseline
#                         of bench_train_kernels only; it imports as `parallax`, so gpu.sh leaves it packed
#                         and the benchmark loads it itself
# gpu.sh unpacks a wheel only when its distribution is not installed already.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
WHEELS=(
    fa3-fwd==0.0.3
    fla-core==0.6.0
    einops==0.8.2
    pytest==8.4.2
    pluggy==1.6.0
    iniconfig==2.1.0
    packaging==25.0
    pygments==2.19.2
    nvidia-cuda-runtime==13.5.37
    parallax-kernel==0.1.1
)
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
