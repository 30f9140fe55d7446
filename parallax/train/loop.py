"""The training loop: `train(TrainConfig) -> summary dict`."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..models import GPT, preset
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import ConfigError, TrainConfig
from .data import BatchSampler, DataError, Dataset, eval_windows, load_dataset, unigram_bits
from .fsdp import full_model_state, full_optimizer_state, load_model_state, shard_model, unsharded_copy, whole
from .plot import plot_losses, read_log
from .progress import ProgressBar
from .schedule import LRSchedule, build_scheduler

LOG_NAME, PLOT_NAME, SAMPLE_NAME = "log.jsonl", "loss.png", "sample.txt"


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or inf; training stopped."""


# ---------------------------------------------------------------- setup

def _init_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "CUDA was requested but is not available")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    mc = preset(cfg.model, vocab_size=vocab_size, attention=cfg.attention, parameter_matched=cfg.parameter_matched)
    return GPT(mc)


def build_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Muon (hidden matrices) + AdamW (embeddings, lm_head, gains), or AdamW
    with the same two groups. Groups: [matrices at cfg.matrix_lr, rest at cfg.embed_lr]."""
    from ..optim import MuonWithAdamW, split_params

    matrices, rest = split_params(model)
    if cfg.optimizer == "muon":
        groups = [{"params": matrices, "use_muon": True, "lr": cfg.matrix_lr, "weight_decay": cfg.weight_decay},
                  {"params": rest, "use_muon": False, "lr": cfg.embed_lr, "weight_decay": 0.0}]
        # Under torchrun each matrix's direction is computed by one rank (DDP) or its owner (FSDP).
        return MuonWithAdamW(groups, momentum=cfg.momentum, adamw_betas=(0.9, 0.95),
                             process_group=dist.group.WORLD if dist.is_initialized() else None)
    groups = [{"params": matrices, "lr": cfg.matrix_lr, "weight_decay": cfg.weight_decay},
              {"params": rest, "lr": cfg.embed_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, foreach=False)


def _autocast(cfg: TrainConfig, device: torch.device):
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: torch.nn.Module, ds: Dataset, windows: list[tuple[int, int]], seq_len: int, batch_size: int,
             device: torch.device, autocast, rank: int = 0, world: int = 1) -> float:
    """Mean val cross-entropy (nats / token) over fixed windows, shared among ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = windows[rank::world]
    for i in range(0, len(mine), batch_size):
        rows = np.stack([ds.val.read(s, o, seq_len + 1) for s, o in mine[i:i + batch_size]])
        batch = torch.from_numpy(rows).to(device)
        with autocast():
            _, loss = model(batch[:, :-1], batch[:, 1:])
        n = batch[:, 1:].numel()
        total += torch.tensor([loss.double().item() * n, n], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


# ---------------------------------------------------------------- the loop

def _log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop records past `step` (a resumed run redoes them)."""
    records = [r for r in read_log(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def format_summary(summary: dict) -> str:
    parts = []
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}" if math.isfinite(value) else str(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def train(cfg: TrainConfig, *, loss_hook=None, eval_hook=None, stdout=None) -> dict:
    """Train a GPT as `cfg` says; returns the summary (also printed last on stdout).

    loss_hook(step, loss) -> loss, if given, sees every micro-batch loss
    before backward (tests use it to inject a NaN). eval_hook(step, model),
    if given, runs on rank 0 after every evaluation (studies use it to probe
    the model as it trains).
    Raises ConfigError / DataError for bad settings and NonFiniteLossError
    when the loss stops being finite (the last checkpoint is kept).
    """
    cfg.validate()
    out = stdout or sys.stdout
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        rank, world, device = _init_distributed(cfg)
        try:
            return _train(cfg, rank, world, device, loss_hook, eval_hook, out)
        finally:
            if world > 1 and dist.is_initialized():
                dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device, loss_hook, eval_hook, out) -> dict:
    main = rank == 0
    say = (lambda msg: print(msg, file=out, flush=True)) if main else (lambda msg: None)
    out_dir = Path(cfg.out)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_NAME
    t_start = time.perf_counter()

    _seed_everything(cfg.seed)
    ds = load_dataset(cfg.data, cache_dir=cfg.cache_dir, vocab_size=cfg.vocab_size)
    if ds.vocab_size > 65536 or (cfg.vocab_size is not None and not ds.byte_level and cfg.vocab_size < ds.vocab_size):
        raise DataError(f"vocab size {ds.vocab_size} does not fit the data")
    unigram = unigram_bits(ds)
    bits_per_token = 1.0 / math.log(2)  # nats -> bits; tokens are bytes for byte-level data
    model = build_model(cfg, ds.vocab_size).to(device)
    if cfg.fsdp:
        shard_model(model, device)
    params = model.num_parameters()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.steps, cfg.warmup, cfg.min_lr_ratio, cfg.cooldown)
    sampler = BatchSampler(ds.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank)
    windows = eval_windows(ds.val, cfg.seq_len, cfg.eval_batches * cfg.batch_size)

    step, tokens_before, time_before = 0, 0, 0.0
    ckpt_path = latest_checkpoint(out_dir) if cfg.resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        if ckpt["model_config"] != model.config.to_dict():
            raise ConfigError("--resume", f"{ckpt_path} holds a different model ({ckpt['model_config']}); "
                                          f"pass the same --model / --attention / data")
        load_model_state(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scheduler.lr_lambdas = [LRSchedule(cfg.schedule, cfg.steps, cfg.warmup, cfg.min_lr_ratio, cfg.cooldown)
                                for _ in optimizer.param_groups]
        sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        step, tokens_before, time_before = int(ckpt["step"]), int(ckpt["tokens"]), float(ckpt["elapsed"])
        if main:
            _truncate_log(log_path, step)
        say(f"resumed from {ckpt_path} at step {step}")
    else:
        if cfg.resume:
            say(f"no checkpoint in {out_dir}; starting from scratch")
        if main and log_path.exists():
            log_path.unlink()

    raw_model = model
    if world > 1 and not cfg.fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    autocast = _autocast(cfg, device)
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    ckpt_every = cfg.ckpt_every or cfg.eval_every

    say(f"data: {ds.description}: {len(ds.train):,} train / {len(ds.val):,} val tokens, vocab {ds.vocab_size}")
    say(f"system: {device}, {torch.get_num_threads()} CPU thread(s), world size {world}")
    say(f"model: {cfg.model} ({cfg.attention}{', parameter-matched' if cfg.parameter_matched else ''}), "
        f"{params:,} parameters; optimizer {cfg.optimizer}")
    say(f"run: {cfg.steps} steps x {tokens_per_step:,} tokens (batch {cfg.batch_size} x seq {cfg.seq_len} x accum "
        f"{cfg.grad_accum} x {world}); unigram baseline {unigram:.4f} bits/token")

    def checkpoint(at: int, elapsed: float) -> None:
        model_state, optimizer_state = full_model_state(raw_model), full_optimizer_state(optimizer)  # every rank
        if not main:
            return
        save_checkpoint({
            "step": at, "tokens": tokens_before + (at - start) * tokens_per_step, "elapsed": elapsed,
            "model": model_state, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(), "rng": rng_state(),
            "model_config": raw_model.config.to_dict(), "train_config": cfg.to_dict(),
        }, out_dir / "checkpoint.pt")

    def run_eval(at: int) -> float:
        # FSDP: every rank evaluates every window, so all run the same sharded forwards.
        val = evaluate(model, ds, windows, cfg.seq_len, cfg.batch_size, device, autocast,
                       *((0, 1) if cfg.fsdp else (rank, world)))
        if main:
            _log(log_path, {"kind": "val", "step": at, "val_loss": val, "val_bpb": val * bits_per_token,
                            "unigram_bpb": unigram})
            if eval_hook is not None:
                eval_hook(at, raw_model)
        return val

    start = step
    bar = ProgressBar(stop, start=step, every=cfg.log_every, enabled=main and cfg.progress)
    model.train()
    train_time, last_loss, val_loss = 0.0, float("nan"), None
    while step < stop:
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = sampler.next()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or world == 1 or cfg.fsdp
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast():
                _, loss = model(x, y)
                if loss_hook is not None:
                    loss = loss_hook(step, loss)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_avg = loss_sum / cfg.grad_accum
        if world > 1:
            dist.all_reduce(loss_avg, op=dist.ReduceOp.AVG)
        grad_norm = (torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.zeros(()))
        grad_norm = whole(grad_norm)
        last_loss = float(loss_avg)
        if not (math.isfinite(last_loss) and math.isfinite(float(grad_norm))):
            bar.close()
            kept = latest_checkpoint(out_dir)
            what = "loss" if not math.isfinite(last_loss) else "gradient norm"
            raise NonFiniteLossError(
                f"{what} is {last_loss if what == 'loss' else float(grad_norm)} at step {step + 1}; training stopped. "
                + (f"The last good checkpoint is {kept}." if kept else "No checkpoint was written yet.")
                + " Try a lower --lr / --embed-lr or a longer --warmup.")
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        train_time += dt
        tok_s = (step - start) * tokens_per_step / max(train_time, 1e-9)
        if main:
            _log(log_path, {"kind": "train", "step": step, "loss": last_loss, "lr": lrs[0], "embed_lr": lrs[-1],
                            "tokens": tokens_before + (step - start) * tokens_per_step, "tokens_per_s": tok_s})
        bar.update(step, loss=last_loss, tok_s=int(tok_s))
        if step % cfg.eval_every == 0 or step == stop:
            val_loss = run_eval(step)
            if main:
                bar.write(f"step {step}: val_loss {val_loss:.4f}  val_bpb {val_loss * bits_per_token:.4f}  "
                          f"(unigram {unigram:.4f})", out)
        if step % ckpt_every == 0 or step == stop:
            checkpoint(step, time_before + time.perf_counter() - t_start)
    bar.close()
    if start == stop and cfg.stop_after is not None and step < cfg.steps:
        checkpoint(step, time_before + time.perf_counter() - t_start)  # --stop-after at the current step

    if val_loss is None:  # nothing trained in this call (steps=0 or already done)
        val_loss = run_eval(step)
    if main:
        plot_losses(log_path, out_dir / PLOT_NAME, baseline=unigram / bits_per_token,
                    title=f"{cfg.model} {cfg.attention} {cfg.optimizer}")
    finished = step >= cfg.steps
    sample_model = unsharded_copy(raw_model) if finished and cfg.sample_tokens > 0 else None  # every rank
    if main and sample_model is not None:
        prompt_len = min(32, raw_model.config.block_size // 2, len(ds.val))
        prompt = torch.from_numpy(ds.val.read(0, 0, prompt_len)).to(device)[None]
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        tokens = sample_model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=None, generator=gen)
        text = ds.decode(tokens[0].tolist())
        (out_dir / SAMPLE_NAME).write_text(text)
        say("---- sample (prompt: the first %d tokens of the val split) ----\n%s\n----" % (prompt_len, text))

    summary = {
        "status": "done" if finished else "stopped",
        "step": step,
        "steps": cfg.steps,
        "val_loss": val_loss,
        "val_bpb": val_loss * bits_per_token,
        "unigram_bpb": unigram,
        "bpb_ratio": val_loss * bits_per_token / unigram,
        "train_loss": last_loss,
        "tokens": tokens_before + (step - start) * tokens_per_step,
        "tokens_per_s": (step - start) * tokens_per_step / train_time if train_time > 0 else 0.0,
        "params": params,
        "time_s": time.perf_counter() - t_start,
        "world_size": world,
        "out": str(out_dir),
    }
    if main and cfg.export_hf:
        from ..hf.export import save_pretrained_gpt  # optional extra: imported only when asked for

        say(f"exported the model to {save_pretrained_gpt(raw_model, cfg.export_hf)} (transformers format)")
    if main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        say(format_summary(summary))
    return summary
