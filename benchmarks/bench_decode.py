"""Decode-step latency: Parallax's split-KV kernel against softmax decode kernels.

Each kernel runs one decode step (append one token, attend to the L cached
keys) captured in a CUDA graph; the table gives the median replay time with
the L2 cache flushed before each replay, and the bandwidth it implies
(K and V cache bytes read) as a fraction of a device-to-device copy measured
in the same run. bf16, D=128, HQ:HK = 8:8 and 32:8, B in {1, 32}.

    python benchmarks/bench_decode.py [--lengths 512 1024 ...] [--replays 200]

CUDA only. Competitors are optional and found at run time: FlashAttention 2
(`flash_attn`, else PyTorch SDPA's flash backend on the cache slice),
FlashAttention 3 (the fa3-fwd wheel's `flash_attn_with_kvcache`) and fla's
Parallax decode (`fla.ops.parallax`); a missing one leaves its column blank.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import re
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from parallax import parallax_attn_with_kvcache  # noqa: E402

HEAD_DIM = 128
DTYPE = torch.bfloat16
HEADS = ((8, 8), (32, 8))  # (HQ, HK)
BATCHES = (1, 32)
LENGTHS = (512, 1024, 4096, 16384, 65536)
L2_FLUSH_BYTES = 256 << 20
RESULTS = Path(__file__).parent / "results"


def copy_bandwidth(replays: int) -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_graph(lambda: dst.copy_(src), replays, flush=None)
    return 2 * src.numel() / seconds


def time_graph(step, replays: int, flush: torch.Tensor | None) -> float:
    """Median seconds of one replay of `step` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and autotune outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(replays):
        if flush is not None:
            flush.zero_()  # a real step follows other layers: the cache is not in L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def find_fa2():
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None, "SDPA flash (no append)"
    return flash_attn_with_kvcache, "flash_attn_with_kvcache"


def find_fa3():
    """The fa3-fwd wheel's module that exports `flash_attn_with_kvcache`."""
    candidates = ["flash_attn_interface", "flash_attn_3.flash_attn_interface"]
    for module, dists in importlib.metadata.packages_distributions().items():
        if any("fa3" in d.lower() or "flash_attn_3" in d.lower().replace("-", "_") for d in dists):
            candidates += [module, f"{module}.flash_attn_interface"]
    for name in candidates:
        try:
            fn = getattr(importlib.import_module(name), "flash_attn_with_kvcache", None)
        except ImportError:
            continue
        if fn is not None:
            return fn, name
    return None, "not installed"


def find_fla_decode():
    """fla's Parallax one-step decode: a function of `fla.ops.parallax` whose
    name says decode, with the parameters it needs mapped by name."""
    try:
        module = importlib.import_module("fla.ops.parallax")
    except ImportError:
        return None, "not installed"
    names = [n for n in dir(module) if callable(getattr(module, n)) and re.search("decode|kvcache|step", n)]
    if not names:
        public = ", ".join(n for n in dir(module) if not n.startswith("_"))
        return None, f"no decode function in fla.ops.parallax ({public})"
    return getattr(module, names[0]), f"fla.ops.parallax.{names[0]} (no append)"


def fla_call(fn, q, r, k_cache, v_cache, seqlens, length):
    """Bind by parameter name; fla decodes against the whole [B, L] cache slice."""
    available = {
        "q": q, "r": r, "probe": r, "k": k_cache[:, :length], "v": v_cache[:, :length],
        "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": seqlens + 1, "seqlens": seqlens + 1,
    }
    params = inspect.signature(fn).parameters
    required = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty
                and spec.kind not in (spec.VAR_POSITIONAL, spec.VAR_KEYWORD)]
    missing = [p for p in required if p not in available]
    if missing:
        raise TypeError(f"cannot bind {fn.__name__}{inspect.signature(fn)}: no value for {missing}")
    return lambda: fn(**{p: available[p] for p in params if p in available})


def measure_shape(B, HQ, HK, L, kernels, replays, flush):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=DTYPE)

    k_cache, v_cache = rand(B, L, HK, HEAD_DIM), rand(B, L, HK, HEAD_DIM)
    q, r = rand(B, 1, HQ, HEAD_DIM), rand(B, 1, HQ, HEAD_DIM) * HEAD_DIM**-0.5
    k_new, v_new = rand(B, 1, HK, HEAD_DIM), rand(B, 1, HK, HEAD_DIM)
    seqlens = torch.full((B,), L - 1, dtype=torch.int32, device="cuda")  # the step appends token L
    steps = {
        "parallax": lambda: parallax_attn_with_kvcache(q, r, k_cache, v_cache, k=k_new, v=v_new,
                                                       cache_seqlens=seqlens),
    }
    fa2, fa3, fla = kernels["FA2"][0], kernels["FA3"][0], kernels["fla"][0]
    if fa2 is not None:
        steps["FA2"] = lambda: fa2(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens, causal=True)
    else:
        steps["FA2"] = lambda: sdpa_flash(q, k_cache, v_cache, L)
    if fa3 is not None:
        steps["FA3"] = lambda: fa3(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens, causal=True)
    if fla is not None:
        try:
            steps["fla"] = fla_call(fla, q, r, k_cache, v_cache, seqlens, L)
        except TypeError as err:
            kernels["fla"] = (None, str(err))

    results = {}
    for name, step in steps.items():
        try:
            results[name] = time_graph(step, replays, flush)
        except (RuntimeError, TypeError, ValueError) as err:
            print(f"  {name} failed at B={B} HQ={HQ} HK={HK} L={L}: {err}", file=sys.stderr)
    return results


