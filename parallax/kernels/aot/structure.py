"""What a compiled kernel does in its main loop, read from Triton's TTGIR and PTX.

Registers and spills do not say whether the tensor cores are fed. Per
compiled config the AOT table also shows:

- the matrix instructions of the main loop (the loop holding the most of
  them) by shape, e.g. `24 m64n32k16 + 6 m64n128k16` for Hopper's wgmma or
  `mma m16n8k16` for mma.sync: an `m64n8` wgmma runs the tensor cores at a
  quarter of their width;
- the `bar.sync` and `ldmatrix` instructions in that loop's body (every
  branch counted): a barrier per layout conversion through shared memory,
  an `ldmatrix` per operand re-read from shared memory into registers;
- the dots whose layout spreads more warps than the tile has rows (or
  columns) for: those warps compute the same products again.

Pure text processing: nothing here imports triton.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# Rows (columns) one warp covers in an MMA layout, per major version: mma.sync
# (2) tiles are 16 x 8 per warp; a Hopper warpgroup (3) covers 64 rows as four
# warps of 16, and the columns its instrShape names.
_MMA_WARP_ROWS = 16
_MMA_V2_WARP_COLS = 8

_LAYOUT = re.compile(r"^(#\w+) = #ttg\.(nvidia_mma|blocked)<\{(.*)\}>", re.M)
_DOT = re.compile(r"= (?:tt\.dot|ttng\.warp_group_dot) .*-> tensor<(\d+)x(\d+)x\w+, (#\w+)>")
_FIELD = re.compile(r"(\w+) = \[([\d, ]+)\]|(\w+) = (\d+)")
_BLOCK_START = re.compile(r"^(\$L__(BB\d+_\d+):|// %bb\.\d+:)")
_HEADER = re.compile(r"Loop Header: Depth=")
_MEMBER = re.compile(r"in Loop: Header=(BB\d+_\d+)")
_MMA = re.compile(r"\b(wgmma\.mma_async|mma)\.sync\.aligned\.(m\d+n\d+k\d+)")


@dataclass(frozen=True)
class LoopStructure:
    mma: dict          # main-loop MMA instructions: {"m64n32k16": 24, ...}
    wgmma: bool        # the main loop's MMAs are Hopper's warpgroup MMAs
    barriers: int      # bar.sync in the main loop's body
    ldmatrix: int      # ldmatrix in the main loop's body
    dots: int          # tl.dot products in the kernel
    duplicated: int    # of those, computed by more warps than their tile has rows or columns for

    def mma_text(self) -> str:
        if not self.mma:
            return "-"
        ordered = sorted(self.mma.items(), key=lambda kv: [int(x) for x in re.findall(r"\d+", kv[0])])
        shapes = " + ".join(f"{n} {shape}" for shape, n in ordered)
        return shapes if self.wgmma else "mma " + shapes


def _fields(body: str) -> dict:
    out = {}
    for name, array, scalar_name, scalar in _FIELD.findall(body):
        if name:
            out[name] = [int(x) for x in array.split(",")]
        else:
            out[scalar_name] = int(scalar)
    return out


def _coverage(kind: str, fields: dict) -> tuple[int, int]:
    """Rows and columns one repetition of the layout spans over the warps."""
    warps = fields["warpsPerCTA"]
    if kind == "blocked":
        per_thread, threads = fields["sizePerThread"], fields["threadsPerWarp"]
        return tuple(per_thread[i] * threads[i] * warps[i] for i in range(2))
    cols = fields["instrShape"][1] if fields["versionMajor"] >= 3 else _MMA_V2_WARP_COLS
    return _MMA_WARP_ROWS * warps[0], cols * warps[1]


def duplicated_dots(ttgir: str) -> tuple[int, int]:
    """(dots, dots whose result layout covers more rows or columns than the
    tile has: the surplus warps hold and compute copies)."""
    layouts = {name: (kind, _fields(body)) for name, kind, body in _LAYOUT.findall(ttgir)}
    dots = duplicated = 0
    for rows, cols, layout in _DOT.findall(ttgir):
        dots += 1
        kind, fields = layouts[layout]
        if len(fields["warpsPerCTA"]) != 2:
            continue
        span_rows, span_cols = _coverage(kind, fields)
        duplicated += span_rows > int(rows) or span_cols > int(cols)
    return dots, duplicated


def _blocks(ptx: str):
    """(innermost loop header or None, lines) per basic block, from the loop
    comments LLVM writes beside each block's label and on the lines after it."""
    out, loop, lines, describing = [], None, [], False
    for line in ptx.splitlines():
        start = _BLOCK_START.match(line)
        if start:
            out.append((loop, lines))
            loop, lines, describing = None, [], True
            name = start.group(2)
        elif not (describing and line.lstrip().startswith("//")):
            describing = False
            lines.append(line)
            continue
        if _HEADER.search(line):
            loop = name
        elif _MEMBER.search(line) and loop is None:
            loop = _MEMBER.search(line).group(1)
    out.append((loop, lines))
    return out


def main_loop(ptx: str) -> tuple[Counter, bool, int, int]:
    """(MMA shapes, whether they are wgmma, bar.sync, ldmatrix) in the body of
    the loop that holds the most MMA instructions."""
    loops: dict[str, list[str]] = {}
    for loop, lines in _blocks(ptx):
        if loop is not None:
            loops.setdefault(loop, []).extend(lines)
    best = None
    for lines in loops.values():
        body = "\n".join(lines)
        mma = Counter(shape for _, shape in _MMA.findall(body))
        if mma and (best is None or sum(mma.values()) > sum(best[0].values())):
            best = (mma, "wgmma.mma_async" in body, body)
    if best is None:
        return Counter(), False, 0, 0
    mma, wgmma, body = best
    return mma, wgmma, len(re.findall(r"\bbar\.sync\b", body)), len(re.findall(r"\bldmatrix\.", body))


def loop_structure(ttgir: str, ptx: str) -> LoopStructure:
    mma, wgmma, barriers, ldmatrix = main_loop(ptx)
    dots, duplicated = duplicated_dots(ttgir)
    return LoopStructure(dict(mma), wgmma, barriers, ldmatrix, dots, duplicated)
