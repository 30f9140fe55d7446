"""Decode-step latency: Parallax's split-KV kernel against softmax and Parallax decode kernels.

Each kernel runs one decode step (one new query per sequence against L cached
keys, the new key and value appended where the kernel can) captured in a CUDA
graph; the table gives the median replay time with the L2 cache flushed before
each replay, and the bandwidth it implies (the L keys and values read) as a
fraction of a device-to-device copy measured in the same run; the replay of
a graph of one trivial kernel, timed alike, is the harness's floor. bf16, D=128,
HQ:HK = 8:8 and 32:8, B = 1 and 32, cache capacity = L, plus rows whose
capacity (32768) is far above the filled length (4096).

    python -m benchmarks.bench_decode [--quick] [--replays 200] [--lengths 512 4096 ...]

CUDA only. Before timing a shape, every kernel's output on it is compared with
the float32 torch path (`backend="torch"`) with a non-zero probe (softmax
kernels: with the probe set to zero); Parallax off by more than the tolerance
ends the run with an error, a baseline off or failing loses its cell.
Baselines are found at run time, each optional: FA2 (`flash_attn`'s
`flash_attn_with_kvcache`, else PyTorch SDPA's flash backend on the cache
slice), FA3 (the `fa3-fwd` wheel's `fa3_fwd_interface`, or a FlashAttention 3
install), fla's one-step Parallax decode (fla >= 0.6:
`fla.ops.parallax.decode.parallax_decode_one_step`) and the official one, the
Parallax authors' CuTeDSL kernel (github.com/Yifei-Zuo/Parallax, sm_90; its
source and the cutlass-dsl wheel from `bash benchmarks/fetch_wheels.sh`, see
benchmarks/official.py). The table is rewritten after every row, so a run
cut short keeps the rows it finished. A split sweep follows: B=1 rows timed
at several split counts against the model's choice (`choose_num_splits`).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baselines import FA2_KVCACHE, FA3_KVCACHE, FLA_DECODE, find, sdpa_flash  # noqa: E402
from benchmarks.environment import add_out_argument, describe, markdown_table, save, table_name, table_path  # noqa: E402
from benchmarks.official import import_official  # noqa: E402
from benchmarks.timing import WARMUP_CALLS, l2_flush, measure, measure_cuda_graph  # noqa: E402
from parallax import parallax_attn_with_kvcache  # noqa: E402
from parallax.kernels.triton.decode import default_num_splits, launch_config, triton_decode  # noqa: E402

HEAD_DIM = 128
DTYPE = torch.bfloat16
HEADS = ((8, 8), (32, 8))  # (HQ, HK)
BATCHES = (1, 32)
LENGTHS = (512, 1024, 4096, 16384, 65536)
CAPACITY_ROWS = ((4096, 32768),)  # (filled length L, capacity)
COPY_REPEATS = 20
PASS_FRACTION = 0.85  # of the copy bandwidth, for caches of PASS_MIN_BYTES and more
PASS_MIN_BYTES = 256e6
# bf16 output: a few units of its last place at the output's scale; a wrong
# mask, head mapping or probe is off by O(1).
TOLERANCE = 4 * 2.0**-8
CHECK_SEQUENCES = 2  # the reference runs on this many sequences of each shape
SWEEP_LENGTHS = (16384, 65536)  # B=1, HQ:HK = 8:8
SWEEP_SPLITS = (8, 16, 24, 33, 48, 64, 96, 128, 192)


@dataclass
class Case:
    """One decode step: L - 1 cached tokens, the L-th appended by the step.
    The cache already holds the new token at its slot, so kernels that do not
    append (SDPA, fla) attend to the same L keys as those that do."""

    B: int
    HQ: int
    HK: int
    L: int
    capacity: int
    q: torch.Tensor
    r: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    seqlens: torch.Tensor  # int32 [B], L - 1: tokens cached before the step

    @property
    def cache_bytes(self) -> int:
        return 2 * self.B * self.L * self.HK * HEAD_DIM * self.k_cache.element_size()

    def contiguous_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The L filled positions as contiguous tensors (a copy when capacity > L)."""
        k, v = self.k_cache[:, : self.L], self.v_cache[:, : self.L]
        return k.contiguous(), v.contiguous()


