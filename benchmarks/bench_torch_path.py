"""The torch path of `parallax_attn` on CPU against SDPA and a naive dense Parallax.

Usage (from the repo root):
    python -m benchmarks.bench_torch_path [--repeats N] [--threads N] [--seq-lens 128,512,...]
Forward and forward+backward, float32, causal, B * T = --tokens tokens (8192),
H = 4 heads of D = 32 (the training preset's attention), T = 128 .. 8192.
Three implementations, timed in turns within every repeat by `benchmarks.timing.measure` (medians reported):
`parallax_attn` (backend="torch"), `softmax_attention` (PyTorch SDPA: softmax
attention, the speed to match) and a naive dense autograd implementation of the
same Parallax formula (skipped where its score tensors would not fit
--naive-max-gb). Before timing, each shape's outputs and gradients are checked
against the naive implementation (or, where it does not fit, the forward of
the last rows against `parallax_reference`). Peak memory is the resident-set
high-water mark (Linux VmHWM, reset once the inputs exist) of one
forward+backward in a fresh subprocess, above the inputs. Writes the markdown
table torch_path_cpu.md to out/bench/ (or --out) and prints it.
"""

import argparse
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.environment import add_out_argument, markdown_table, save, table_path
from benchmarks.timing import WARMUP_CALLS, measure
from parallax import parallax_attn, parallax_reference, softmax_attention

HEADS, HEAD_DIM = 4, 32
IMPLS = ("parallax", "sdpa", "naive", "jvp")


def naive_parallax(q, r, k, v):
    """Parallax attention as plain dense autograd ops in [B, H, T, D] layout."""
    q, r, k, v = (x.transpose(1, 2) for x in (q, r, k, v))
    T, S = q.shape[2], k.shape[2]
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    s1 = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s1.masked_fill(~visible, float("-inf")), dim=-1)
    s2 = r @ k.transpose(-1, -2)
    sbar = (p * s2).sum(-1, keepdim=True)
    return ((p * (1 + sbar - s2)) @ v).transpose(1, 2)


def jvp_parallax(q, r, k, v):
    """Parallax from the identity o = A(q) - dA(q)[r / scale]: SDPA (math backend:
    the fused CPU kernel has no forward-mode derivative) and its jvp along r / scale."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, r, k, v = (x.transpose(1, 2) for x in (q, r, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        attend = lambda x: F.scaled_dot_product_attention(x, k, v, is_causal=True)  # noqa: E731
        a, da = torch.func.jvp(attend, (q,), (r / q.shape[-1] ** -0.5,))
    return (a - da).transpose(1, 2)


def naive_bytes(B, T):
    """Rough peak of `naive_parallax` forward+backward: about eight float32 [B, H, T, T] tensors."""
    return 8 * B * HEADS * T * T * 4


def make_inputs(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, r, k, v = (torch.randn(B, T, HEADS, HEAD_DIM, generator=g) for _ in range(4))
    return [x.requires_grad_(True) for x in (q, 0.5 * r, k, v)]


def run(impl, q, r, k, v):
    """The impl's output and the inputs it is differentiable in."""
    if impl == "parallax":
        return parallax_attn(q, r, k, v, backend="torch"), (q, r, k, v)
    if impl == "sdpa":
        return softmax_attention(q, k, v), (q, k, v)
    if impl == "jvp":
        return jvp_parallax(q, r, k, v), (q, r, k, v)
    return naive_parallax(q, r, k, v), (q, r, k, v)


def check(B, T, impls):
    """Raise if a Parallax implementation disagrees with the naive one (or, where
    naive is not run, parallax_attn's last rows with the reference)."""
    q, r, k, v = make_inputs(B, T, seed=1)
    do = torch.randn(B, T, HEADS, HEAD_DIM)
    names = ("o", "dq", "dr", "dk", "dv")
    if "naive" not in impls:  # causal is end-aligned: the last rows alone against all keys are exact
        out, leaves = run("parallax", q, r, k, v)
        grads = torch.autograd.grad(out, leaves, do)
        rows = slice(T - 64, T)
        with torch.no_grad():
            pairs = [("parallax", "o", out[:, rows], parallax_reference(q[:, rows], r[:, rows], k, v))]
        if not all(torch.isfinite(g).all() for g in grads):
            raise AssertionError(f"T={T}: parallax gradients are not finite")
    else:
        ref, leaves = run("naive", q, r, k, v)
        expected = (ref, *torch.autograd.grad(ref, leaves, do))
        pairs = []
        for impl in ("parallax", "jvp"):
            if impl in impls:
                out, _ = run(impl, q, r, k, v)
                pairs += zip([impl] * 5, names, (out, *torch.autograd.grad(out, leaves, do)), expected)
    for impl, name, got, exp in pairs:
        err = (got - exp).abs().max().item() / max(1.0, exp.abs().max().item())
        if err > 1e-4:
            raise AssertionError(f"T={T}: {impl} {name} differs from the check by {err:.2e} (relative)")


