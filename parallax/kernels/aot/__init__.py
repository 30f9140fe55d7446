"""Compile every Triton kernel of the package for GPUs this machine lacks.

    python -m parallax.kernels.aot                      # the full sweep (sm_90 and sm_80)
    python -m parallax.kernels.aot --subset ci          # the few compiles CI runs
    python -m parallax.kernels.aot --kind forward --arch 90 --dtype bfloat16 --head-dim 128
    python -m parallax.kernels.aot --out benchmarks/results/aot_kernels.md

Each scenario (`scenarios.Scenario`: launcher, arch, dtype, head dim,
flags) calls the real launcher on small CPU tensors under
`capture.capture`, which records the launches and the autotune configs
the pruner keeps for that GPU; each distinct (kernel, specialisation, config)
is then compiled once, in parallel worker processes, and printed as one row:
shared memory, registers and spill bytes from ptxas beside the registers the
resource model predicts, whether Hopper's wgmma is used, and what the main
loop does (`structure`: its MMA instruction shapes, `bar.sync` and
`ldmatrix` per iteration, dots computed twice by surplus warps). The exit
status is 1 when a kept config cannot launch (shared memory over the GPU's
per-block limit, more registers than a block may hold), spills more than
SPILL_BUDGET bytes, or, for a training kernel on sm_90 with wgmma, breaks the
structure rules of `Row.structure_problems`; rows of configs the pruner drops
(`--all-configs`) are shown but never fail the run.

Results are cached by kernel source, specialisation, config and Triton
version (`--cache-dir`), so a re-run compiles only what changed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..triton import resources
from .scenarios import DECODE_LAYOUTS, TRAINING_KINDS, Scenario
from ..triton.resources import GPUS, REGISTERS_PER_BLOCK, SPILL_BUDGET

ARCHS = (90, 80)
DTYPES = ("bfloat16", "float16", "float32")
HEAD_DIMS = (64, 80, 128, 256)
KINDS = TRAINING_KINDS + ("decode",)
# (launcher, kernel) -> the resource model's kernel (resources.KERNELS), for
# the predicted registers.
MODEL_KERNELS = {
    ("forward", "_parallax_fwd_kernel"): "forward",
    ("backward", "_parallax_bwd_dkdv_kernel"): "backward_kv",
    ("backward", "_parallax_bwd_dq_kernel"): "backward_q",
    ("backward_fused", "_parallax_bwd_dkdv_kernel"): "backward_kv_fused",
}
# The dK/dV main loop on sm_90 at most: a barrier per layout change through
# shared memory; the forward's loop has 2.
MAX_LOOP_BARRIERS = 8
# Flags the table shows in their own column, not in the config.
_DESCRIBED = {"HEAD_DIM", "BLOCK_D", "GROUP", "IS_CAUSAL", "HAS_WINDOW", "IS_VARLEN", "DOT_PRECISION", "FUSED",
              "PAGED", "APPEND", "PAGE_SIZE"}
HEAVIEST = dict(causal=True, window=True, varlen=True, group=4)


def training_scenarios(archs, dtypes, head_dims, kinds, flag_sweep=True):
    """Every kept config at the heaviest flags (all masks, varlen, GQA), for
    every arch, dtype and head dim (float32 where it goes to Triton); and, at sm_90 bf16 D=128 (when selected),
    every combination of the flags that change code."""
    from ..triton.resources import wide_float32

    out = []
    for kind, arch, dtype, d in itertools.product(kinds, archs, dtypes, head_dims):
        if kind in TRAINING_KINDS and not wide_float32(dtype, d):
            out.append(Scenario(kind, arch, dtype, d, **HEAVIEST))
    if flag_sweep and 90 in archs and "bfloat16" in dtypes and 128 in head_dims:
        for kind in (k for k in kinds if k in TRAINING_KINDS):
            for causal, window, varlen, group in itertools.product((True, False), (True, False), (True, False), (1, 4)):
                s = Scenario(kind, 90, "bfloat16", 128, causal=causal, window=window, varlen=varlen, group=group)
                if s not in out:
                    out.append(s)
    return out


def decode_scenarios(archs, dtypes, head_dims):
    """Contiguous and paged caches, with and without append, GQA 4 with the
    merge of 4 splits; group 1 and one split on the contiguous cache."""
    from .scenarios import decode_supported

    out = []
    for arch, dtype, d in itertools.product(archs, dtypes, head_dims):
        if not decode_supported(dtype, d):
            continue
        for layout, append in itertools.product(DECODE_LAYOUTS, (False, True)):
            out.append(Scenario("decode", arch, dtype, d, group=4, layout=layout, append=append, splits=4))
        out.append(Scenario("decode", arch, dtype, d, group=1, splits=1))
    return out


def ci_scenarios():
    """A few minutes on two cores: sm_90 bf16 D=128, heaviest flags, each
    launcher once (training configs: the pruner's first choice only)."""
    training = [Scenario(kind, 90, "bfloat16", 128, **HEAVIEST) for kind in TRAINING_KINDS]
    decode = [Scenario("decode", 90, "bfloat16", 128, group=4, layout="paged", append=True, splits=4)]
    return training + decode


@dataclass(frozen=True)
class Job:
    scenario: Scenario
    launch: int          # index among the scenario's launches
    config: int | None   # index among the kernel's autotune candidates; None: not autotuned
    kept: bool           # the pruner keeps this config
    kernel: str
    label: str           # the config, for the table
    key: str             # hash of what decides the binary
    tiling: tuple | None = None  # (BLOCK_M, BLOCK_N, num_warps, num_stages) of a training kernel's config

    def predicted_registers(self) -> int | None:
        """The resource model's estimate, for the kernels it models."""
        model = MODEL_KERNELS.get((self.scenario.kind, self.kernel))
        if model is None or self.tiling is None:
            return None
        s = self.scenario
        elem_bytes = 4 if s.dtype == "float32" else 2
        return round(resources.registers(model, s.arch, elem_bytes, resources.head_block(s.head_dim),
                                         resources.Tiling(*self.tiling)))


@dataclass
class Row:
    launcher: str   # the scenario's kind: which launcher made the launch
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    flags: str
    config: str
    kept: bool
    shared: int
    registers: int
    spill: int
    wgmma: bool
    num_warps: int
    loop_mma: str = "-"      # the main loop's MMA instructions (structure.LoopStructure.mma_text)
    loop_wgmma: bool = False
    barriers: int = 0        # bar.sync in the main loop
    ldmatrix: int = 0        # ldmatrix in the main loop
    dots: int = 0
    duplicated: int = 0      # dots computed by surplus warps too
    predicted: int | None = None  # registers by the resource model (not cached: the model may change)
    verdict: str = ""

    def structure_problems(self) -> list[str]:
        """Where a training kernel runs wgmma on sm_90: no dot computed twice
        by surplus warps and no m64n8 wgmma (the tensor cores at a quarter of
        their width); in the dK/dV kernel also no operand re-read into
        registers in the loop (ldmatrix) and at most MAX_LOOP_BARRIERS
        barriers per iteration."""
        if self.arch < 90 or not self.loop_wgmma or (self.launcher, self.kernel) not in MODEL_KERNELS:
            return []
        problems = []
        if self.duplicated:
            problems.append("duplicated")
        if "m64n8k" in self.loop_mma:
            problems.append("m64n8")
        if self.kernel == "_parallax_bwd_dkdv_kernel":
            if self.ldmatrix:
                problems.append("ldmatrix")
            if self.barriers > MAX_LOOP_BARRIERS:
                problems.append(f"bar.sync>{MAX_LOOP_BARRIERS}")
        return problems

    def judge(self) -> str:
        problems = []
        if self.shared > GPUS[self.arch]["max_shared_mem"]:
            problems.append("shared>limit")
        if self.registers * 32 * self.num_warps > REGISTERS_PER_BLOCK:
            problems.append("registers>limit")
        if self.spill > SPILL_BUDGET:
            problems.append("spills")
        return ",".join(problems + self.structure_problems()) or "ok"


# ---------------------------------------------------------------- workers
# Worker processes import triton with TRITON_INTERPRET unset (the parent
# removes it before starting them); the parent never imports triton.

@functools.lru_cache(maxsize=64)
def _launches(scenario: Scenario):
    from .capture import capture
    from .scenarios import run_scenario

    with capture(scenario.arch) as launches:
        run_scenario(scenario)
    return launches


def _config_label(launch, config) -> str:
    if config is not None:
        words = [f"{k}={v}" for k, v in config.kwargs.items()]
        warps, stages = config.num_warps, config.num_stages
    else:
        names = {p.name for p in launch.kernel.params if p.is_constexpr}
        words = [f"{k}={v}" for k, v in launch.kwargs.items() if k in names and k not in _DESCRIBED]
        warps, stages = launch.kwargs.get("num_warps", 4), launch.kwargs.get("num_stages", 3)
    return " ".join(words + [f"w{warps}", f"s{stages}"])


def list_jobs(scenario: Scenario, all_configs: bool, first_only: bool) -> list[Job]:
    """The compiles a scenario asks for (worker side)."""
    import triton

    from .capture import specialisation

    jobs = []
    for index, launch in enumerate(_launches(scenario)):
        if launch.configs is None:
            choices = [(None, None, True)]
        else:
            kept_ids = [id(c) for c in launch.configs]
            choices = [(i, c, id(c) in kept_ids) for i, c in enumerate(launch.candidates)]
            choices.sort(key=lambda choice: not choice[2])  # kept first, in the pruner's order
            if first_only:
                choices = choices[:1]
            elif not all_configs:
                choices = [choice for choice in choices if choice[2]]
        for i, config, kept in choices:
            spec = repr((triton.__version__, scenario.arch, specialisation(launch, config)))
            tiling = None
            if config is not None and {"BLOCK_M", "BLOCK_N"} <= set(config.kwargs):
                tiling = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
            jobs.append(Job(scenario, index, i, kept, launch.name, _config_label(launch, config),
                            hashlib.sha256(spec.encode()).hexdigest(), tiling))
    return jobs


def compile_job(job: Job) -> Row:
    from .capture import compile_launch

    launch = _launches(job.scenario)[job.launch]
    config = None if job.config is None else launch.candidates[job.config]
    stats = compile_launch(launch, job.scenario.arch, config)
    s, loop = job.scenario, stats.structure
    return Row(s.kind, job.kernel, s.arch, s.dtype, s.head_dim, s.flags(), job.label, job.kept, stats.shared,
               stats.registers, stats.spill_stores, stats.wgmma, stats.num_warps, loop.mma_text(), loop.wgmma,
               loop.barriers, loop.ldmatrix, loop.dots, loop.duplicated)


def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


# ---------------------------------------------------------------- parent

def _pool(jobs: int):
    # Spawned workers start from a clean interpreter with the parent's
    # environment, from which TRITON_INTERPRET has been removed.
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)


