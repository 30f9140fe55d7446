#!/usr/bin/env bash
# The GPU verification: the `gpu` tests and every benchmark, on a bare CUDA
# machine without network or pip, in two parts of under 10 minutes each:
#
#     bash benchmarks/gpu.sh 1            # gpu tests, bench_decode, bench_generate
#     bash benchmarks/gpu.sh 2            # bench_train_kernels, bench_muon, bench_torch_path (if present)
#     bash benchmarks/gpu.sh              # both parts, one after the other
#     bash benchmarks/gpu.sh quick        # one short lease: gpu tests (8 processes), bench_decode,
#                                         # bench_train_kernels --quick, bench_muon --quick
#     bash benchmarks/gpu.sh decode       # under 6 minutes: the decode and generate gpu tests, bench_decode,
#                                         # bench_generate
#     bash benchmarks/gpu.sh train        # under 8 minutes: the training-kernel gpu tests (8 processes) and
#                                         # bench_train_kernels --quick (FA2, fla) with its per-launch breakdown
#     bash benchmarks/gpu.sh decode-official  # bench_decode with the official decode kernel's column (it
#                                         # compiles per shape), to its own table: decode_official_<device>.md
#     bash benchmarks/gpu.sh train-official   # bench_train_kernels at D=128, T=4k against the official Parallax
#                                         # Triton kernels (their autotuning compiles ~100 configs per shape: minutes)
#     bash benchmarks/gpu.sh --dry-run    # unpack the wheels, try the imports, print the plan; runs nothing
#
# Baselines (FA3, fla, the Parallax authors' kernels) and pytest come from
# .whl/, filled beforehand by `bash benchmarks/fetch_wheels.sh`: each wheel
# whose distribution is not installed (the official decode kernel's stack:
# not at the same major version) is unpacked into a temporary directory put
# on PYTHONPATH (no pip needed). The official decode kernel's stack
# (cutlass-dsl, cuda-bindings 12) goes on it for the `decode-official` part
# only; the official Triton kernels' wheel (parallax_kernel, which imports as
# `parallax` like this package) stays packed: bench_train_kernels loads it
# itself. .whl/ need not travel whole: a part uses the wheels that are there
# (FA3's and the official decode kernel's together are about 80 MB).
# Tables go to benchmarks/results/ (--out; device,
# versions, date in each), logs to out/gpu-logs/; both are copied to $OUT when
# it is set. Every step has a time limit so that a part stays under 10
# minutes; a failing step does not stop the others, and the exit status is
# non-zero when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DRY_RUN=0
PARTS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        1 | 2 | quick | decode | train | decode-official | train-official) PARTS+=("$arg") ;;
        *) echo "usage: bash benchmarks/gpu.sh [--dry-run] [1] [2] [quick] [decode] [train] [decode-official]" \
                "[train-official]" >&2; exit 2 ;;
    esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(1 2)

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOGS=out/gpu-logs
TABLES=(--out benchmarks/results/)  # the benchmarks' default is the git-ignored out/bench/
mkdir -p "$LOGS" benchmarks/results
touch "$WORK/start"
export PYTHONUNBUFFERED=1

unpack_wheels() {
    # Pure-python wheels and fa3-fwd's extension onto PYTHONPATH; the CUDA
    # runtime wheel aside, used below only if fa3-fwd cannot load without it;
    # the official kernel's stack aside too (OFFICIAL_PATH), with the paths
    # its .pth files name, for the `decode-official` part alone: cuda-bindings 12
    # there hides the machine's own.
    local site="$WORK/site" cudart="$WORK/cudart" official="$WORK/official"
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "wheels: none in .whl/ (bash benchmarks/fetch_wheels.sh): baselines not installed here stay blank"
    else
        "$PYTHON" - "$site" "$cudart" "$official" "${wheels[@]}" <<'EOF'
import importlib.metadata
import sys
import zipfile
from pathlib import Path

site, cudart, official, *wheels = sys.argv[1:]
OFFICIAL_STACK = ("nvidia_cutlass_dsl", "cuda_bindings", "cuda_pathfinder")
for wheel in wheels:
    name, version = Path(wheel).name.split("-")[:2]
    if name == "parallax_kernel":
        print(f"wheels: {wheel}: the official baseline, loaded by bench_train_kernels")
        continue
    try:
        found = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        found = None
    # The official stack needs its own major versions (kept off PYTHONPATH but for its part); the rest
    # is only what the machine lacks, so that an older wheel never hides an installed pytest or packaging.
    if found is not None and (name not in OFFICIAL_STACK or found.split(".")[0] == version.split(".")[0]):
        print(f"wheels: {name} {found} is installed; {wheel} not used")
        continue
    dest = cudart if name.startswith("nvidia_cuda_runtime") else official if name in OFFICIAL_STACK else site
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(dest)
    print(f"wheels: {name} {version} unpacked from {wheel}" + (f" (installed: {found})" if found else ""))
paths = [official] + [str(Path(official) / line.strip()) for pth in Path(official).glob("*.pth")
                      for line in pth.read_text().splitlines() if line.strip() and not line.startswith(("#", "import"))]
print(":".join(paths), file=open(Path(official).parent / "official-path", "w"))
EOF
    fi
    export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
    OFFICIAL_PATH="$(cat "$WORK/official-path" 2>/dev/null)"
    if ! "$PYTHON" -c "import fa3_fwd_interface" 2>"$WORK/fa3.err" \
            && grep -q "libcudart.so.13" "$WORK/fa3.err" && [ -d "$cudart/nvidia/cu13/lib" ]; then
        export LD_LIBRARY_PATH="$cudart/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "wheels: libcudart.so.13 for fa3-fwd from the nvidia-cuda-runtime wheel"
    fi
}

