"""End-to-end decoding throughput: `GPT.generate` tokens/s, Parallax against softmax.

For B = 1 and 32 and prompts of 512 and 4096 tokens, greedy decoding:
prefill seconds (to the first new token) and decode tokens/s (B * N over
the following N steps) of `GPT.generate(prompt, 1 + N)`, and on CUDA also of the
decode step captured in a CUDA graph and replayed (no host overhead per step).

    python -m benchmarks.bench_generate [--device cpu|cuda] [--new-tokens N] [--repeats R]

CPU (the torch path): the "tiny" preset (2 layers, width 32, 2 heads of 16),
float32, 8 new tokens, medians of 3 runs, and no B=32 x 4096 cell: its prefill
goes through the dense torch cache path and takes minutes on 2 cores (pass
--max-prefill-tokens 131072 to run it); the rest takes a few minutes. CUDA:
the "125m" preset (12 layers, width 896, 14 heads of 64), bfloat16, 128 new
tokens. Both models get a non-zero probe (N(0, 0.02) W_R, as training leaves
it; a fresh model's probe is zero and would make Parallax softmax). Before
timing, each model's cached decode step is checked against a full forward
pass, and zeroing the Parallax model's probe must move its logits ten times
more than that check's error.
Writes benchmarks/results/generate_<device>.md (or --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.environment import describe, markdown_table, results_path, save  # noqa: E402
from benchmarks.timing import WARMUP_CALLS, Stopwatch, measure  # noqa: E402
from parallax.models.config import preset  # noqa: E402
from parallax.models.gpt import GPT  # noqa: E402

BATCHES = (1, 32)
PROMPTS = (512, 4096)
KINDS = ("parallax", "softmax")
SETTINGS = {  # device type: (preset, dtype, new tokens, repeats, most prompt tokens B * T)
    "cpu": ("tiny", torch.float32, 8, 3, 16384),
    "cuda": ("125m", torch.bfloat16, 128, 3, None),
}
# Decode vs full forward, relative to the logits' scale: float32 agrees to
# rounding; bfloat16 activations through every layer drift by about 1%.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def build_model(kind: str, preset_name: str, block_size: int, dtype, device) -> GPT:
    torch.manual_seed(0)
    model = GPT(preset(preset_name, attention=kind, block_size=block_size))
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.r_proj is not None:
                torch.nn.init.normal_(block.attn.r_proj.weight, std=0.02)  # a trained-looking probe
    return model.to(device=device, dtype=dtype).eval()


def decode_error(model: GPT, device: torch.device) -> float:
    """Max |logits of a cached decode step - logits of a full forward| over
    the logits' scale, on 2 sequences of 48 tokens."""
    idx = torch.randint(model.config.vocab_size, (2, 48), device=device)
    with torch.no_grad():
        full = model.lm_head(model.hidden_states(idx))[:, -1].float()
        caches = model.new_caches(2, 64)
        model.hidden_states(idx[:, :-1], caches)
        step = model.lm_head(model.hidden_states(idx[:, -1:], caches))[:, -1].float()
    return (step - full).abs().max().item() / max(1.0, full.abs().max().item())


def check(models: dict, dtype, device) -> list[str]:
    """Fails loudly unless decoding is right and the probe matters."""
    lines, errors = [], []
    for kind, model in models.items():
        err = decode_error(model, device)
        errors.append(err)
        lines.append(f"{kind}: cached decode vs full forward, max relative logit error {err:.2e}")
        if not err <= CHECK_TOLERANCE[dtype]:
            raise SystemExit(f"{kind} decode is wrong: {lines[-1]} (tolerance {CHECK_TOLERANCE[dtype]:g})")
    parallax = models["parallax"]
    idx = torch.randint(parallax.config.vocab_size, (2, 48), device=device)
    with torch.no_grad():
        with_probe = parallax(idx)[0].float()
        saved = [block.attn.r_proj.weight.clone() for block in parallax.blocks]
        for block in parallax.blocks:
            block.attn.r_proj.weight.zero_()
        without = parallax(idx)[0].float()
        for block, weight in zip(parallax.blocks, saved):
            block.attn.r_proj.weight.copy_(weight)
    shift = (with_probe - without).abs().max().item() / max(1.0, without.abs().max().item())
    lines.append(f"parallax: zeroing the probe moves the logits by {shift:.2e} (relative)")
    if not shift > 10 * max(errors):  # else the check above could not tell Parallax from softmax
        raise SystemExit(f"the probe barely matters ({lines[-1]}): the Parallax rows would measure softmax")
    return lines


