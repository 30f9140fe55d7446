"""Benchmark orthogonalize methods and Muon.step against torch.optim.Muon.step.

Usage (from the repo root, or anywhere once parallax is installed):
    python -m benchmarks.bench_muon [--quick] [--device cpu|cuda] [--repeats N] [--threads N]
Writes the markdown table to benchmarks/results/muon_<device>.md and prints it.
GPU: bf16 at the full shapes, timed with CUDA events. CPU: float32; --quick
quarters every orthogonalize shape and keeps 2 of the 12 GPT layers so the
run ends in a minute or two on a small machine; on CPU it quarters the GPT
matrices too (torch.optim.Muon iterates in bf16, which CPUs without bf16
matrix units multiply ~6x slower than float32, and addmm ~12x). Every optimizer is checked
against torch.optim.Muon before it is timed. --ddp adds the data-parallel
path: two gloo ranks on CPU (one thread each) step the same matrices with and
without sharing the orthogonalization.
"""

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
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


def gpt_matrices(device, layers, scale=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(rows // scale, cols // scale) for rows, cols in GPT_LAYER_SHAPES * layers]
    params = [nn.Parameter((torch.randn(s, generator=generator) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    return params


def check_against_torch(build, device, layers, scale):
    """One step of `build` on the GPT matrices equals torch.optim.Muon's (bit for bit
    where the iteration is torch's; close for the other orthogonalizers)."""
    ours, theirs = gpt_matrices(device, layers, scale), gpt_matrices(device, layers, scale)
    build(ours).step()
    torch.optim.Muon(theirs, lr=0.02).step()
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


def step_times(device, layers, scale, repeats):
    """Median ms of one optimizer step over the GPT matrices, per optimizer."""
    builders = {
        "torch.optim.Muon": lambda params: torch.optim.Muon(params, lr=0.02),
        "parallax Muon (newton_schulz)": lambda params: Muon(params, lr=0.02),
        "parallax Muon (gram_newton_schulz)": lambda params: Muon(params, lr=0.02, orthogonalizer="gram_newton_schulz"),
    }
    if device.type == "cuda":
        builders["parallax Muon (newton_schulz, compiled)"] = lambda params: Muon(params, lr=0.02, compile=True)
    # Correctness first: torch's iteration must be reproduced exactly, Gram NS within its rounding.
    error = check_against_torch(builders["parallax Muon (newton_schulz)"], device, layers, scale)
    if error != 0.0:
        raise AssertionError(f"parallax Muon differs from torch.optim.Muon by {error}")
    error = check_against_torch(builders["parallax Muon (gram_newton_schulz)"], device, layers, scale)
    if error > 0.02 * 0.05:  # a few percent of one lr=0.02 step
        raise AssertionError(f"Gram Newton-Schulz Muon differs from torch.optim.Muon by {error}")
    steps = {name: build(gpt_matrices(device, layers, scale)).step for name, build in builders.items()}
    return interleaved_timings(steps, device, repeats)


def _ddp_worker(rank, world_size, port, layers, scale, repeats, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        device = torch.device("cpu")
        alone = Muon(gpt_matrices(device, layers, scale), lr=0.02)
        shared = Muon(gpt_matrices(device, layers, scale), lr=0.02, process_group=dist.group.WORLD)
        alone.step()
        shared.step()
        # Sharing must not change the result: bf16 directions are exact on the wire.
        same = all(torch.equal(a, b) for a, b in zip(alone.param_groups[0]["params"], shared.param_groups[0]["params"]))
        timings = {"1 rank does all (no process_group)": [], "2 ranks share (process_group)": []}
        for _ in range(repeats):
            for name, optimizer in zip(timings, (alone, shared)):
                dist.barrier()
                begin = time.perf_counter()
                optimizer.step()
                dist.barrier()
                timings[name].append((time.perf_counter() - begin) * 1e3)
        if rank == 0:
            torch.save({"same": same, "timings": timings}, out)
    finally:
        dist.destroy_process_group()


def ddp_times(layers, scale, repeats):
    """(median ms, best ms) of Muon.step on 2 gloo ranks with and without sharing."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        mp.start_processes(_ddp_worker, args=(2, port, layers, scale, repeats, out), nprocs=2, start_method="fork")
        result = torch.load(out)
    if not result["same"]:
        raise AssertionError("sharing the orthogonalization across ranks changed the parameters")
    return {name: (statistics.median(v), min(v)) for name, v in result["timings"].items()}


def markdown(device, args, ortho_rows, steps, layers, scale, dtype, ddp=None):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"# Muon benchmark ({device.type})",
        "",
        f"Device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"quick={args.quick}; {args.repeats} interleaved runs after one warm-up; times are medians.",
        f"Load average (1 min) at start / end: {args.load_before:.1f} / {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores (others' processes share the machine: compare ratios, not times).",
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
        f"{', '.join(f'{r // scale}x{c // scale}' for r, c in GPT_LAYER_SHAPES)} each; bf16 Newton-Schulz as torch)",
        "",
        "| optimizer | median ms | best ms | torch / this (median) | torch / this (best) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {median:.1f} | {best:.1f} | {torch_median / median:.2f}x | {torch_best / best:.2f}x |"
        for name, (median, best) in steps.items()
    ]
    if ddp:
        alone_median, alone_best = next(iter(ddp.values()))
        lines += [
            "",
            f"## data parallel: Muon.step on 2 gloo ranks, 1 thread each ({layers} GPT layers, bf16 directions on the wire)",
            "",
            "| path | median ms | best ms | speed-up (median) | speed-up (best) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {median:.1f} | {best:.1f} | {alone_median / median:.2f}x | {alone_best / best:.2f}x |"
            for name, (median, best) in ddp.items()
        ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and 2 GPT layers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (on a shared machine 1 avoids OpenMP stalls behind other processes)")
    parser.add_argument("--ddp", action="store_true", help="also time the data-parallel path (2 gloo ranks, CPU)")
    parser.add_argument("--out", type=Path, default=None, help="markdown path (default benchmarks/results/muon_<device>.md)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    args.load_before = os.getloadavg()[0]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = 4 if args.quick else 1
    layers = 2 if args.quick else GPT_LAYERS
    matrix_scale = scale if device.type == "cpu" else 1

    table = markdown(
        device, args, orthogonalize_rows(device, dtype, scale, args.repeats), step_times(device, layers, matrix_scale, args.repeats),
        layers, matrix_scale, dtype, ddp_times(layers, matrix_scale, args.repeats) if args.ddp else None,
    )
    out = args.out or Path(__file__).parent / "results" / f"muon_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