def time_case(B, T, impls, repeats):
    """Median forward and forward+backward ms of each impl, taking turns every repeat."""
    inputs = make_inputs(B, T)
    do = torch.randn(B, T, HEADS, HEAD_DIM)

    def forward(impl):
        return lambda: run(impl, *inputs)

    def forward_backward(impl):
        def step():
            out, leaves = run(impl, *inputs)
            torch.autograd.grad(out, leaves, do)
        return step

    fns = {(impl, which): make(impl)
           for impl in impls for which, make in (("fwd", forward), ("both", forward_backward))}
    times = measure(fns, torch.device("cpu"), repeats)
    return {i: (times[i, "fwd"].median, times[i, "both"].median) for i in impls}


def peak_mb(impl, B, T, threads):
    """RSS high-water mark (MB) of one forward+backward above the inputs, in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.bench_torch_path", "--peak-of", impl, str(B), str(T)]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=True)
    return float(done.stdout.split()[-1])


def status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_peak(impl, B, T):
    """Print the MB the RSS rose above its level with the inputs made."""
    out, leaves = run(impl, *make_inputs(1, 64))  # a small warm-up pages in the code it runs
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    inputs = make_inputs(B, T)
    do = torch.randn(B, T, HEADS, HEAD_DIM)
    base = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
    out, leaves = run(impl, *inputs)
    torch.autograd.grad(out, leaves, do)
    print((status_kb("VmHWM") - base) / 1024)


def machine():
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def load():
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(rows, args, load_before, load_after):
    shown = IMPLS[:3 + args.jvp]
    lines = [
        "# The torch path on CPU: parallax_attn vs SDPA vs naive dense",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. {machine()}; torch {torch.__version__}; "
        f"Python {platform.python_version()}; {torch.get_num_threads()} threads; "
        f"load average (1/5/15 min) {load_before} before, {load_after} after.",
        "",
        f"float32, causal, B * T = {args.tokens}, H = {HEADS}, D = {HEAD_DIM}; {args.repeats} interleaved "
        f"repeats after {WARMUP_CALLS} warm-up call(s), medians; forward under autograd (as in training), "
        "forward+backward timed as a separate call. Peak: RSS high-water "
        "mark of one forward+backward in a fresh process, above the inputs. `-`: naive not run (its "
        f"[B, H, T, T] tensors exceed {args.naive_max_gb} GB)."
        + (" jvp: o = A(q) - dA(q)[r / scale] with torch.func.jvp through SDPA's math backend." if args.jvp else ""),
        "",
    ]
    header = (["T", "B"] + [f"{i} fwd ms" for i in shown] + [f"{i} fwd+bwd ms" for i in shown]
              + ["parallax / SDPA fwd+bwd", "parallax / naive fwd+bwd", "peak MB " + " / ".join(shown)])
    cells = []
    for T, B, times, peaks in rows:
        def ms(impl, which):
            return f"{times[impl][which]:.1f}" if impl in times else "-"

        vs_naive = f"{times['parallax'][1] / times['naive'][1]:.2f}x" if "naive" in times else "-"
        cells.append([T, B, *(ms(i, 0) for i in shown), *(ms(i, 1) for i in shown),
                      f"{times['parallax'][1] / times['sdpa'][1]:.2f}x", vs_naive,
                      " / ".join(f"{peaks[i]:.0f}" if i in peaks else "-" for i in shown)])
    return "\n".join(lines + markdown_table(header, cells)) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="B * T of every row")
    parser.add_argument("--seq-lens", default="128,512,2048,8192")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--naive-max-gb", type=float, default=3.0)
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--jvp", action="store_true",
                        help="also time the identity o = A(q) - dA(q)[r / scale] through SDPA's jvp (where naive fits)")
    add_out_argument(parser, "torch_path_cpu.md")
    parser.add_argument("--peak-of", nargs=3, metavar=("IMPL", "B", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.peak_of:
        impl, B, T = args.peak_of
        measure_peak(impl, int(B), int(T))
        return
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    if any(t < 1 or args.tokens % t for t in seq_lens):
        parser.error(f"every --seq-lens entry must divide --tokens ({args.tokens})")

    load_before = load()
    rows = []
    for T in seq_lens:
        B = args.tokens // T
        fits_naive = naive_bytes(B, T) <= args.naive_max_gb * 2**30
        impls = IMPLS[:3 + args.jvp] if fits_naive else IMPLS[:2]
        check(B, T, impls)
        times = time_case(B, T, impls, args.repeats)
        peaks = {} if args.no_peak else {i: peak_mb(i, B, T, args.threads) for i in impls}
        rows.append((T, B, times, peaks))
        print(f"T={T}: " + ", ".join(f"{i} {f:.1f} / {fb:.1f} ms" for i, (f, fb) in times.items()), flush=True)
    table = markdown(rows, args, load_before, load())
    save(table_path(args.out, "torch_path_cpu.md"), table.splitlines())
    print(table)


if __name__ == "__main__":
    main()