def check_softmax_agreement(kernels) -> list[str]:
    """With a zero probe Parallax is softmax attention: the kernels must agree
    before their timings mean anything."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    B, L, HQ, HK = 2, 3000, 32, 8
    k_cache = torch.randn(B, L, HK, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(B, 1, HQ, HEAD_DIM, generator=gen, device="cuda", dtype=DTYPE)
    seqlens = torch.tensor([L, 1234], dtype=torch.int32, device="cuda")
    mine = parallax_attn_with_kvcache(q, torch.zeros_like(q), k_cache, v_cache, cache_seqlens=seqlens)
    lines = []
    for name in ("FA2", "FA3"):
        fn = kernels[name][0]
        if fn is not None:
            theirs = fn(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True)
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
            lines.append(f"{name}: max |parallax(r=0) - {name}| = {(mine - theirs).abs().max().item():.2e}")
    return lines


def sdpa_flash(q, k_cache, v_cache, length):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :length].transpose(1, 2),
                                           v_cache[:, :length].transpose(1, 2),
                                           enable_gqa=q.shape[2] != k_cache.shape[2])
    return o.transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--replays", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode.py measures GPU decode latency and needs a CUDA device; none was found.")

    gpu = torch.cuda.get_device_name()
    kernels = {"FA2": find_fa2(), "FA3": find_fa3(), "fla": find_fla_decode()}
    agreement = check_softmax_agreement(kernels)
    print("\n".join(agreement))
    copy_bw = copy_bandwidth(args.replays)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    names = ["parallax", "FA2", "FA3", "fla"]
    lines = [
        f"# Decode step latency on {gpu}",
        "",
        f"bf16, D={HEAD_DIM}, one new token appended per step, CUDA-graph replay, median of {args.replays}, "
        f"L2 flushed before each replay. Device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write). "
        "Each cell: ms (bandwidth of the K/V cache read as a fraction of the copy rate).",
        "",
        "Kernels: " + "; ".join(f"{n}: {kernels[n][1]}" for n in ("FA2", "FA3", "fla")),
        "",
        *agreement,
        "",
        "| B | HQ:HK | L | cache MB | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    verdicts = []
    for HQ, HK in HEADS:
        for B in BATCHES:
            for L in args.lengths:
                cache_bytes = 2 * B * L * HK * HEAD_DIM * DTYPE.itemsize
                times = measure_shape(B, HQ, HK, L, kernels, args.replays, flush)
                cells = [
                    f"{times[n] * 1e3:.4f} ({cache_bytes / times[n] / copy_bw:.0%})" if n in times else ""
                    for n in names
                ]
                lines.append(f"| {B} | {HQ}:{HK} | {L} | {cache_bytes / 1e6:.0f} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
                verdicts += judge(B, HQ, HK, L, cache_bytes, times, copy_bw)

    lines += ["", "## Targets", ""] + [f"- {v}" for v in verdicts]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"decode_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(verdicts) - 1:]))
    print(f"saved {out}")


def judge(B, HQ, HK, L, cache_bytes, times, copy_bw):
    """The issue's targets, where the shape and the measurements allow."""
    shape = f"B={B} HQ:HK={HQ}:{HK} L={L}"
    out = []
    mine = times.get("parallax")
    if mine is None:
        return [f"{shape}: parallax failed"]
    if "FA3" in times:
        verdict = "PASS" if mine <= times["FA3"] else "MISS"
        out.append(f"{verdict} {shape}: parallax {mine * 1e3:.4f} ms vs FA3 {times['FA3'] * 1e3:.4f} ms")
    if cache_bytes >= 256e6:
        fraction = cache_bytes / mine / copy_bw
        out.append(f"{'PASS' if fraction >= 0.8 else 'MISS'} {shape}: {fraction:.0%} of copy bandwidth (target 80%)")
    if (B, HQ, HK, L) == (1, 8, 8, 16384) and "fla" in times:
        speedup = times["fla"] / mine
        out.append(f"{'PASS' if speedup >= 3 else 'MISS'} {shape}: {speedup:.1f}x faster than fla (target 3x)")
    return out


if __name__ == "__main__":
    main()
