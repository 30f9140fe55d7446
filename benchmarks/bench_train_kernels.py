"""Training-kernel benchmark: Parallax (Triton) against FlashAttention 2, FA3 and fla.

Usage (CUDA only, from the repo root):
    python -m benchmarks.bench_train_kernels [--quick]

bf16, causal, B * T = 16k tokens, 16 query heads, D = 64 and 128, T = 1k to
16k; rows with 16 KV heads and with 4 (GQA 4:1), and with a window of 1024.
Each row times the forward and forward + backward, both backwards
(`deterministic=True`, the default three-launch one, and `deterministic=False`,
the fused one), with `benchmarks.timing.measure` (CUDA events, the L2 cache
flushed before each run; medians of REPEATS runs). Before timing, every implementation is
checked against the float32 reference on the same inputs, probe non-zero; a
Parallax mismatch stops the run, a baseline that fails (missing, wrong, or
raising) gets an empty column and a note instead.

Baselines: FA2 = PyTorch SDPA's flash backend (full causal, no window); FA3
forward = `flash_attn_func` from a FlashAttention 3 install or the fa3-fwd wheel's
`fa3_fwd_interface` when importable; fla = `fla.ops.parallax.parallel_parallax` when importable
(`benchmarks.baselines`). TFLOP/s
use the counts of docs/parallax-math.md: per (batch, head), causal, Parallax
does 4 L^2 D forward + 8 L^2 D backward, softmax 2 L^2 D + 5 L^2 D; a window
W scales the visible pairs from L^2 / 2 to L W - W^2 / 2. Prints markdown and
writes it to benchmarks/results/train_kernels_<gpu_name>.md. About 3 minutes
on an H100 (`--quick`: T = 1k and 4k only).
"""
from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baselines import FA3_FUNC, FLA_PARALLAX, find, sdpa_flash  # noqa: E402
from benchmarks.environment import markdown_table, save  # noqa: E402
from benchmarks.timing import WARMUP_CALLS, l2_flush, measure  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.bfloat16
TOKENS = 16 * 1024
HEADS = 16
HEAD_DIMS = (64, 128)
SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
WINDOW = 1024
KV_HEADS = (16, 4)
# Largest error against the float32 reference, relative to the reference's
# largest magnitude, that a bf16 kernel may have (bf16 keeps 8 bits: ~4e-3
# per rounding); a broken kernel is off by O(1).
TOLERANCE = 3e-2
CHECK_LEN = 2048  # the reference is dense: check at most this many tokens
REPEATS = 50


def visible_pairs(L, window):
    return L * L / 2 if window is None else L * window - window * window / 2


def tflops(causal_coefficient, B, L, D, window, ms):
    """TFLOP/s of `causal_coefficient * L^2 D` FLOPs per (batch, head),
    rescaled to the pairs a window leaves visible."""
    return causal_coefficient * 2 * visible_pairs(L, window) * D * B * HEADS / (ms * 1e9)


# ---------------------------------------------------------------- baselines
# Each loader returns (callable or None, note). A callable takes
# (q, r, k, v, window) in [B, T, H, D] layout and returns o, or None when it
# does not support the shape.

def load_fa2():
    def call(q, r, k, v, window):
        return None if window is not None else sdpa_flash(q, k, v, causal=True)

    return call, "FA2: SDPA flash backend"


def load_fa3():
    found = find(FA3_FUNC)
    if found.fn is None:
        return None, f"FA3 {found.source}"

    def call(q, r, k, v, window):
        size = (-1, -1) if window is None else (window - 1, 0)
        out = found.fn(q, k, v, causal=True, window_size=size)
        return out[0] if isinstance(out, tuple) else out

    return call, f"FA3: {found.source} (forward only)"