def make_case(B, HQ, HK, L, capacity, device="cuda", dtype=DTYPE, seed=0) -> Case:
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    k_cache = torch.zeros(B, capacity, HK, HEAD_DIM, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:, :L], v_cache[:, :L] = rand(B, L, HK, HEAD_DIM), rand(B, L, HK, HEAD_DIM)
    # Scores of std sigma spread the softmax over about L * exp(-sigma^2) keys:
    # about 16 at every L, so the output (and the probe's covariance term) stays
    # O(1) instead of shrinking like L^-1/2. r ~ 2 D^-1/2 makes s2 = r.k O(1) and moves
    # the output by several times the tolerance on every draw (r ~ D^-1/2 fell short once).
    q_std = math.sqrt(max(1.0, math.log(L / 16)))
    q, r = rand(B, 1, HQ, HEAD_DIM, std=q_std), rand(B, 1, HQ, HEAD_DIM, std=2 * HEAD_DIM**-0.5)
    seqlens = torch.full((B,), L - 1, dtype=torch.int32, device=device)
    return Case(B, HQ, HK, L, capacity, q, r, k_cache, v_cache, k_cache[:, L - 1 : L].clone(),
                v_cache[:, L - 1 : L].clone(), seqlens)


# ---- the kernels: each maps a Case to a step() returning [B, 1, HQ, D] ----

@dataclass
class Kernel:
    name: str
    source: str  # where it was found, or why it is missing
    computes: str  # "parallax" or "softmax": which reference it must match
    make_step: object = None  # Case -> step callable; None when not available
    release: object = None  # called after each shape: drop what the kernel keeps of its inputs


def parallax_kernel() -> Kernel:
    def make_step(c: Case):
        return lambda: parallax_attn_with_kvcache(c.q, c.r, c.k_cache, c.v_cache, k=c.k_new, v=c.v_new,
                                                  cache_seqlens=c.seqlens)
    return Kernel("parallax", "parallax_attn_with_kvcache (Triton, appends)", "parallax", make_step)


def fa2_kernel() -> Kernel:
    found = find(FA2_KVCACHE)
    if found.fn is None:
        def make_sdpa_step(c: Case):
            return lambda: sdpa_flash(c.q, c.k_cache[:, : c.L], c.v_cache[:, : c.L], causal=False)
        return Kernel("FA2", "PyTorch SDPA flash backend on the cache slice (no append)", "softmax", make_sdpa_step)
    return Kernel("FA2", f"{found.source} (appends)", "softmax", kvcache_step(found.fn))


def kvcache_step(fn):
    """FlashAttention's `flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, causal)`."""
    def make_step(c: Case):
        def step():
            out = fn(c.q, c.k_cache, c.v_cache, k=c.k_new, v=c.v_new, cache_seqlens=c.seqlens, causal=True)
            return out[0] if isinstance(out, tuple) else out
        return step
    return make_step


def fa3_kernel() -> Kernel:
    found = find(FA3_KVCACHE)
    if found.fn is None:
        return Kernel("FA3", found.source, "softmax")
    return Kernel("FA3", f"{found.source} (appends)", "softmax", kvcache_step(found.fn))


def fla_kernel() -> Kernel:
    """fla's one-step Parallax decode; it reads a contiguous [B, L] cache and does not append."""
    found = find(FLA_DECODE)
    if found.fn is None:
        return Kernel("fla", found.source, "parallax")

    def make_step(c: Case):
        k, v = c.contiguous_cache()  # outside the timing; the same bytes as the others read
        return lambda: found.fn(c.q, c.r, k, v)

    return Kernel("fla", f"{found.source} (no append)", "parallax", make_step)


