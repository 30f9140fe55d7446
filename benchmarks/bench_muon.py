"""Benchmark orthogonalize methods and Muon.step against torch.optim.Muon.step.

Usage (from the repo root, or anywhere once parallax is installed):
    python -m benchmarks.bench_muon [--quick] [--device cpu|cuda] [--repeats N] [--threads N]
Writes the markdown table muon_<device>.md to out/bench/ (or --out) and prints it.
Timed by `benchmarks.timing.measure`. GPU: bf16 at the full shapes. CPU: float32; --quick
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
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.environment import add_out_argument, markdown_table, save, table_path
from benchmarks.timing import WARMUP_CALLS, Timing, measure
from parallax.optim import Muon, orthogonalize

ORTHOGONALIZE_SHAPES = [(1024, 4096), (2048, 8192), (4096, 4096), (768, 3072)]
METHODS = ["newton_schulz", "gram_newton_schulz", "polar_express"]
# Matrices of one layer of a 125M GPT (width 768): fused qkv, attention
# projection, MLP up and down.
GPT_LAYER_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
GPT_LAYERS = 12


def orthogonalize_rows(device, dtype, scale, repeats):
    rows = []
    for rows_count, cols in ORTHOGONALIZE_SHAPES:
        shape = (rows_count // scale, cols // scale)
        G = torch.randn(shape, device=device, dtype=dtype)
        fns = {m: (lambda m=m: orthogonalize(G, m, 5, compute_dtype=dtype)) for m in METHODS}
        rows.append((shape, measure(fns, device, repeats)))
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
    """Timing of one optimizer step over the GPT matrices, per optimizer."""
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
    return measure(steps, device, repeats)


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
        # Every rank makes the same calls, so the barriers pair up; a run ends when the slower rank is done.
        steps = {"1 rank does all (no process_group)": lambda: (alone.step(), dist.barrier()),
                 "2 ranks share (process_group)": lambda: (shared.step(), dist.barrier())}
        timings = measure(steps, device, repeats, before_each=dist.barrier)
        if rank == 0:
            torch.save({"same": same, "runs": {name: t.runs for name, t in timings.items()}}, out)
    finally:
        dist.destroy_process_group()


def ddp_times(layers, scale, repeats):
    """Timing of Muon.step on 2 gloo ranks with and without sharing."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        mp.start_processes(_ddp_worker, args=(2, port, layers, scale, repeats, out), nprocs=2, start_method="fork")
        result = torch.load(out)
    if not result["same"]:
        raise AssertionError("sharing the orthogonalization across ranks changed the parameters")
    return {name: Timing(runs) for name, runs in result["runs"].items()}


def markdown(device, args, ortho_rows, steps, layers, scale, dtype, ddp=None):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"# Muon benchmark ({device.type})",
        "",
        f"Device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"quick={args.quick}; {args.repeats} interleaved runs after {WARMUP_CALLS} warm-up call(s); times are medians "
        "(best: the least disturbed run).",
        f"Load average (1 min) at start / end: {args.load_before:.1f} / {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores (others' processes share the machine: compare ratios, not times).",
        "",
        f"## orthogonalize, 5 steps, {str(dtype).replace('torch.', '')}",
        "",
    ]
    rows = []
    for shape, t in ortho_rows:
        ns, gram, pe = t["newton_schulz"], t["gram_newton_schulz"], t["polar_express"]
        rows.append([f"{shape[0]}x{shape[1]}", f"{max(shape) / min(shape):.0f}", f"{ns.median:.1f}",
                     f"{gram.median:.1f}", f"{pe.median:.1f}", f"{ns.median / gram.median:.2f}x",
                     f"{ns.best / gram.best:.2f}x"])
    lines += markdown_table(["shape", "aspect", "newton_schulz ms", "gram_newton_schulz ms", "polar_express ms",
                             "NS / Gram (median)", "NS / Gram (best)"], rows)
    lines += [
        "",
        f"## optimizer step on a 125M GPT's matrices ({layers} of {GPT_LAYERS} layers: "
        f"{', '.join(f'{r // scale}x{c // scale}' for r, c in GPT_LAYER_SHAPES)} each; bf16 Newton-Schulz as torch)",
        "",
        *speedup_table("optimizer", steps, steps["torch.optim.Muon"], "torch / this"),
    ]
    if ddp:
        lines += [
            "",
            f"## data parallel: Muon.step on 2 gloo ranks, 1 thread each ({layers} GPT layers, bf16 directions on the wire)",
            "",
            *speedup_table("path", ddp, next(iter(ddp.values())), "speed-up"),
        ]
    return "\n".join(lines) + "\n"


def speedup_table(what: str, timings: dict, base: Timing, ratio: str) -> list[str]:
    """Median and best ms of each, and base's time over each's."""
    rows = [[name, f"{t.median:.1f}", f"{t.best:.1f}", f"{base.median / t.median:.2f}x", f"{base.best / t.best:.2f}x"]
            for name, t in timings.items()]
    return markdown_table([what, "median ms", "best ms", f"{ratio} (median)", f"{ratio} (best)"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and 2 GPT layers")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (on a shared machine 1 avoids OpenMP stalls behind other processes)")
    parser.add_argument("--ddp", action="store_true", help="also time the data-parallel path (2 gloo ranks, CPU)")
    add_out_argument(parser, "muon_<device>.md")
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
    save(table_path(args.out, f"muon_{device.type}.md"), table.splitlines())
    print(table)


if __name__ == "__main__":
    main()