check_imports() {
    local module
    for module in torch triton pytest einops transformers fla.ops.parallax.decode fa3_fwd_interface; do
        if "$PYTHON" -c "import $module" 2>"$WORK/import.err"; then
            echo "import $module: ok"
        else
            echo "import $module: FAILED ($(tail -n 1 "$WORK/import.err"))"
        fi
    done
    if PYTHONPATH="${OFFICIAL_PATH:+$OFFICIAL_PATH:}$PYTHONPATH" "$PYTHON" -c "
from importlib.metadata import version
from benchmarks.official import import_official
import_official('parallax.cute.parallax_decode')
print(f'import the official decode kernel: ok (nvidia-cutlass-dsl {version(\"nvidia-cutlass-dsl\")}, '
      f'cuda-bindings {version(\"cuda-bindings\")})')
" 2>"$WORK/import.err"; then
        :
    else
        echo "import the official decode kernel: FAILED ($(tail -n 1 "$WORK/import.err"))"
    fi
}

STATUS=()
run_step() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo
    echo "== $name (limit ${limit}s): $*"
    if [ "$DRY_RUN" = 1 ]; then
        STATUS+=("$name: not run (dry run)")
        return
    fi
    local start=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    local verdict="ok"
    [ "$rc" -ne 0 ] && verdict="FAILED (exit $rc)"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit}s"
    STATUS+=("$name: $verdict in $((SECONDS - start))s")
    [ "$rc" -eq 0 ] || FAILED=1
}

FAILED=0
unpack_wheels
check_imports
if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh needs a CUDA device; none was found (use --dry-run to check the setup)" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && [ "$DRY_RUN" = 0 ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

for part in "${PARTS[@]}"; do
    echo
    echo "=== part $part"
    if [ "$part" = 1 ]; then
        run_step gpu-tests 210 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors
        run_step bench_decode 180 "$PYTHON" -m benchmarks.bench_decode "${TABLES[@]}"
        run_step bench_generate 150 "$PYTHON" -m benchmarks.bench_generate --device cuda "${TABLES[@]}"
    elif [ "$part" = quick ]; then
        # Compiling dominates the tests on a fresh machine: spread them over processes.
        run_step gpu-tests 200 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -n 8 --continue-on-collection-errors
        run_step bench_decode 140 "$PYTHON" -m benchmarks.bench_decode "${TABLES[@]}"
        run_step bench_train_kernels 140 "$PYTHON" -m benchmarks.bench_train_kernels --quick --baselines FA2 FA3 fla "${TABLES[@]}"
        run_step bench_muon 50 "$PYTHON" -m benchmarks.bench_muon --device cuda --quick "${TABLES[@]}"
    elif [ "$part" = decode ]; then
        run_step gpu-tests-decode 60 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -n 4 \
            tests/kernels/test_decode.py tests/models/test_generation.py \
            tests/hf/test_gpu.py::test_native_model_generate_on_cuda_matches_gpt_generate \
            tests/benchmarks/test_tools.py
        run_step bench_decode 110 "$PYTHON" -m benchmarks.bench_decode "${TABLES[@]}"
        run_step bench_generate 160 "$PYTHON" -m benchmarks.bench_generate --device cuda "${TABLES[@]}"
    elif [ "$part" = train ]; then
        run_step gpu-tests-train 200 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -n 8 \
            tests/kernels/test_triton_parallel.py
        run_step bench_train_kernels 230 "$PYTHON" -m benchmarks.bench_train_kernels --quick --baselines FA2 fla "${TABLES[@]}"
    elif [ "$part" = decode-official ]; then
        # Its own table: FA3's wheels and the official kernel's may not travel together. The rows are
        # saved as they finish: a run stopped by the limit keeps them.
        run_step bench_decode_official 300 env PYTHONPATH="${OFFICIAL_PATH:+$OFFICIAL_PATH:}$PYTHONPATH" \
            "$PYTHON" -m benchmarks.bench_decode --prefix decode_official "${TABLES[@]}"
    elif [ "$part" = train-official ]; then
        run_step bench_train_official 420 "$PYTHON" -m benchmarks.bench_train_kernels --head-dims 128 \
            --seq-lens 4096 --windows none --baselines official FA2 --tag official "${TABLES[@]}"
    else
        run_step bench_train_kernels 300 "$PYTHON" -m benchmarks.bench_train_kernels --baselines FA2 FA3 fla "${TABLES[@]}"
        run_step bench_muon 90 "$PYTHON" -m benchmarks.bench_muon --device cuda "${TABLES[@]}"
        if [ -f benchmarks/bench_torch_path.py ]; then
            run_step bench_torch_path 120 "$PYTHON" -m benchmarks.bench_torch_path "${TABLES[@]}"
        fi
    fi
done

echo
echo "== summary (parts ${PARTS[*]})"
printf '%s\n' "${STATUS[@]}" | tee "$LOGS/summary.txt"
if [ -n "${OUT:-}" ] && [ "$DRY_RUN" = 0 ]; then
    mkdir -p "$OUT/results" "$OUT/logs"
    find benchmarks/results -maxdepth 1 -name '*.md' -newer "$WORK/start" -exec cp {} "$OUT/results/" \;
    cp "$LOGS"/* "$OUT/logs/"
    echo "copied the new tables and the logs to $OUT"
fi
exit "$FAILED"
