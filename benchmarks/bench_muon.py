"""Benchmark orthogonalize methods and Muon.step against torch.optim.Muon.step.

Usage (from the repo root, or anywhere once parallax is installed):
    python -m benchmarks.bench_muon [--quick] [--device cpu|cuda] [--repeats N] [--threads N]
Writes the markdown table to benchmarks/results/muon_<device>.md and prints it.
GPU: bf16 at the full shapes, timed with CUDA events. CPU: float32; --quick
quarters every orthogonalize shape and keeps 2 of the 12 GPT layers so the
run ends in a minute or two on a small machine.
"""

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from parallax.optim import Muon, orthogonalize

ORTHOGONALIZE_SHAPES = [(1024, 4096), (2048, 8192), (4096, 4096), (768, 3072)]
METHODS = ["newton_schulz", "gram_newton_schulz", "polar_express"]
# Matrices of one layer of a 125M GPT (width 768): fused qkv, attention
# projection, MLP up and down.
GPT_LAYER_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
GPT_LAYERS = 12


def time_ms(fn, device):
    """Wall time of one fn() call in milliseconds (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def interleaved_timings(fns, device, repeats):
    """(median ms, best ms) of each fn; the candidates take turns within every
    repeat so that load from other processes hits them alike, and the best run
    is reported too because on a shared machine it is the least disturbed one."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, device))
    return {name: (statistics.median(values), min(values)) for name, values in times.items()}


def orthogonalize_rows(device, dtype, scale, repeats):
    rows = []
    for rows_count, cols in ORTHOGONALIZE_SHAPES:
        shape = (rows_count // scale, cols // scale)
        G = torch.randn(shape, device=device, dtype=dtype)
        fns = {m: (lambda m=m: orthogonalize(G, m, 5, compute_dtype=dtype)) for m in METHODS}
        times = interleaved_timings(fns, device, repeats)
        rows.append((shape, times))
    return rows


def step_times(device, layers, repeats):
    """Median ms of one optimizer step over the GPT matrices, per optimizer."""
    torch.manual_seed(0)
    shapes = GPT_LAYER_SHAPES * layers
    builders = {
        "torch.optim.Muon": lambda params: torch.optim.Muon(params, lr=0.02),
        "parallax Muon (newton_schulz)": lambda params: Muon(params, lr=0.02),
        "parallax Muon (gram_newton_schulz)": lambda params: Muon(params, lr=0.02, orthogonalizer="gram_newton_schulz"),
    }
    steps = {}
    for name, build in builders.items():
        params = [nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        steps[name] = build(params).step
    return interleaved_timings(steps, device, repeats)


def markdown(device, args, ortho_rows, steps, layers, dtype):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"# Muon benchmark ({device.type})",
        "",
        f"Device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"quick={args.quick}; {args.repeats} interleaved runs after one warm-up; times are medians.",
        "",
        f"## orthogonalize, 5 steps, {str(dtype).replace('torch.', '')}",
        "",
        "| shape | aspect | newton_schulz ms | gram_newton_schulz ms | polar_express ms "
        "| NS / Gram (median) | NS / Gram (best) |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape, t in ortho_rows:
        aspect = max(shape) / min(shape)
        ns, gram, pe = t["newton_schulz"], t["gram_newton_schulz"], t["polar_express"]
        lines.append(
            f"| {shape[0]}x{shape[1]} | {aspect:.0f} | {ns[0]:.1f} | {gram[0]:.1f} | {pe[0]:.1f} "
            f"| {ns[0] / gram[0]:.2f}x | {ns[1] / gram[1]:.2f}x |"
        )
    torch_median, torch_best = steps["torch.optim.Muon"]
    lines += [
        "",
        f"## optimizer step on a 125M GPT's matrices ({layers} of {GPT_LAYERS} layers: "
        "2304x768, 768x768, 3072x768, 768x3072 each; bf16 Newton-Schulz as torch)",
        "",
        "| optimizer | median ms | best ms | torch / this (median) | torch / this (best) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {median:.1f} | {best:.1f} | {torch_median / median:.2f}x | {torch_best / best:.2f}x |"
        for name, (median, best) in steps.items()
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and 2 GPT layers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (on a shared machine 1 avoids OpenMP stalls behind other processes)")
    parser.add_argument("--out", type=Path, default=None, help="markdown path (default benchmarks/results/muon_<device>.md)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = 4 if args.quick else 1
    layers = 2 if args.quick else GPT_LAYERS

    table = markdown(
        device, args, orthogonalize_rows(device, dtype, scale, args.repeats), step_times(device, layers, args.repeats), layers, dtype
    )
    out = args.out or Path(__file__).parent / "results" / f"muon_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
