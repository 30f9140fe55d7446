"""End-to-end generation: `GPT.generate` (Parallax and softmax) against transformers' generate.

For B = 1 and 32 and prompts of 512 and 4096 tokens, greedy decoding, three
models of one size: Parallax and softmax GPTs through `GPT.generate` itself
(on CUDA: its CUDA graphs), and a softmax Llama (transformers'
LlamaForCausalLM holding the softmax GPT's weights: the same function)
through transformers' `generate` with its static cache, whose decode step
transformers compiles on CUDA (torch.compile, CUDA graphs): the user's
alternative. Prefill: seconds of generate(prompt, 1) (the prompt and the
first token); decode: tokens/s, B x N / (seconds of generate(prompt, 1 + N)
minus the prefill). On CUDA also the GPT decode step captured by hand in a
CUDA graph and replayed (`graphed_step_seconds`): the bound for generate().

    python -m benchmarks.bench_generate [--device cpu|cuda] [--new-tokens N] [--repeats R]

CPU: the "tiny" preset (2 layers, width 32, 2 heads of 16), float32, 32 new
tokens, medians of 3 runs, no B=32 x 4096 cell (its prefill through the dense
torch cache path takes minutes on 2 cores: --max-prefill-tokens 131072 runs
it), transformers' generate uncompiled. CUDA: the "125m" preset (12 layers,
width 896, 14 heads of 64), bfloat16, 128 new tokens. The GPTs get a non-zero
probe (N(0, 0.02) W_R, as training leaves it; a fresh model's probe is zero
and would make Parallax softmax). Before timing: each model's cached decode
step against a full forward pass, zeroing the probe must move the Parallax
logits ten times more than that, the Llama's logits against the softmax GPT's,
and on CUDA graphed against eager greedy generation. Each cell is written to
out/bench/generate_<device>.md (or --out) as it finishes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.environment import add_out_argument, describe, markdown_table, save, table_name, table_path  # noqa: E402
from benchmarks.timing import WARMUP_CALLS, measure, measure_cuda_graph  # noqa: E402
from parallax.models.config import preset  # noqa: E402
from parallax.models.gpt import GPT  # noqa: E402

BATCHES = (1, 32)
PROMPTS = (512, 4096)
KINDS = ("parallax", "softmax")
HF = "transformers"
SETTINGS = {  # device type: (preset, dtype, new tokens, repeats, most prompt tokens B * T)
    "cpu": ("tiny", torch.float32, 32, 3, 16384),
    "cuda": ("125m", torch.bfloat16, 128, 3, None),
}
# Decode vs full forward, relative to the logits' scale: float32 agrees to
# rounding; bfloat16 activations through every layer drift by about 1%.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
LLAMA_TOLERANCE = 1e-4  # the Llama against the softmax GPT, both in float32
TARGETS = {"B=1 tokens/s": 1000, "B=32 tokens/s": 15000, "generate / graph": 0.9, "parallax / softmax": 0.9}


def build_model(kind: str, preset_name: str, block_size: int, dtype, device) -> GPT:
    torch.manual_seed(0)
    model = GPT(preset(preset_name, attention=kind, block_size=block_size))
    with torch.no_grad():
        for block in model.blocks:
            if block.attn.r_proj is not None:
                torch.nn.init.normal_(block.attn.r_proj.weight, std=0.02)  # a trained-looking probe
    return model.to(device=device, dtype=dtype).eval()


def llama_of(gpt: GPT):
    """transformers' LlamaForCausalLM computing what a softmax GPT computes
    (same weights; RMSNorm's eps is torch's default for float32), or None
    when transformers is not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    c = gpt.config
    if c.attention != "softmax" or c.qk_norm or c.window_size is not None:
        raise ValueError("only a softmax GPT without qk_norm or a window maps onto a Llama")
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.resolved_mlp_hidden(),
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.block_size, rms_norm_eps=torch.finfo(torch.float32).eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, tie_word_embeddings=c.tie_embeddings,
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    llama = LlamaForCausalLM(config)
    weights = {"model.embed_tokens.weight": gpt.wte.weight, "model.norm.weight": gpt.norm.weight,
               "lm_head.weight": gpt.lm_head.weight}
    for i, block in enumerate(gpt.blocks):
        layer = f"model.layers.{i}."
        weights[layer + "input_layernorm.weight"] = block.attn_norm.weight
        weights[layer + "post_attention_layernorm.weight"] = block.mlp_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[layer + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            weights[layer + f"mlp.{name}.weight"] = getattr(block.mlp, name).weight
    llama.load_state_dict(weights, strict=True)
    return llama.to(device=gpt.lm_head.weight.device, dtype=gpt.lm_head.weight.dtype).eval()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def decode_error(model: GPT, device: torch.device) -> float:
    """Max |logits of a cached decode step - logits of a full forward| over
    the logits' scale, on 2 sequences of 48 tokens."""
    idx = torch.randint(model.config.vocab_size, (2, 48), device=device)
    with torch.no_grad():
        full = model.lm_head(model.hidden_states(idx))[:, -1].float()
        caches = model.new_caches(2, 64)
        model.hidden_states(idx[:, :-1], caches)
        step = model.lm_head(model.hidden_states(idx[:, -1:], caches))[:, -1].float()
    return relative_error(step, full)


def check(models: dict, preset_name: str, dtype, device) -> list[str]:
    """Fails loudly unless decoding is right, the probe matters and the Llama is the softmax GPT."""
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
    shift = relative_error(with_probe, without)
    lines.append(f"parallax: zeroing the probe moves the logits by {shift:.2e} (relative)")
    if not shift > 10 * max(errors):  # else the check above could not tell Parallax from softmax
        raise SystemExit(f"the probe barely matters ({lines[-1]}): the Parallax rows would measure softmax")
    softmax32 = build_model("softmax", preset_name, models["softmax"].config.block_size, torch.float32, device)
    llama = llama_of(softmax32)
    if llama is not None:
        with torch.no_grad():
            err = relative_error(llama(idx).logits.float(), softmax32(idx)[0].float())
        lines.append(f"{HF}: the Llama's logits vs the softmax GPT's (float32), max relative error {err:.2e}")
        if not err <= LLAMA_TOLERANCE:
            raise SystemExit(f"the Llama is not the softmax GPT: {lines[-1]} (tolerance {LLAMA_TOLERANCE:g})")
    if device.type == "cuda":
        prompt = torch.randint(parallax.config.vocab_size, (2, 40), device=device)
        for kind, model in models.items():
            if not torch.equal(model.generate(prompt, 24, temperature=0),
                               model.generate(prompt, 24, temperature=0, cuda_graph=False)):
                raise SystemExit(f"{kind}: graphed greedy generation differs from eager")
            model.free_generation_graphs()
        lines.append("graphed greedy generate() equals eager (cuda_graph=False) for both kinds")
    return lines


def hf_generate(llama, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                          cache_implementation="static")


def generate_times(generators: dict, prompt, new_tokens: int, repeats: int, device) -> dict:
    """{name: (median prefill s, median decode s)}: prefill is generate(prompt, 1),
    decode generate(prompt, 1 + new_tokens) minus it. `measure` runs each call
    once untimed first (kernels compile, graphs are captured) and interleaves
    the models' calls."""
    calls = {}
    for name, generate in generators.items():
        calls[name, "prefill"] = lambda g=generate: g(prompt, 1)
        calls[name, "full"] = lambda g=generate: g(prompt, 1 + new_tokens)
    times = {key: t.median / 1e3 for key, t in measure(calls, device, repeats).items()}
    return {name: (times[name, "prefill"], times[name, "full"] - times[name, "prefill"]) for name in generators}


def graphed_step_seconds(model: GPT, prompt: torch.Tensor, replays: int) -> float:
    """Median seconds of one greedy decode step replayed from a CUDA graph
    captured by hand after an eager prefill, every replay at the same cache
    position: the bound for generate()."""
    caches = model.new_caches(prompt.shape[0], prompt.shape[1] + 1)
    with torch.no_grad():
        token = model.lm_head(model.hidden_states(prompt, caches)[:, -1]).argmax(-1, keepdim=True)

        def step():
            token.copy_(model.lm_head(model._hidden_states(token, caches)[:, -1]).argmax(-1, keepdim=True))

        prefilled = [cache.seqlens.clone() for cache in caches]

        def rewind():  # each step appends one token; start every run from the prompt
            for cache, seqlens in zip(caches, prefilled):
                cache.seqlens.copy_(seqlens)

        return measure_cuda_graph(step, prompt.device, replays, before_each=rewind).median / 1e3


def judge(rows: list[dict]) -> list[str]:
    """The issue's targets on CUDA (generate() rates of the Parallax GPT)."""
    out = []
    for r in rows:
        cell = f"B={r['B']} prompt {r['T']}"
        rate = r["parallax"]
        floor = TARGETS[f"B={r['B']} tokens/s"] if r["B"] in (1, 32) else None
        if floor is not None:
            out.append(f"{'PASS' if rate >= floor else 'MISS'} {cell}: parallax generate() {rate:.0f} tokens/s "
                       f"(target >= {floor})")
        for name, value in (("generate / graph", rate / r["parallax graph"]),
                            ("parallax / softmax", rate / r["softmax"])):
            out.append(f"{'PASS' if value >= TARGETS[name] else 'MISS'} {cell}: {name} {value:.2f} "
                       f"(target >= {TARGETS[name]})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="default: 3")
    parser.add_argument("--prompts", type=int, nargs="+", default=list(PROMPTS))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="skip cells with B * prompt above this (default: 16384 on CPU, none on CUDA)")
    add_out_argument(parser, "generate_<device>.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda needs a CUDA device; none was found")
    preset_name, dtype, new_tokens, repeats, max_prefill = SETTINGS[device.type]
    new_tokens = args.new_tokens or new_tokens
    args.repeats = args.repeats or repeats
    max_prefill = args.max_prefill_tokens or max_prefill
    load_before = os.getloadavg()
    checks = check({kind: build_model(kind, preset_name, 64, dtype, device) for kind in KINDS}, preset_name, dtype,
                   device)
    print("\n".join(checks))

    config = preset(preset_name)
    graphed = device.type == "cuda"
    hf_how = "static cache, compiled decode step" if graphed else "static cache, eager"
    names = [*KINDS, HF]
    lines = [
        f"# Generation throughput ({device.type})",
        "",
        describe(device, ("transformers",)),
        "",
        f"Preset {preset_name!r} ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads of "
        f"{config.head_dim}, block_size = prompt + {new_tokens + 8}), {str(dtype).replace('torch.', '')}, greedy, "
        f"{new_tokens} new tokens, medians of {args.repeats} interleaved runs after {WARMUP_CALLS} warm-up "
        "call(s) (`benchmarks.timing`). parallax, softmax: GPT.generate"
        + (" (its CUDA graphs)" if graphed else "") + f"; {HF}: a Llama holding the softmax GPT's weights, "
        f"LlamaForCausalLM.generate ({hf_how}). prefill: seconds of generate(prompt, 1); tok/s: B x new tokens / "
        "(seconds of generate(prompt, 1 + new tokens) - prefill)"
        + ("; graph tok/s: the GPT decode step captured by hand in a CUDA graph." if graphed else "."),
        "",
        *[f"- {line}" for line in checks],
        "",
    ]
    header = ["B", "prompt", *[f"{name} {column}" for name in names for column in ("prefill s", "tok/s")],
              *(["parallax graph tok/s"] if graphed else []), "parallax / softmax", f"parallax / {HF}"]
    path = table_path(args.out, table_name("generate", device))
    skipped, rows, table = [], [], []
    for T in args.prompts:
        # The cache capacity is block_size: fit it to the prompt, as a server would.
        models = {kind: build_model(kind, preset_name, T + new_tokens + 8, dtype, device) for kind in KINDS}
        generators = {kind: (lambda p, n, m=model: m.generate(p, n, temperature=0)) for kind, model in models.items()}
        llama = llama_of(models["softmax"])
        if llama is not None:
            generators[HF] = lambda p, n: hf_generate(llama, p, n)
        for B in args.batches:
            if max_prefill is not None and B * T > max_prefill:
                skipped.append(f"B={B}, prompt {T}: not run ({B * T} prompt tokens > {max_prefill}; "
                               "--max-prefill-tokens to run it)")
                continue
            prompt = torch.randint(config.vocab_size, (B, T), device=device)
            times = generate_times(generators, prompt, new_tokens, args.repeats, device)
            row = {"B": B, "T": T, **{name: B * new_tokens / times[name][1] for name in times}}
            cells = []
            for name in names:
                cells += [f"{times[name][0]:.3f}", f"{row[name]:.0f}"] if name in times else ["", "not installed"]
            if graphed:
                row["parallax graph"] = B / graphed_step_seconds(models["parallax"], prompt, new_tokens)
                cells.append(f"{row['parallax graph']:.0f}")
            cells.append(f"{row['parallax'] / row['softmax']:.2f}")
            cells.append(f"{row['parallax'] / row[HF]:.2f}" if HF in row else "")
            rows.append(row)
            table.append([B, T, *cells])
            print(markdown_table(header, table)[-1], flush=True)
            for model in models.values():
                model.free_generation_graphs()
            save(path, lines + markdown_table(header, table) + ["", "(run in progress: the rows above are final)"])
    lines += markdown_table(header, table)
    lines += ["", *[f"- {line}" for line in skipped]] if skipped else []
    if graphed:
        verdicts = judge(rows)
        lines += ["", "## Targets", "", *[f"- {v}" for v in verdicts]]
        print("\n".join(verdicts))
    else:  # other processes on the CPU slow every column alike, the ratios less
        lines += ["", "Load average (1, 5, 15 min) before / after: "
                  + " / ".join(", ".join(f"{x:.1f}" for x in load) for load in (load_before, os.getloadavg()))]
    save(path, lines)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