def official_kernel() -> Kernel:
    """The Parallax authors' decode kernel: `parallax_attn_with_kvcache(q, r,
    k_cache, v_cache, seqused_k=, out=)` in `parallax.cute.parallax_decode`
    of their package (CuTeDSL, sm_90, bf16/fp16, head dim 64/128, HQ/HK in
    1/2/4/8). It reads the first seqused_k keys and does not append."""
    try:
        module = import_official("parallax.cute.parallax_decode")
        fn = module.parallax_attn_with_kvcache
    except Exception as err:  # noqa: BLE001 - missing source, wheel or driver: the column stays blank
        return Kernel("official", f"not found ({type(err).__name__}: {err})", "parallax")

    def make_step(c: Case):
        used, out = c.seqlens + 1, torch.empty_like(c.q)
        return lambda: fn(c.q, c.r, c.k_cache, c.v_cache, seqused_k=used, out=out)

    def release():
        getattr(module, "_cute_input_cache", {}).clear()  # it keeps every tensor it was given alive

    return Kernel("official", "Yifei-Zuo/Parallax parallax.cute.parallax_decode.parallax_attn_with_kvcache "
                  "(CuTeDSL, no append)", "parallax", make_step, release)


# ---- correctness before timing ----

def reference(c: Case, computes: str) -> torch.Tensor:
    """float32 torch path on the first CHECK_SEQUENCES sequences (after the append)."""
    n = min(CHECK_SEQUENCES, c.B)
    r = c.r[:n] if computes == "parallax" else torch.zeros_like(c.r[:n])
    return parallax_attn_with_kvcache(c.q[:n], r, c.k_cache[:n, : c.L], c.v_cache[:n, : c.L],
                                      cache_seqlens=c.seqlens[:n] + 1, backend="torch").float()


def check(kernel: Kernel, step, c: Case, references: dict) -> str | None:
    """None when the kernel's output matches its reference, else why not."""
    out = step()
    expected = references[kernel.computes]
    got = out[: expected.shape[0]].float()
    if not torch.isfinite(got).all():
        return "non-finite output"
    err = (got - expected).abs().max().item()
    bound = TOLERANCE * max(1.0, expected.abs().max().item())
    if err > bound:
        return f"max error {err:.3g} > {bound:.3g} against the {kernel.computes} reference"
    return None


def probe_matters(references: dict) -> bool:
    """The non-zero probe must move the output well past the tolerance, or the
    Parallax check could not tell Parallax from softmax."""
    shift = (references["parallax"] - references["softmax"]).abs().max().item()
    return shift > 10 * TOLERANCE * max(1.0, references["parallax"].abs().max().item())


# ---- timing ----

def time_graph(step, replays: int, flush) -> float:
    """Median seconds of one replay of `step` captured in a CUDA graph, the L2
    cache flushed before each (a real step follows other layers: the cache is
    not in L2)."""
    return measure_cuda_graph(step, torch.device("cuda"), replays, before_each=flush).median / 1e3