def generate_times(models: dict, prompt, new_tokens: int, repeats: int, device) -> dict:
    """{kind: (median prefill s, median decode s)} of `model.generate(prompt,
    1 + new_tokens)`: prefill up to the first new token, decode the following
    steps. Every step calls `hidden_states` once, so the start of the second
    call is a lap of the stopwatch."""
    watch = Stopwatch(device)

    def generate(model):
        calls = []

        def lapped(*args, **kwargs):
            if len(calls) == 1:
                watch.lap()
            calls.append(None)
            return type(model).hidden_states(model, *args, **kwargs)

        def run():
            calls.clear()
            model.hidden_states = lapped
            try:
                model.generate(prompt, 1 + new_tokens, temperature=0)
            finally:
                del model.hidden_states  # back to the class's method
        return run

    times = measure({kind: generate(model) for kind, model in models.items()}, device, repeats, watch=watch)
    return {kind: tuple(ms / 1e3 for ms in t.lap_medians()) for kind, t in times.items()}


def graphed_step_seconds(model: GPT, prompt: torch.Tensor, replays: int) -> float:
    """Median seconds of one greedy decode step replayed from a CUDA graph
    after an eager prefill, every replay at the same cache position. The step
    is GPT.hidden_states' loop over the blocks without its host-side length
    check (which reads the device and cannot be captured)."""
    caches = model.new_caches(prompt.shape[0], prompt.shape[1] + 1)
    with torch.no_grad():
        token = model.lm_head(model.hidden_states(prompt, caches)[:, -1]).argmax(-1, keepdim=True)

        def step():
            x = model.wte(token)
            for block, cache in zip(model.blocks, caches):
                x = block(x, cache)
            token.copy_(model.lm_head(model.norm(x)[:, -1]).argmax(-1, keepdim=True))

        prefilled = [cache.seqlens.clone() for cache in caches]

        def rewind():  # each step appends one token; start every run from the prompt
            for cache, seqlens in zip(caches, prefilled):
                cache.seqlens.copy_(seqlens)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # compile outside the capture
                rewind()
                step()
        torch.cuda.current_stream().wait_stream(side)
        rewind()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        timing = measure({"step": graph.replay}, prompt.device, replays, before_each=rewind)["step"]
        return timing.median / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3")
    parser.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="skip cells with B * prompt above this (default: 16384 on CPU, none on CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/generate_<device>.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device; none was found")
    preset_name, dtype, new_tokens, repeats, max_prefill = SETTINGS[device.type]
    new_tokens = args.new_tokens or new_tokens
    args.repeats = args.repeats or repeats
    max_prefill = args.max_prefill_tokens or max_prefill
    checks = check({kind: build_model(kind, preset_name, 64, dtype, device) for kind in KINDS}, dtype, device)
    print("\n".join(checks))

    config = preset(preset_name)
    graphed = device.type == "cuda"
    lines = [
        f"# GPT.generate throughput ({device.type})",
        "",
        describe(device),
        "",
        f"Preset {preset_name!r} ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads of "
        f"{config.head_dim}, block_size = prompt + {new_tokens + 8}), {str(dtype).replace('torch.', '')}, greedy, "
        f"{new_tokens} "
        f"new tokens, medians of {args.repeats} interleaved runs of generate(prompt, 1 + new tokens) after "
        f"{WARMUP_CALLS} warm-up call(s). prefill: "
        "seconds to the first new token; decode: tokens/s (B x new tokens / seconds) of the following steps"
        + ("; graphed: the decode step replayed from a CUDA graph (median of new-tokens replays)." if graphed else "."),
        "",
        *[f"- {line}" for line in checks],
        "",
    ]
    header = ["B", "prompt"]
    for kind in KINDS:
        header += [f"{kind} prefill s", f"{kind} decode tok/s"] + ([f"{kind} graphed tok/s"] if graphed else [])
    header.append("parallax / softmax decode")
    rows, skipped = [], []
    for T in args.prompts:
        # The cache capacity is block_size: fit it to the prompt, as a server would.
        models = {kind: build_model(kind, preset_name, T + new_tokens + 8, dtype, device) for kind in KINDS}
        for B in args.batches:
            if max_prefill is not None and B * T > max_prefill:
                skipped.append(f"B={B}, prompt {T}: not run ({B * T} prompt tokens > {max_prefill}; "
                               "--max-prefill-tokens to run it)")
                continue
            prompt = torch.randint(config.vocab_size, (B, T), device=device)
            cells, rates = [], {}
            times = generate_times(models, prompt, new_tokens, args.repeats, device)
            for kind, model in models.items():
                prefill, decode = times[kind]
                rates[kind] = B * new_tokens / decode
                cells += [f"{prefill:.3f}", f"{rates[kind]:.0f}"]
                if graphed:
                    cells.append(f"{B / graphed_step_seconds(model, prompt, new_tokens):.0f}")
            rows.append([B, T, *cells, f"{rates['parallax'] / rates['softmax']:.2f}"])
            print(markdown_table(header, rows)[-1], flush=True)
    lines += markdown_table(header, rows)
    lines += ["", *[f"- {line}" for line in skipped]] if skipped else []
    path = save(args.out or results_path("generate", device), lines)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