class ResultCache:
    """Rows by job key, one JSON object per line."""

    CACHED = tuple(f.name for f in fields(Row))

    def __init__(self, directory: str | None):
        self.path = None if not directory else Path(directory) / "rows.jsonl"
        self.rows: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                entry = json.loads(line)
                self.rows[entry["key"]] = entry["row"]

    def get(self, job: Job) -> Row | None:
        entry = self.rows.get(job.key)
        if entry is None or not set(self.CACHED) <= entry.keys():  # written before a column was added
            return None
        entry = {name: entry[name] for name in self.CACHED}
        s = job.scenario
        return Row(**{**entry, "launcher": s.kind, "kernel": job.kernel, "arch": s.arch, "dtype": s.dtype,
                      "head_dim": s.head_dim, "flags": s.flags(), "config": job.label, "kept": job.kept})

    def put(self, job: Job, row: Row) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"key": job.key, "row": asdict(row)}) + "\n")


COLUMNS = ("launcher", "kernel", "arch", "dtype", "D", "flags", "config", "kept", "shared", "registers", "model",
           "spill", "wgmma", "loop MMA", "bar.sync", "ldmatrix", "dup dots", "verdict")


def row_cells(row: Row) -> list[str]:
    return [row.launcher, row.kernel, f"sm_{row.arch}", row.dtype, str(row.head_dim), row.flags, row.config,
            "yes" if row.kept else "pruned", str(row.shared), str(row.registers),
            "-" if row.predicted is None else str(row.predicted), str(row.spill), "yes" if row.wgmma else "no",
            row.loop_mma, str(row.barriers), str(row.ldmatrix), f"{row.duplicated}/{row.dots}", row.verdict]


