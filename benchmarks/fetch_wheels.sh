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
# and, for bench_decode's "official" column (the Parallax authors' CuTeDSL decode kernel, sm_90), about 50 MB:
#   nvidia-cutlass-dsl    4.1.0, the version their pyproject pins, recompressed (LZMA: 58 -> 42 MB, a few minutes)
#   cuda-bindings         12.9 (cutlass-dsl 4.1 needs cuda-python < 13), cuda-pathfinder (its one need)
#   their source          github.com/Yifei-Zuo/Parallax (MIT) at $PARALLAX_REF, without its assets, in
#                         .whl/Yifei-Zuo-Parallax/ (benchmarks/official.py imports it beside this package)
# gpu.sh unpacks a wheel only when its distribution is not installed (the official stack: at that major version).
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
    nvidia-cutlass-dsl==4.1.0
    cuda-bindings==12.9.10
    cuda-pathfinder==1.9.1
)
PARALLAX_REF=${PARALLAX_REF:-0cc94e4619fcccf68bf81d4a2e64380dc9c05f9c}
mkdir -p "$DEST"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${WHEELS[@]}"
# Recompressed before the source is fetched: a failed fetch leaves the wheels as they will travel.
python3 - "$DEST" <<'EOF'
import sys, zipfile
from pathlib import Path

for wheel in Path(sys.argv[1]).glob("nvidia_cutlass_dsl-*.whl"):
    with zipfile.ZipFile(wheel) as old:
        if all(i.compress_type == zipfile.ZIP_LZMA for i in old.infolist()):
            continue
        packed = wheel.with_suffix(".lzma")
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_LZMA) as new:
            for info in old.infolist():
                new.writestr(info, old.read(info), compress_type=zipfile.ZIP_LZMA)
    packed.replace(wheel)
    print(f"{wheel}: recompressed (LZMA)")
EOF
python3 - "$DEST" "$PARALLAX_REF" <<'EOF'
import io, sys, tarfile, urllib.error, urllib.request
from pathlib import Path

dest, ref = Path(sys.argv[1]), sys.argv[2]
source = dest / "Yifei-Zuo-Parallax"
if (source / "REF").is_file():
    print(f"{source}: {(source / 'REF').read_text().strip()} already there (remove it to fetch another)")
    sys.exit()
url = f"https://codeload.github.com/Yifei-Zuo/Parallax/tar.gz/{ref}"
try:
    archive = urllib.request.urlopen(url).read()
except OSError as err:  # URLError included
    sys.exit(f"{url}: {err}\nthe official column needs their source in {source}: rerun where GitHub is reachable")
with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    members = [m for m in tar.getmembers() if "/" in m.name and m.name.split("/")[1] != "assets"]
    for m in members:
        m.name = m.name.split("/", 1)[1]
    tar.extractall(source, members=members, filter="data")
(source / "REF").write_text(ref + "\n")
print(f"{source}: {url}")
EOF
ls -l "$DEST"
du -sh "$DEST"
