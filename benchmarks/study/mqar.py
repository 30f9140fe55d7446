"""Multi-query associative recall (MQAR): the 2x2 {softmax, Parallax} x {AdamW, Muon}.

A sequence opens with N key-value pairs; later, at random positions, the keys
come back in a shuffled order and the model must output each key's value as
the next token. Everything else is filler (token 0) and is not scored. Models
train on a mix of pair counts and are scored per pair count on a fixed
held-out set, one run per (cell, sequence length).

    python benchmarks/study/mqar.py --out benchmarks/study/results
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from parallax.models import GPT, GPTConfig
from parallax.optim import MuonWithAdamW

IGNORE = -1


def mqar_batch(batch: int, seq_len: int, num_pairs: int, vocab: int, generator: torch.Generator):
    """Token ids and targets [batch, seq_len]; targets are IGNORE except at queries.

    Keys come from [1, vocab/2), values from [vocab/2, vocab), so a value never
    looks like a key; token 0 is filler.
    """
    if seq_len < 4 * num_pairs:
        raise ValueError(f"seq_len ({seq_len}) must be >= 4 * num_pairs ({4 * num_pairs})")
    half = vocab // 2
    keys = torch.argsort(torch.rand(batch, half - 1, generator=generator), dim=1)[:, :num_pairs] + 1
    values = torch.randint(half, vocab, (batch, num_pairs), generator=generator)
    idx = torch.zeros(batch, seq_len, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE, dtype=torch.long)
    idx[:, 0:2 * num_pairs:2] = keys
    idx[:, 1:2 * num_pairs:2] = values
    # Query slots: distinct even offsets after the context, so no two collide.
    slots = (seq_len - 2 * num_pairs) // 2
    offsets = torch.argsort(torch.rand(batch, slots, generator=generator), dim=1)[:, :num_pairs]
    positions = 2 * num_pairs + 2 * offsets
    order = torch.argsort(torch.rand(batch, num_pairs, generator=generator), dim=1)
    rows = torch.arange(batch)[:, None]
    idx[rows, positions] = keys.gather(1, order)
    targets[rows, positions] = values.gather(1, order)
    return idx, targets


def build_optimizer(model, optimizer: str, lr: float):
    if optimizer == "muon":
        return MuonWithAdamW.from_model(model, lr=lr, adamw_lr=3e-3, weight_decay=0.0)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


@torch.no_grad()
def accuracy(model, idx, targets) -> float:
    logits, _ = model(idx)
    scored = targets != IGNORE
    return (logits.argmax(-1)[scored] == targets[scored]).float().mean().item()


def run_cell(attention, optimizer, lr, seq_len, pair_counts, *, vocab, steps, batch, seed, model_kw):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=seq_len, attention=attention, **model_kw))
    opt = build_optimizer(model, optimizer, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / steps))
    data = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        pairs = pair_counts[step % len(pair_counts)]
        idx, targets = mqar_batch(batch, seq_len, pairs, vocab, data)
        logits, _ = model(idx)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    held_out = torch.Generator().manual_seed(10_000 + seed)
    acc = {n: accuracy(model, *mqar_batch(256, seq_len, n, vocab, held_out)) for n in pair_counts}
    return {"attention": attention, "optimizer": optimizer, "lr": lr, "seq_len": seq_len, "seed": seed,
            "steps": steps, "accuracy": acc, "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/study/results"))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--muon-lr", type=float, nargs="+", default=[0.02], help="one run per rate")
    parser.add_argument("--adamw-lr", type=float, nargs="+", default=[3e-3], help="one run per rate")
    parser.add_argument("--optimizers", nargs="+", choices=("adamw", "muon"), default=["adamw", "muon"])
    parser.add_argument("--attentions", nargs="+", choices=("softmax", "parallax"), default=["softmax", "parallax"])
    args = parser.parse_args(argv)
    model_kw = dict(n_layer=2, n_head=2, n_embd=64)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "mqar.jsonl"
    rates = [(optimizer, lr) for optimizer in args.optimizers
             for lr in (args.muon_lr if optimizer == "muon" else args.adamw_lr)]
    for seq_len, seed, attention, (optimizer, lr) in itertools.product(args.seq_lens, args.seeds, args.attentions,
                                                                       rates):
        pair_counts = [n for n in (4, 8, 16, 32) if 4 * n <= seq_len]
        row = run_cell(attention, optimizer, lr, seq_len, pair_counts, vocab=args.vocab,
                       steps=args.steps, batch=args.batch, seed=seed, model_kw=model_kw)
        print(json.dumps(row), flush=True)
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