def markdown(rows: list[Row], command: str, seconds: float) -> str:
    import triton

    failing = [r for r in rows if r.kept and r.verdict != "ok"]
    lines = [
        "# AOT compile table",
        "",
        f"`{command}` with triton {triton.__version__} (ptxas from its wheel), {seconds / 60:.1f} min.",
        f"Limits: shared memory per block {GPUS[90]['max_shared_mem']} B (sm_90), {GPUS[80]['max_shared_mem']} B "
        f"(sm_80); {REGISTERS_PER_BLOCK} registers per block; spill budget {SPILL_BUDGET} B of spill stores per "
        f"thread. `model`: registers the resource model predicts (parallax/kernels/triton/resources.py). `loop MMA`, "
        f"`bar.sync`, `ldmatrix`: the main loop's instructions (static counts over its body); `dup dots`: dots "
        f"computed by surplus warps too, of all dots. On sm_90 a training kernel's wgmma loop fails with a "
        f"duplicated dot or an m64n8 wgmma, the dK/dV loop also with ldmatrix or more than {MAX_LOOP_BARRIERS} "
        f"bar.sync.",
        f"{len(rows)} compiles, {sum(r.kept for r in rows)} of kept configs, {len(failing)} kept configs failing.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _finish(row: Row, job: Job) -> Row:
    """Add what is not cached: the model's prediction and the verdict."""
    row.predicted = job.predicted_registers()
    row.verdict = row.judge()
    return row


def _sort_key(row: Row):
    return (row.launcher, row.kernel, -row.arch, row.dtype, row.head_dim, row.flags, not row.kept, row.config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallax.kernels.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", choices=("full", "ci"), default="full")
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--kind", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--no-flag-sweep", action="store_true", help="heaviest flags only")
    parser.add_argument("--all-configs", action="store_true", help="also compile the configs the pruner drops")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "parallax-aot"),
                        help="where results are cached ('' for none)")
    parser.add_argument("--out", help="also write the table as markdown to this file")
    args = parser.parse_args(argv)

    os.environ.pop("TRITON_INTERPRET", None)  # for the spawned workers
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default until 3.10, the GPUs' 3.6 included
    if args.subset == "ci":
        scenarios = ci_scenarios()
    else:
        kinds = [k for k in args.kind if k in TRAINING_KINDS]
        scenarios = training_scenarios(args.arch, args.dtype, args.head_dim, kinds, not args.no_flag_sweep)
        if "decode" in args.kind:
            scenarios += decode_scenarios(args.arch, args.dtype, args.head_dim)
    start = time.time()
    cache = ResultCache(args.cache_dir)
    with _pool(args.jobs) as pool:
        listed = pool.map(functools.partial(list_jobs, all_configs=args.all_configs,
                                            first_only=args.subset == "ci"), scenarios)
        jobs, seen = [], set()
        for job in itertools.chain.from_iterable(listed):
            if job.key not in seen:
                seen.add(job.key)
                jobs.append(job)
        rows, todo = [], []
        for job in jobs:
            cached = cache.get(job)
            (todo.append(job) if cached is None else rows.append(_finish(cached, job)))
        print(f"{len(scenarios)} scenarios, {len(jobs)} distinct compiles, {len(rows)} cached, "
              f"{len(todo)} to compile on {args.jobs} processes", flush=True)
        print("\t".join(COLUMNS), flush=True)
        for row in rows:
            print("\t".join(row_cells(row)), flush=True)
        futures = {pool.submit(compile_job, job): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                row = future.result()
            except Exception as err:  # a compile error is a failing row, not the end of the sweep
                s = job.scenario
                row = Row(s.kind, job.kernel, s.arch, s.dtype, s.head_dim, s.flags(), job.label, job.kept, -1, -1, -1,
                          False, 0, verdict=f"compile error: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            else:
                cache.put(job, row)
                _finish(row, job)
            rows.append(row)
            print("\t".join(row_cells(row)), flush=True)
    rows.sort(key=_sort_key)
    seconds = time.time() - start
    failing = [r for r in rows if r.kept and r.verdict != "ok"]
    print(f"{len(rows)} compiles in {seconds / 60:.1f} min; {len(failing)} kept configs fail (shared memory, "
          f"registers, more than {SPILL_BUDGET} B of spills, or the sm_90 structure rules)")
    for row in failing:
        print("FAIL\t" + "\t".join(row_cells(row)))
    if args.out:
        command = "python -m parallax.kernels.aot" + ("" if argv is None and len(sys.argv) == 1 else
                                                      " " + " ".join(sys.argv[1:] if argv is None else argv))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(rows, command, seconds))
        print(f"wrote {args.out}")
    return 1 if failing else 0