def harness_floor(replays: int, flush) -> float:
    """Seconds of replaying a graph of one kernel that does next to nothing,
    timed as the cells are: the part of a short cell's time that is the
    harness's (graph launch, events), not the kernel's."""
    scalar = torch.zeros(1, device="cuda")
    return time_graph(lambda: scalar.add_(1), replays, flush)


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 4 GiB device-to-device copy,
    launched eagerly: captured in a CUDA graph the copy becomes a memcpy node
    that ran at 2.7 TB/s on an H200 against 4.2 TB/s launched as a kernel."""
    src = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    milliseconds = measure({"copy": lambda: dst.copy_(src)}, src.device, COPY_REPEATS)["copy"].median
    return 2 * src.numel() / (milliseconds / 1e3)


def measure_shape(c: Case, kernels: list[Kernel], replays: int, flush) -> dict:
    """{kernel name: seconds or a short reason it has no time}."""
    references = {kind: reference(c, kind) for kind in ("parallax", "softmax")}
    if not probe_matters(references):
        raise SystemExit(f"B={c.B} HQ:HK={c.HQ}:{c.HK} L={c.L}: the probe barely changes the output; "
                         "the Parallax check would be meaningless")
    cells = {}
    for kernel in kernels:
        if kernel.make_step is None:
            continue
        cell = None
        try:
            step = kernel.make_step(c)
            wrong = check(kernel, step, c, references)
            if wrong is not None:
                cell = "wrong"
        except Exception as err:  # noqa: BLE001 - a baseline may fail in any way; parallax's ends the run below
            cell, wrong = "failed", f"{type(err).__name__}: {err}"
        if cell is not None:
            where = f"B={c.B} HQ:HK={c.HQ}:{c.HK} L={c.L} capacity={c.capacity}"
            if kernel.name == "parallax":
                raise SystemExit(f"parallax {cell} at {where}: {wrong}")
            print(f"  {kernel.name} skipped at {where}: {wrong}", file=sys.stderr)
            cells[kernel.name] = cell
            continue
        try:
            cells[kernel.name] = time_graph(step, replays, flush)
        except Exception as err:  # noqa: BLE001
            if kernel.name == "parallax":
                raise
            print(f"  {kernel.name} could not be timed at B={c.B} L={c.L}: {err}", file=sys.stderr)
            cells[kernel.name] = "failed"
    return cells


def splits(c: Case) -> int:
    """The kernel's shape-based split count for this case (1: no merge launch)."""
    group_rows = c.HQ // c.HK  # one query per sequence
    config = launch_config(HEAD_DIM, DTYPE, group_rows)
    row_blocks = -(-group_rows // config["PAIRS"])
    return default_num_splits(c.B * c.HK * row_blocks, c.capacity, config, HEAD_DIM, DTYPE, c.q.device)


def split_sweep(replays: int, flush) -> list[str]:
    """B=1 decode timed at several split counts and at the model's choice: the
    numbers that calibrate `choose_num_splits` (its constants in parallax/kernels/triton/decode.py)."""
    header = ["L", *[f"{n} splits" for n in SWEEP_SPLITS], "model's choice", "best"]
    rows = []
    for L in SWEEP_LENGTHS:
        c = make_case(1, 8, 8, L, L)
        chosen = splits(c)
        times = {}
        for n in sorted({*SWEEP_SPLITS, chosen}):
            times[n] = time_graph(lambda n=n: triton_decode(
                c.q, c.r, c.k_cache, c.v_cache, c.seqlens, None, k=c.k_new, v=c.v_new, scale=HEAD_DIM**-0.5,
                window_size=None, num_splits=n), replays, flush)
        best = min(times, key=times.get)
        rows.append([L, *[f"{times[n] * 1e3:.4f}" + ("*" if n == chosen else "") for n in SWEEP_SPLITS],
                     f"{chosen}: {times[chosen] * 1e3:.4f}", f"{best}: {times[best] * 1e3:.4f}"])
        print(markdown_table(header, rows)[-1], flush=True)
        del c
    return ["", "## Split sweep", "",
            f"B=1, HQ:HK=8:8: parallax's time in ms at each split count (L2 flushed, median of {replays}); "
            "*: the model's choice.", "", *markdown_table(header, rows)]


def judge(c: Case, cells: dict, copy_bw: float) -> list[str]:
    """The issue's targets, where the shape and the measurements allow."""
    shape = f"B={c.B} HQ:HK={c.HQ}:{c.HK} L={c.L} capacity={c.capacity}"
    mine = cells.get("parallax")
    out = []
    fa3 = cells.get("FA3")
    if c.L >= 4096 and isinstance(fa3, float):
        verdict = "PASS" if mine <= fa3 else "MISS"
        out.append(f"{verdict} {shape}: parallax {mine * 1e3:.4f} ms vs FA3 {fa3 * 1e3:.4f} ms (target <=)")
    if c.cache_bytes >= PASS_MIN_BYTES:
        fraction = c.cache_bytes / mine / copy_bw
        verdict = "PASS" if fraction >= PASS_FRACTION else "MISS"
        out.append(f"{verdict} {shape}: {fraction:.0%} of the copy bandwidth (target {PASS_FRACTION:.0%})")
    official = cells.get("official")
    if isinstance(official, float):
        verdict = "PASS" if mine <= official else "MISS"
        out.append(f"{verdict} {shape}: parallax {mine * 1e3:.4f} ms vs official {official * 1e3:.4f} ms (target <=)")
    fla = cells.get("fla")
    if (c.B, c.HQ, c.HK, c.L) == (1, 8, 8, 16384) and isinstance(fla, float):
        speedup = fla / mine
        out.append(f"{'PASS' if speedup >= 3 else 'MISS'} {shape}: {speedup:.1f}x faster than fla (target 3x)")
    return out


def cases(lengths):
    for HQ, HK in HEADS:
        for B in BATCHES:
            for L in lengths:
                yield B, HQ, HK, L, L
            for L, capacity in CAPACITY_ROWS:
                yield B, HQ, HK, L, capacity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="L = 512 and 4096, 30 replays")
    parser.add_argument("--prefix", default="decode", help="the table's name: <prefix>_<device>.md")
    add_out_argument(parser, "<prefix>_<device>.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode measures GPU decode latency and needs a CUDA device; none was found.")
    lengths, replays = ((512, 4096), 30) if args.quick else (args.lengths, args.replays)
    device = torch.device("cuda")

    kernels = [parallax_kernel(), fa2_kernel(), fa3_kernel(), fla_kernel(), official_kernel()]
    for kernel in kernels:
        print(f"{kernel.name}: {kernel.source}")
    copy_bw = copy_bandwidth()
    flush = l2_flush(device)
    floor = harness_floor(replays, flush)
    names = [k.name for k in kernels]
    lines = [
        f"# Decode step latency on {torch.cuda.get_device_name()}",
        "",
        describe(device, ("fla-core", "fa3-fwd", "flash-attn", "nvidia-cutlass-dsl")),
        "",
        f"bf16, D={HEAD_DIM}, one new token per sequence, CUDA-graph replay, median of {replays} after "
        f"{WARMUP_CALLS} warm-up replay(s), L2 flushed before each replay (`benchmarks.timing`). "
        f"Device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write). A graph of one trivial kernel "
        f"replays in {floor * 1e3:.4f} ms under the same rule: no cell can be faster. Each cell: ms "
        "(the L keys and values read, as a fraction of the copy rate). Every cell was checked against the "
        f"float32 torch path (non-zero probe; softmax kernels with a zero probe) on {CHECK_SEQUENCES} sequences "
        "before timing; 'wrong'/'failed' cells were not timed. splits: parallax's key splits (1 = no merge).",
        "",
        *[f"- {k.name}: {k.source}" for k in kernels],
        "",
    ]
    header = ["B", "HQ:HK", "L", "capacity", "cache MB", "splits", *names]
    path = table_path(args.out, table_name(args.prefix, device))
    rows, verdicts = [], []
    for B, HQ, HK, L, capacity in cases(lengths):
        c = make_case(B, HQ, HK, L, capacity)
        cells = measure_shape(c, kernels, replays, flush)
        row = []
        for name in names:
            value = cells.get(name, "")
            row.append(f"{value * 1e3:.4f} ({c.cache_bytes / value / copy_bw:.0%})" if isinstance(value, float)
                       else value)
        rows.append([B, f"{HQ}:{HK}", L, capacity, f"{c.cache_bytes / 1e6:.0f}", splits(c), *row])
        print(markdown_table(header, rows)[-1], flush=True)
        verdicts += judge(c, cells, copy_bw)
        del c
        for kernel in kernels:
            if kernel.release is not None:
                kernel.release()
        torch.cuda.empty_cache()
        save(path, lines + markdown_table(header, rows) + ["", "(run in progress: the rows above are final)"])

    lines += markdown_table(header, rows)
    lines += ["", "## Targets", ""] + [f"- {v}" for v in verdicts]
    save(path, lines)
    print("\n".join(lines[-len(verdicts) - 1:]))
    lines += split_sweep(replays, flush)
    save(path, lines)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
