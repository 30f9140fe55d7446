"""Training-kernel benchmark: Parallax (Triton) against FlashAttention 2, FA3,
fla and the official Parallax kernels.

Usage (from the repo root):
    python -m benchmarks.bench_train_kernels [--quick] [--baselines NAME ...]
    python -m benchmarks.bench_train_kernels --device cpu     # smoke run in the Triton interpreter

bf16, causal, B * T = 16k tokens, 16 query heads, D = 64 and 128, T = 1k to
16k; rows with 16 KV heads and with 4 (GQA 4:1), and with a window of 1024.
Each row times the forward and forward + backward, both backwards
(`deterministic=True`, the default three-launch one, and `deterministic=False`,
the fused one), with `benchmarks.timing.measure` (CUDA events, the L2 cache
flushed before each run; medians of REPEATS runs). Before timing,
every implementation is checked against the float32 reference on the same
inputs, probe non-zero; a Parallax mismatch stops the run, a baseline that
fails (missing, wrong, or raising) gets an empty column and a note instead.

A second table shows where Parallax's time goes: every launch of one training
step (forward; backward: row statistics, dK/dV, dQ) replayed and timed on its
own, with the config the autotuner chose for it.

Baselines (`benchmarks.baselines`): FA2 = PyTorch SDPA's flash backend (full
causal, no window); FA3 forward = `flash_attn_func` from a FlashAttention 3
install or the fa3-fwd wheel's `fa3_fwd_interface` when importable; fla =
`fla.ops.parallax.parallel_parallax` when importable; official = `parallax_func` of the Parallax authors' Triton
kernels (the parallax-kernel wheel in .whl/, which imports as `parallax` like
this package: unpacked to a temporary directory and imported with this
package's modules set aside; given [B, H, T, D] inputs made outside the timed
region; it autotunes 36 configs per kernel and per sequence length, so its
first row at each shape takes minutes). TFLOP/s use the counts of
docs/parallax-math.md: per (batch, head), causal, Parallax does 4 L^2 D
forward + 8 L^2 D backward, softmax 2 L^2 D + 5 L^2 D; a window W scales the
visible pairs from L^2 / 2 to L W - W^2 / 2. Prints markdown and writes it to
out/bench/train_kernels_<gpu-name>.md (`--tag`, `--out` to choose). About 3
minutes on an H100 without the official kernels (`--quick`: T = 1k and 4k).

`--device cpu` runs the same steps on tiny float16 shapes in the Triton
interpreter (no baselines; times are host medians and mean nothing): the test
suite's check that the benchmark runs end to end.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import inspect
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.baselines import FA3_FUNC, FLA_PARALLAX, find, sdpa_flash  # noqa: E402
from benchmarks.environment import add_out_argument, describe, markdown_table, save, table_name, table_path  # noqa: E402
from benchmarks.timing import l2_flush, measure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 50  # timed runs per measurement on a GPU (one on CPU: the smoke run)
WINDOW = 1024
# Largest error against the float32 reference, relative to the reference's
# largest magnitude, that a bf16 kernel may have (bf16 keeps 8 bits: ~4e-3
# per rounding); a broken kernel is off by O(1).
TOLERANCE = 3e-2
CHECK_LEN = 2048  # the reference is dense: check at most this many tokens
# Triton kernels of one Parallax training step, as the breakdown names them.
LAUNCH_NAMES = {"_parallax_fwd_kernel": "fwd", "_row_dots_kernel": "row stats",
                "_parallax_bwd_dkdv_kernel": "dK/dV", "_parallax_bwd_dq_kernel": "dQ"}


@dataclass(frozen=True)
class Setup:
    """What one run measures."""
    device: str
    dtype: torch.dtype
    tokens: int          # B * T per row
    heads: int           # query heads
    head_dims: tuple
    seq_lens: tuple
    kv_heads: tuple
    windows: tuple       # None: no window; a window is measured where shorter than T

    def cells(self):
        for D in self.head_dims:
            for L in self.seq_lens:
                for HK in self.kv_heads:
                    for window in self.windows:
                        if window is None or window < L:
                            yield D, L, max(1, self.tokens // L), HK, window


GPU = Setup("cuda", torch.bfloat16, 16 * 1024, 16, (64, 128), (1024, 2048, 4096, 8192, 16384), (16, 4),
            (None, WINDOW))
# One cell with every mask and GQA, two query tiles; float16: the
# interpreter's bf16 tl.dot is wrong.
CPU = Setup("cpu", torch.float16, 32, 2, (16,), (32,), (1,), (16,))


def visible_pairs(L, window):
    return L * L / 2 if window is None else L * window - window * window / 2


def tflops(causal_coefficient, B, L, D, heads, window, ms):
    """TFLOP/s of `causal_coefficient * L^2 D` FLOPs per (batch, head),
    rescaled to the pairs a window leaves visible."""
    return causal_coefficient * 2 * visible_pairs(L, window) * D * B * heads / (ms * 1e9)


@functools.lru_cache(maxsize=None)
def _shared_l2_flush(device):
    """One flush buffer per device for every measurement."""
    return l2_flush(torch.device(device))


def median_ms(fn, device):
    """Median ms of fn by `benchmarks.timing.measure`: on a GPU REPEATS runs,
    the L2 cache flushed before each; on CPU (the smoke run) one."""
    cuda = device == "cuda"
    return measure({"run": fn}, torch.device(device), REPEATS if cuda else 1,
                   before_each=_shared_l2_flush(device) if cuda else None)["run"].median


# ---------------------------------------------------------------- baselines

@dataclass(frozen=True)
class Baseline:
    """`call(q, r, k, v, window)` -> o, or None where it does not support the
    shape; inputs and output in [B, T, H, D] or, with layout "bhtd",
    [B, H, T, D] (made outside the timed region)."""
    name: str
    call: object
    forward_only: bool = False
    softmax: bool = False  # computes softmax attention (checked against r = 0)
    layout: str = "bthd"


def load_fa2():
    def call(q, r, k, v, window):
        return None if window is not None else sdpa_flash(q, k, v, causal=True)

    return Baseline("FA2", call, softmax=True), "FA2: SDPA flash backend"


def load_fa3():
    found = find(FA3_FUNC)
    if found.fn is None:
        return None, f"FA3 {found.source}"

    def call(q, r, k, v, window):
        size = (-1, -1) if window is None else (window - 1, 0)
        out = found.fn(q, k, v, causal=True, window_size=size)
        return out[0] if isinstance(out, tuple) else out

    return Baseline("FA3", call, forward_only=True, softmax=True), f"FA3: {found.source} (forward only)"


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

    return Baseline("fla", call), f"fla parallel_parallax{inspect.signature(parallel_parallax)}"


def _is_parallax_module(name):
    return name == "parallax" or name.startswith("parallax.")


def load_official(wheel=None):
    """`parallax.triton.parallax_func` of the parallax-kernel wheel (newest in
    .whl/ unless given). It imports as `parallax`, like this package: unpack it
    to a temporary directory and import it while this package's modules are
    set aside, then put them back (its functions keep their own globals)."""
    wheels = sorted((ROOT / ".whl").glob("parallax_kernel-*.whl")) if wheel is None else [Path(wheel)]
    if not wheels:
        return None, "official: no parallax_kernel wheel in .whl/ (bash benchmarks/fetch_wheels.sh)"
    unpacked = tempfile.mkdtemp(prefix="parallax-official-")
    atexit.register(shutil.rmtree, unpacked, ignore_errors=True)
    with zipfile.ZipFile(wheels[-1]) as archive:
        archive.extractall(unpacked)
    ours = {name: module for name, module in sys.modules.items() if _is_parallax_module(name)}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, unpacked)
    try:
        parallax_func = importlib.import_module("parallax.triton").parallax_func
    except Exception as err:  # a broken baseline loses its column, not the run
        return None, f"official not importable from {wheels[-1].name} ({type(err).__name__}: {err})"
    finally:
        sys.path.remove(unpacked)
        for name in [name for name in sys.modules if _is_parallax_module(name)]:
            del sys.modules[name]
        sys.modules.update(ours)

    def call(q, r, k, v, window):
        return parallax_func(q, r, k, v, window_size_left=-1 if window is None else window)

    return (Baseline("official", call, layout="bhtd"),
            f"official: parallax_func of {wheels[-1].name} ([B, H, T, D] inputs made outside the timed region)")


LOADERS = {"FA2": load_fa2, "FA3": load_fa3, "fla": load_fla, "official": load_official}


def _to_layout(x, layout):
    return x.transpose(1, 2).contiguous() if layout == "bhtd" else x


def _from_layout(x, layout):
    return x.transpose(1, 2) if layout == "bhtd" else x


def _leaves(tensors, layout="bthd"):
    return [_to_layout(x.detach(), layout).requires_grad_() for x in tensors]


# ---------------------------------------------------------------- checks

def _inputs(setup, B, L, HK, D, seed=0):
    gen = torch.Generator(device=setup.device).manual_seed(seed)

    def randn(heads):
        return torch.randn(B, L, heads, D, device=setup.device, dtype=setup.dtype, generator=gen)

    # A probe of the size a trained layer has (not zero: r = 0 is softmax attention).
    q, r, k, v = randn(setup.heads), 0.1 * randn(setup.heads), randn(HK), randn(HK)
    return (q, r, k, v), randn(setup.heads)


def _reference(q, r, k, v, window, softmax):
    from parallax.kernels import parallax_reference

    probe = torch.zeros_like(r) if softmax else r
    return parallax_reference(q.float(), probe.float(), k.float(), v.float(), causal=True, window_size=window)


def check(setup, baseline, D, L, HK, window):
    """Relative error of the output (and, unless forward only, gradients)
    against the float32 reference at batch 1 and min(L, CHECK_LEN) tokens
    (the autotuned config does not depend on the length, so this is the
    kernel that is timed); raises ValueError when over TOLERANCE. None if
    the implementation declines the shape."""
    inputs, _ = _inputs(setup, 1, min(L, CHECK_LEN), HK, D, seed=1)
    leaves = _leaves(inputs)
    ref_leaves = [x.detach().float().requires_grad_() for x in inputs]
    out = baseline.call(*[_to_layout(x, baseline.layout) for x in leaves], window)
    if out is None:
        return None
    out = _from_layout(out, baseline.layout)
    ref = _reference(*ref_leaves, window, baseline.softmax)
    pairs = [(out, ref)]
    if not baseline.forward_only:
        grad_out = torch.randn_like(ref)
        out.backward(grad_out.to(out.dtype))
        ref.backward(grad_out)
        used = [0, 2, 3] if baseline.softmax else [0, 1, 2, 3]
        # A gradient the implementation did not produce counts as zero.
        pairs += [(leaves[i].grad if leaves[i].grad is not None else torch.zeros_like(leaves[i]), ref_leaves[i].grad)
                  for i in used]
    worst = max(((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in pairs)
    if not worst <= TOLERANCE:
        raise ValueError(f"{baseline.name}: error {worst:.3g} (relative to the largest reference value) against "
                         f"the float32 reference exceeds {TOLERANCE}")
    return worst


# ---------------------------------------------------------------- timing

def time_pair(setup, baseline, inputs, grad_out, window):
    """(forward ms, forward + backward ms or None), inputs in the baseline's layout."""
    def forward():
        return baseline.call(*inputs, window)

    fwd = median_ms(forward, setup.device)
    if baseline.forward_only:
        return fwd, None

    def train_step():
        forward().backward(grad_out)

    return fwd, median_ms(train_step, setup.device)


