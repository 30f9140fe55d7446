"""Training-kernel benchmark: Parallax (Triton) vs fla's parallel_parallax vs FlashAttention 2.

Usage (CUDA only, from the repo root):
    python -m benchmarks.bench_train_kernels [--repeats N] [--quick]
Times forward and forward+backward, bf16, causal, B * T = 16k tokens, H = 16,
D = 64 and 128, T = 1k .. 16k, each also with a window of 1024 (the FA2 column
stays full causal: SDPA has no window). TFLOP/s use the counts of
docs/parallax-math.md: per (batch, head), causal, Parallax does
4 L^2 D forward + 8 L^2 D backward, softmax 2 L^2 D + 5 L^2 D; a window W
scales the visible pairs from L^2 / 2 to L W - W^2 / 2. Also measures the peak
memory of the GQA backward against HQ == HK. Prints markdown and writes it to
benchmarks/results/train_kernels_<gpu-name>.md. fla (`pip install fla-core`)
is optional: without it its column stays blank.
"""

import argparse
import inspect
import re
import statistics
import sys
from pathlib import Path

import torch

TOKENS = 16 * 1024
HEADS = 16
HEAD_DIMS = (64, 128)
SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
WINDOW = 1024


def time_ms(fn, repeats):
    """Median of `repeats` CUDA-event timings after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def visible_pairs(L, window):
    return L * L / 2 if window is None else L * window - window * window / 2


def tflops(causal_coefficient, B, L, D, window, ms):
    """TFLOP/s of `causal_coefficient * L^2 D` FLOPs per (batch, head) (the
    math doc's causal count), rescaled to the pairs a window leaves visible."""
    return causal_coefficient * 2 * visible_pairs(L, window) * D * B * HEADS / (ms * 1e9)


def load_fla():
    """fla's kernel adapted to (q, r, k, v, window) -> o, or None with the reason."""
    try:
        from fla.ops.parallax import parallel_parallax
    except ImportError as err:
        return None, f"fla not installed ({err})"
    params = inspect.signature(parallel_parallax).parameters
    probe = next((name for name in ("r", "p", "probe") if name in params), None)
    if probe is None or not {"q", "k", "v"} <= set(params):
        return None, f"fla signature not understood: parallel_parallax{inspect.signature(parallel_parallax)}"

    def call(q, r, k, v, window):
        kwargs = {"q": q, probe: r, "k": k, "v": v}
        if "head_first" in params:
            kwargs["head_first"] = False
        if "window_size" in params and window is not None:
            kwargs["window_size"] = window
        elif window is not None:
            return None
        out = parallel_parallax(**kwargs)
        return out[0] if isinstance(out, tuple) else out

    return call, f"fla parallel_parallax{inspect.signature(parallel_parallax)}"


def flash_attention_2(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def measure(fn, inputs, grad_out, repeats):
    """(forward ms, forward+backward ms); None when fn declines the shape."""
    if fn(*inputs) is None:
        return None, None
    forward = time_ms(lambda: fn(*inputs), repeats)

    def train_step():
        for x in inputs:
            x.grad = None
        fn(*inputs).backward(grad_out)

    return forward, time_ms(train_step, repeats)


def benchmark_rows(fla, repeats, seq_lens):
    from parallax.kernels import parallax_attn

    rows = []
    for D in HEAD_DIMS:
        for L in seq_lens:
            B = max(1, TOKENS // L)
            q, r, k, v = (torch.randn(B, L, HEADS, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                          for _ in range(4))
            grad_out = torch.randn_like(q)
            fa2 = measure(lambda q, k, v: flash_attention_2(q, k, v), (q, k, v), grad_out, repeats)
            for window in (None, WINDOW):
                if window is not None and window >= L:
                    continue
                ours = measure(lambda q, r, k, v: parallax_attn(q, r, k, v, window_size=window, backend="triton"),
                               (q, r, k, v), grad_out, repeats)
                theirs = (None, None) if fla is None else measure(
                    lambda q, r, k, v: fla(q, r, k, v, window), (q, r, k, v), grad_out, repeats)
                rows.append(dict(D=D, L=L, B=B, window=window, ours=ours, fla=theirs, fa2=fa2))
            del q, r, k, v, grad_out
            torch.cuda.empty_cache()
    return rows


def backward_peak_bytes(HQ, HK, B=4, L=4096, D=128):
    """Peak memory the backward adds on top of inputs, forward output and saved state."""
    from parallax.kernels import parallax_attn

    q, r = (torch.randn(B, L, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    k, v = (torch.randn(B, L, HK, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = parallax_attn(q, r, k, v, backend="triton")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)  # autotune outside the measurement
    for x in (q, r, k, v):
        x.grad = None
    out = parallax_attn(q, r, k, v, backend="triton")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(grad_out)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def fmt(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None else a / b


def markdown(rows, fla_note, memory):
    gpu = torch.cuda.get_device_name()
    lines = [
        f"# Training kernels on {gpu}",
        "",
        f"bf16, causal, B*T = {TOKENS} tokens, H = {HEADS}. Times are CUDA-event medians in ms; "
        "TFLOP/s by the math doc's counts; x-ratios are Parallax time over the other's time. "
        "FA2 = SDPA flash backend, always full causal (no window).",
        f"torch {torch.__version__}; {fla_note}",
        "",
        "| D | T | B | window | fwd ms | fwd TFLOP/s | fwd vs FA2 | fwd vs fla | fwd+bwd ms | fwd+bwd TFLOP/s "
        "| fwd+bwd vs FA2 | fwd+bwd vs fla | fla fwd ms | fla fwd+bwd ms | FA2 fwd ms | FA2 fwd+bwd ms |",
        "|---" * 16 + "|",
    ]
    for row in rows:
        D, L, B, window = row["D"], row["L"], row["B"], row["window"]
        (fwd, train), (fla_fwd, fla_train), (fa_fwd, fa_train) = row["ours"], row["fla"], row["fa2"]
        lines.append("| " + " | ".join([
            str(D), str(L), str(B), str(window or "-"),
            fmt(fwd), fmt(fwd and tflops(4, B, L, D, window, fwd), ".1f"),
            fmt(ratio(fwd, fa_fwd), ".2f"), fmt(ratio(fwd, fla_fwd), ".2f"),
            fmt(train), fmt(train and tflops(12, B, L, D, window, train), ".1f"),
            fmt(ratio(train, fa_train), ".2f"), fmt(ratio(train, fla_train), ".2f"),
            fmt(fla_fwd), fmt(fla_train), fmt(fa_fwd), fmt(fa_train),
        ]) + " |")
    gqa, mha = memory
    lines += [
        "",
        "Peak memory added by the backward (B=4, T=4096, D=128, bf16): "
        f"HQ=16, HK=4 (GQA): {gqa / 2**20:.1f} MiB; HQ=HK=16: {mha / 2**20:.1f} MiB.",
        "",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="T = 1k and 4k only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train_kernels needs a CUDA GPU (Triton kernels vs FlashAttention 2); none found.")
    fla, fla_note = load_fla()
    print(fla_note)
    seq_lens = (1024, 4096) if args.quick else SEQ_LENS
    rows = benchmark_rows(fla, args.repeats, seq_lens)
    memory = (backward_peak_bytes(16, 4), backward_peak_bytes(16, 16))
    table = markdown(rows, fla_note, memory)
    print(table)
    name = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower()
    path = Path(__file__).resolve().parent / "results" / f"train_kernels_{name}.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