def load_fla():
    found = find(FLA_PARALLAX)
    if found.fn is None:
        return None, f"fla {found.source}"
    parallel_parallax = found.fn
    params = inspect.signature(parallel_parallax).parameters
    probe = next((name for name in ("r", "p", "probe") if name in params), None)
    if probe is None or not {"q", "k", "v"} <= set(params):
        return None, f"fla signature not understood: parallel_parallax{inspect.signature(parallel_parallax)}"

    def call(q, r, k, v, window):
        kwargs = {"q": q, probe: r, "k": k, "v": v}
        if "head_first" in params:
            kwargs["head_first"] = False
        if window is not None:
            if "window_size" not in params:
                return None
            kwargs["window_size"] = window
        out = parallel_parallax(**kwargs)
        return out[0] if isinstance(out, tuple) else out

    return call, f"fla parallel_parallax{inspect.signature(parallel_parallax)}"


# ---------------------------------------------------------------- checks

def _inputs(B, L, HK, D, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(heads):
        return torch.randn(B, L, heads, D, device=DEVICE, dtype=DTYPE, generator=gen)

    # A probe of the size a trained layer has (not zero: r = 0 is softmax attention).
    q, r, k, v = randn(HEADS), 0.1 * randn(HEADS), randn(HK), randn(HK)
    return [x.requires_grad_() for x in (q, r, k, v)], randn(HEADS)


def _reference(q, r, k, v, window, softmax):
    from parallax.kernels import parallax_reference

    probe = torch.zeros_like(r) if softmax else r
    return parallax_reference(q.float(), probe.float(), k.float(), v.float(), causal=True, window_size=window)


def check(name, fn, D, L, HK, window, softmax, grad=True):
    """Relative error of fn's output (and, with grad, gradients) against the
    float32 reference at batch 1 and min(L, CHECK_LEN) tokens (the autotuned
    config does not depend on the length, so this is the kernel that is
    timed); raises ValueError when over TOLERANCE. None if fn declines."""
    inputs, _ = _inputs(1, min(L, CHECK_LEN), HK, D, seed=1)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    ref_leaves = [x.detach().float().requires_grad_() for x in inputs]
    out = fn(*leaves, window)
    if out is None:
        return None
    ref = _reference(*ref_leaves, window, softmax)
    pairs = [(out, ref)]
    if grad:
        grad_out = torch.randn_like(ref)
        out.backward(grad_out.to(out.dtype))
        ref.backward(grad_out)
        used = [0, 2, 3] if softmax else [0, 1, 2, 3]
        # A gradient the implementation did not produce counts as zero.
        pairs += [(leaves[i].grad if leaves[i].grad is not None else torch.zeros_like(leaves[i]), ref_leaves[i].grad)
                  for i in used]
    worst = max(((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in pairs)
    if not worst <= TOLERANCE:
        raise ValueError(f"{name}: error {worst:.3g} (relative to the largest reference value) against the "
                         f"float32 reference exceeds {TOLERANCE}")
    return worst


# ---------------------------------------------------------------- timing

def time_pair(fn, inputs, grad_out, window, flush, forward_only=False):
    """(forward ms, forward + backward ms or None), medians taking turns."""
    fns = {"fwd": lambda: fn(*inputs, window)}
    if not forward_only:
        fns["fwd+bwd"] = lambda: fn(*inputs, window).backward(grad_out)
    times = measure(fns, torch.device(DEVICE), REPEATS, before_each=flush)
    return times["fwd"].median, None if forward_only else times["fwd+bwd"].median


def benchmark_rows(baselines, seq_lens, notes, flush):
    from parallax.kernels import parallax_attn

    def parallax(deterministic):
        def call(q, r, k, v, window):
            return parallax_attn(q, r, k, v, window_size=window, backend="triton", deterministic=deterministic)
        return call

    rows = []
    for D in HEAD_DIMS:
        for L in seq_lens:
            B = max(1, TOKENS // L)
            for HK in KV_HEADS:
                inputs, grad_out = _inputs(B, L, HK, D)
                for window in (None, WINDOW):
                    if window is not None and window >= L:
                        continue
                    row = dict(D=D, L=L, B=B, HK=HK, window=window)
                    for deterministic, key in ((True, "default"), (False, "fused")):
                        # A wrong Parallax result ends the run (ValueError).
                        check(f"parallax {key} D={D} T={L} HK={HK} window={window}", parallax(deterministic),
                              D, L, HK, window, softmax=False)
                        row[key] = time_pair(parallax(deterministic), inputs, grad_out, window, flush)
                    for name, (fn, forward_only, softmax) in baselines.items():
                        try:
                            err = check(f"{name} D={D} T={L}", fn, D, L, HK, window, softmax, grad=not forward_only)
                            row[name] = None if err is None else time_pair(fn, inputs, grad_out, window, flush,
                                                                            forward_only)
                        except Exception as exc:  # a failing baseline loses its column, not the run
                            notes.add(f"{name} skipped at D={D} T={L} HK={HK} window={window}: "
                                      f"{type(exc).__name__}: {str(exc)[:160]}")
                            row[name] = None
                    rows.append(row)
                del inputs, grad_out
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
    return rows


def fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None else a / b


def markdown(rows, baseline_names, notes):
    import triton

    gpu = torch.cuda.get_device_name()
    header = ["D", "T", "B", "HK", "window", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
              "fused fwd+bwd ms", "fused / default"]
    for name in baseline_names:
        header += [f"{name} fwd ms", f"fwd vs {name}", f"{name} fwd+bwd ms", f"fwd+bwd vs {name}"]
    lines = [
        f"# Training kernels on {gpu}",
        "",
        f"bf16, causal, B*T = {TOKENS} tokens, {HEADS} query heads, HK KV heads. Times are medians in ms of "
        f"{REPEATS} runs after {WARMUP_CALLS} warm-up call(s) (CUDA events, L2 flushed before each run; "
        "`benchmarks.timing`); TFLOP/s by the math doc's counts; 'x vs y' is Parallax "
        "time over y's time (default backward: three launches, deterministic). 'fused' is the one-launch "
        "backward with float32 atomics (`deterministic=False`).",
        f"torch {torch.__version__}, triton {triton.__version__}.",
        "",
    ]
    table = []
    for row in rows:
        D, L, B, window = row["D"], row["L"], row["B"], row["window"]
        fwd, train = row["default"]
        fused_train = row["fused"][1]
        cells = [str(D), str(L), str(B), str(row["HK"]), str(window or "-"), fmt(fwd),
                 fmt(tflops(4, B, L, D, window, fwd), ".1f"), fmt(train), fmt(tflops(12, B, L, D, window, train), ".1f"),
                 fmt(fused_train), fmt(ratio(fused_train, train), ".2f")]
        for name in baseline_names:
            theirs = row.get(name) or (None, None)
            cells += [fmt(theirs[0]), fmt(ratio(fwd, theirs[0]), ".2f"), fmt(theirs[1]),
                      fmt(ratio(train, theirs[1]), ".2f")]
        table.append(cells)
    return lines + markdown_table(header, table) + [""] + [f"- {note}" for note in sorted(notes)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 1k and 4k only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_kernels needs a CUDA GPU (it times Triton kernels against FlashAttention); none found.")
    notes = set()
    baselines = {}
    for name, loader, forward_only, softmax in (("FA2", load_fa2, False, True), ("FA3", load_fa3, True, True),
                                                 ("fla", load_fla, False, False)):
        fn, note = loader()
        notes.add(note)
        if fn is not None:
            baselines[name] = (fn, forward_only, softmax)
    print("\n".join(sorted(notes)))
    rows = benchmark_rows(baselines, (1024, 4096) if args.quick else SEQ_LENS, notes, l2_flush(torch.device(DEVICE)))
    lines = markdown(rows, list(baselines), notes)
    print("\n".join(lines))
    name = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower()
    path = save(Path(__file__).resolve().parent / "results" / f"train_kernels_{name}.md", lines)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