@contextlib.contextmanager
def recorded_launches():
    """Inside the block, every Triton launch (autotuned or not) still runs and
    is also recorded as (kernel name, config label or None, replay): calling
    replay() launches it again with the same arguments and config."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches, depth = [], [0]
    saved = [(cls, cls.run) for cls in (Autotuner, JITFunction, InterpretedFunction)]

    def recording(original):
        def run(self, *args, **kwargs):
            depth[0] += 1  # an autotuner's launch runs its kernel's: record the outer one only
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                fn = getattr(self, "fn", None)
                name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "?")
                config = getattr(self, "best_config", None)
                launches.append((name, None if config is None else _config_label(config),
                                 lambda: original(self, *args, **kwargs)))
            return result
        return run

    for cls, original in saved:
        cls.run = recording(original)
    try:
        yield launches
    finally:
        for cls, original in saved:
            cls.run = original


def _config_label(config):
    tiles = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N") if k in config.kwargs)
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def launch_breakdown(setup, step):
    """{launch name: (config, median ms)} for one call of step(), each launch
    replayed and timed on its own (a name launched twice: summed)."""
    with recorded_launches() as launches:
        step()
    out = {}
    for name, config, replay in launches:
        label = LAUNCH_NAMES.get(name, name)
        config_before, ms_before = out.get(label, (None, 0.0))
        out[label] = (config or config_before, ms_before + median_ms(replay, setup.device))
    return out


def benchmark_rows(setup, baselines, notes):
    """One row per cell of the setup, yielded as soon as it is measured."""
    from parallax.kernels import parallax_attn

    def parallax(deterministic):
        def call(q, r, k, v, window):
            return parallax_attn(q, r, k, v, window_size=window, backend="triton", deterministic=deterministic)
        return Baseline("parallax", call)

    for D, L, B, HK, window in setup.cells():
        inputs, grad_out = _inputs(setup, B, L, HK, D)
        row = dict(D=D, L=L, B=B, HK=HK, window=window, launches={})
        for deterministic, key in ((True, "default"), (False, "fused")):
            impl = parallax(deterministic)
            # A wrong Parallax result ends the run (ValueError).
            check(setup, impl, D, L, HK, window)
            leaves = _leaves(inputs)
            row[key] = time_pair(setup, impl, leaves, grad_out, window)
            row["launches"][key] = launch_breakdown(setup, lambda: impl.call(*leaves, window).backward(grad_out))
        for baseline in baselines:
            try:
                err = check(setup, baseline, D, L, HK, window)
                theirs = _leaves(inputs, baseline.layout)
                row[baseline.name] = None if err is None else time_pair(
                    setup, baseline, theirs, _to_layout(grad_out, baseline.layout), window)
            except Exception as exc:  # a failing baseline loses its column, not the run
                notes.add(f"{baseline.name} skipped at D={D} T={L} HK={HK} window={window}: "
                          f"{type(exc).__name__}: {str(exc)[:160]}")
                row[baseline.name] = None
        yield row
        del inputs, grad_out
        if setup.device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- tables

def fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None else a / b


def markdown(setup, rows, baseline_names, notes, device_name):
    header = ["D", "T", "B", "HK", "window", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
              "fused fwd+bwd ms", "fused / default"]
    for name in baseline_names:
        header += [f"{name} fwd ms", f"fwd vs {name}", f"{name} fwd+bwd ms", f"fwd+bwd vs {name}"]
    comparison = []
    for row in rows:
        D, L, B, window = row["D"], row["L"], row["B"], row["window"]
        fwd, train = row["default"]
        fused_train = row["fused"][1]
        cells = [str(D), str(L), str(B), str(row["HK"]), str(window or "-"), fmt(fwd),
                 fmt(tflops(4, B, L, D, setup.heads, window, fwd), ".1f"), fmt(train),
                 fmt(tflops(12, B, L, D, setup.heads, window, train), ".1f"), fmt(fused_train),
                 fmt(ratio(fused_train, train), ".2f")]
        for name in baseline_names:
            theirs = row.get(name) or (None, None)
            cells += [fmt(theirs[0]), fmt(ratio(fwd, theirs[0]), ".2f"), fmt(theirs[1]),
                      fmt(ratio(train, theirs[1]), ".2f")]
        comparison.append(cells)

    launches = ["fwd", "row stats", "dK/dV", "dQ"]
    breakdown_header = ["D", "T", "HK", "window", "backward", "bwd ms"] + [
        f"{name} {what}" for name in launches for what in ("config", "ms")] + ["bwd TFLOP/s"]
    breakdown = []
    for row in rows:
        for key, label in (("default", "default (three launches)"), ("fused", "fused")):
            fwd, train = row[key]
            bwd = train - fwd
            measured = row["launches"][key]
            cells = [str(row["D"]), str(row["L"]), str(row["HK"]), str(row["window"] or "-"), label, fmt(bwd)]
            for name in launches:
                config, ms = measured.get(name, (None, None))
                cells += [config or ("-" if ms is None else ""), fmt(ms)]
            cells.append(fmt(tflops(8, row["B"], row["L"], row["D"], setup.heads, row["window"], bwd), ".1f"))
            breakdown.append(cells)

    lines = [
        f"# Training kernels on {device_name}",
        "",
        f"{str(setup.dtype).removeprefix('torch.')}, causal, B*T = {setup.tokens} tokens, {setup.heads} query heads, "
        f"HK KV heads. Times are medians in ms of {REPEATS} runs on a GPU (`benchmarks.timing.measure`, CUDA "
        "events, L2 flushed before each); TFLOP/s by the math doc's "
        "counts; 'x vs y' is Parallax time over y's time (default backward: three launches, deterministic). "
        "'fused' is the one-launch backward with float32 atomics (`deterministic=False`).",
        describe(torch.device(setup.device)),
        "",
        *markdown_table(header, comparison),
        "",
        "## Where the time goes",
        "",
        "Each Triton launch of one training step replayed and timed on its own, with the config its autotuner "
        "chose (BLOCK_M x BLOCK_N, warps, stages). 'bwd ms' is fwd+bwd minus fwd from the table above (it "
        "includes the fused backward's zeroing and casts of its float32 dQ/dR buffer); 'bwd TFLOP/s' counts "
        "8 L^2 D per (batch, head).",
        "",
        *markdown_table(breakdown_header, breakdown),
        "",
    ]
    lines += [f"- {note}" for note in sorted(notes)] + [""]
    return "\n".join(lines)


def _window(text):
    return None if text == "none" else int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 1k and 4k only")
    parser.add_argument("--head-dims", type=int, nargs="+", help="instead of 64 and 128")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="instead of 1k to 16k")
    parser.add_argument("--kv-heads", type=int, nargs="+", help="instead of 16 and 4")
    parser.add_argument("--windows", type=_window, nargs="+", help="'none' and / or window sizes (none, 1024)")
    parser.add_argument("--baselines", nargs="*", choices=list(LOADERS), default=list(LOADERS),
                        help="baselines to compare against (default: all that load)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: tiny shapes in the Triton interpreter, a smoke run")
    parser.add_argument("--tag", help="the table's name: train_kernels_<tag>_<device>.md")
    add_out_argument(parser, "train_kernels[_<tag>]_<device>.md")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train_kernels needs a CUDA GPU (it times Triton kernels against FlashAttention); "
                 "none found (--device cpu: a smoke run in the interpreter).")
    if args.device == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules:
            sys.exit("--device cpu needs TRITON_INTERPRET=1 set before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        setup, device_name = CPU, "CPU (Triton interpreter)"
    else:
        setup = replace(GPU, seq_lens=(1024, 4096)) if args.quick else GPU
        device_name = torch.cuda.get_device_name()
    chosen = dict(head_dims=args.head_dims, seq_lens=args.seq_lens, kv_heads=args.kv_heads, windows=args.windows)
    setup = replace(setup, **{k: tuple(v) for k, v in chosen.items() if v})
    notes, baselines = set(), []
    for name in args.baselines if args.device == "cuda" else []:
        baseline, note = LOADERS[name]()
        notes.add(note)
        if baseline is not None:
            baselines.append(baseline)
    print("\n".join(sorted(notes)))
    prefix = "train_kernels" + (f"_{args.tag}" if args.tag else "")
    path = table_path(args.out, table_name(prefix, torch.device(setup.device)))
    rows = []
    for row in benchmark_rows(setup, baselines, notes):
        rows.append(row)
        # Rewritten after every row: a run stopped by its time limit keeps what it measured.
        save(path, markdown(setup, rows, [b.name for b in baselines], notes, device_name).splitlines())
    print(path.read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
