"""The training loop: `train(TrainConfig) -> summary dict`.

A run, in order: claim --out (a lock, and no previous run overwritten by
accident), load the data, build the model, wrap it (`wrap_model`: the one
place for DDP and torch.compile), build the optimizer and schedule, restore
the checkpoint (`--resume`; a run that already finished stops there), say
what the run will cost (`estimate`), train with periodic evaluations and
checkpoints (`Run.fit`), then write the outputs (`Run.finish`: plot, sample,
summary). Evaluations and the sample show progress bars as training does.
What a checkpoint holds is `Run.state_dict` / `Run.load_state_dict`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from ..models import GPT, preset
from ..models.config import GPU_PRESETS, architecture
from .atomic import atomic_write
from .checkpoint import (
    CHECKPOINT_NAME, PREVIOUS_NAME, CheckpointError, latest_checkpoint, load_latest_checkpoint, rng_state,
    save_checkpoint, set_rng_state,
)
from .config import ConfigError, TrainConfig
from .data import BatchSampler, Dataset, check_token_ids, eval_windows, load_dataset, unigram_bits
from .estimate import describe_bytes, describe_seconds, estimate, free_memory
from .fsdp import full_model_state, full_optimizer_state, load_model_state, shard_model, unsharded_copy, whole
from .interrupt import StopNow, StopRequest, stop_on_signals
from .paths import check_paths
from .plot import plot_losses
from .progress import ProgressBar
from .rundir import LOG_NAME, PLOT_NAME, SAMPLE_NAME, SUMMARY_NAME, RunDir
from .runlog import RunLog
from .schedule import LRSchedule, build_scheduler

# What every training checkpoint holds (a file without it is not one of ours).
STATE_TYPES = {"step": int, "tokens": int, "elapsed": (int, float), "model": dict, "optimizer": dict,
               "scheduler": dict, "sampler": dict, "rng": dict, "model_config": dict, "train_config": dict}


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN or inf; training stopped."""


class TrainingInterrupted(RuntimeError):
    """A stop signal (SIGINT, SIGTERM) ended the run after a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {checkpoint}; "
                         "continue with --resume")


# ---------------------------------------------------------------- setup

@contextlib.contextmanager
def _torch_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(cfg: TrainConfig, local_rank: int, world: int) -> torch.device:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:  # an index past what torch parses
            raise ConfigError("--device", f"{cfg.device} does not exist") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device", "CUDA was requested but is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("--device", f"{cfg.device} does not exist ({torch.cuda.device_count()} CUDA device(s))")
        if world > 1:
            device = torch.device("cuda", local_rank)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device", "MPS was requested but is not available")
    return device


def _launch() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the environment torchrun sets;
    ConfigError naming the variable when it is malformed or incomplete."""
    def number(name: str, default: str, low: int) -> int:
        value = os.environ.get(name, default)
        try:
            n = int(value)
        except ValueError:
            n = low - 1
        if n < low:
            raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
        return n

    world = number("WORLD_SIZE", "1", 1)
    if world > 1:
        missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise ConfigError("WORLD_SIZE", f"is {world} but {', '.join(missing)} is not set; launch several "
                                            "processes with torchrun (see docs/training.md), or unset WORLD_SIZE")
    rank = number("RANK", "0", 0)
    if rank >= world:
        raise ConfigError("RANK", f"must be below WORLD_SIZE {world}, got {rank}")
    return rank, number("LOCAL_RANK", "0", 0), world


@contextlib.contextmanager
def _distributed(cfg: TrainConfig):
    """(rank, world_size, device); joins the process group under torchrun."""
    rank, local_rank, world = _launch()
    device = _device(cfg, local_rank, world)
    joined = False
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        joined = True
    try:
        yield rank, world, device
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _claimed_out_dir(cfg: TrainConfig, rank: int, world: int):
    """Rank 0 claims --out; every rank learns whether that worked, so all stop together."""
    run_dir, error = RunDir(cfg.out), None
    if rank == 0:
        try:
            run_dir = RunDir.claim(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
        except ConfigError as e:
            error = e
    if world > 1:
        verdict = [None if error is None else (error.flag, error.message)]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None and error is None:
            error = ConfigError(*verdict[0])
    if error is not None:
        raise error
    try:
        yield run_dir
    finally:
        run_dir.release()


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    mc = preset(cfg.model, vocab_size=vocab_size, attention=cfg.attention, parameter_matched=cfg.parameter_matched,
                backend=cfg.backend, deterministic=cfg.deterministic)
    return GPT(mc)


def wrap_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> torch.nn.Module:
    """The module the loop calls. Parallel wrappers go here; the optimizer is
    built afterwards, from the parameters `model` holds then."""
    if cfg.fsdp:
        shard_model(model, device)  # in place: the parameters become DTensors
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


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
             device: torch.device, autocast, rank: int = 0, world: int = 1, progress=None) -> float:
    """Mean val cross-entropy (nats / token) over fixed windows, shared among ranks.
    progress(batches done, batches), if given, is called after each batch."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = windows[rank::world]
    batches = -(-len(mine) // batch_size)
    try:
        for i in range(0, len(mine), batch_size):
            rows = np.stack([ds.val.read(s, o, seq_len + 1) for s, o in mine[i:i + batch_size]])
            check_token_ids(rows, None if ds.byte_level else ds.vocab_size)
            batch = torch.from_numpy(rows).to(device)
            with autocast():
                _, loss = model(batch[:, :-1], batch[:, 1:])
            n = batch[:, 1:].numel()
            total += torch.tensor([loss.double().item() * n, n], dtype=torch.float64, device=device)
            if progress is not None:
                progress(i // batch_size + 1, batches)
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def format_summary(summary: dict) -> str:
    parts = []
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}" if math.isfinite(value) else str(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


# ---------------------------------------------------------------- the run

def train(cfg: TrainConfig, *, loss_hook=None, eval_hook=None, stdout=None) -> dict:
    """Train a GPT as `cfg` says; returns the summary (also printed last on stdout).

    loss_hook(step, loss) -> loss, if given, sees every micro-batch loss
    before backward (tests use it to inject a NaN). eval_hook(step, model),
    if given, runs on rank 0 after every evaluation (studies use it to probe
    the model as it trains).
    Raises ConfigError (DataError included) for bad settings, before any
    training; NonFiniteLossError when the loss stops being finite;
    TrainingInterrupted after a SIGINT / SIGTERM (a checkpoint is saved
    first); OSError or CheckpointError when an output cannot be written. In
    every case the newest complete checkpoint is kept for `resume`.
    """
    cfg = cfg.resolved().validate()
    check_paths(cfg)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_torch_threads(cfg.threads))
        rank, world, device = stack.enter_context(_distributed(cfg))
        run_dir = stack.enter_context(_claimed_out_dir(cfg, rank, world))
        stop = stack.enter_context(stop_on_signals())
        run = Run(cfg, rank, world, device, run_dir, stdout or sys.stdout, loss_hook, eval_hook)
        stack.callback(run.log.close)
        run.restore()
        finished = run.finished_summary()
        if finished is not None:
            run.say(f"{run_dir.path} already finished step {run.step} of --steps {cfg.steps}: nothing to do (a larger "
                    "--steps continues it)")
            run.say(format_summary(finished))
            return finished
        run.fit(stop)
        return run.finish(stop)


class Run:
    """The state of one training run and the steps that advance it."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device, run_dir: RunDir, out,
                 loss_hook=None, eval_hook=None):
        self.cfg, self.rank, self.world, self.device, self.dir = cfg, rank, world, device, run_dir
        self.main = rank == 0
        self.out, self.loss_hook, self.eval_hook = out, loss_hook, eval_hook
        self.log = RunLog(run_dir[LOG_NAME])
        self.t_start = time.perf_counter()
        self.say(f"out: {run_dir.path}")

        _seed_everything(cfg.seed)
        self.ds = load_dataset(cfg.data, cache_dir=cfg.cache_dir, vocab_size=cfg.vocab_size)
        self.unigram = unigram_bits(self.ds)
        self.bits_per_nat = 1.0 / math.log(2)  # tokens are bytes for byte-level data
        self.raw_model = build_model(cfg, self.ds.vocab_size).to(device)
        self.params = self.raw_model.num_parameters()
        self.model = wrap_model(self.raw_model, cfg, device, world)
        self.optimizer = build_optimizer(self.raw_model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.steps, cfg.warmup, cfg.min_lr_ratio,
                                         cfg.cooldown)
        self.sampler = BatchSampler(self.ds.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank,
                                    vocab_size=None if self.ds.byte_level else self.ds.vocab_size)
        self.windows = eval_windows(self.ds.val, cfg.seq_len, cfg.eval_batches * cfg.batch_size)
        self.autocast = _autocast(cfg, device)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world

        self.step = self.start = 0  # optimizer steps done; the step this process started from
        self.tokens_before, self.elapsed_before = 0, 0.0  # from the checkpoint resumed
        self.train_s = 0.0  # seconds in training steps (no evaluation, checkpoints or sampling)
        self.last_loss, self.lrs = float("nan"), [0.0]
        self.val: tuple[int, float] | None = None  # (step, val loss) of the latest evaluation
        self.saved_step: int | None = None

    # ------------------------------------------------------------ bookkeeping

    def say(self, message: str) -> None:
        if self.main:
            print(message, file=self.out, flush=True)

    @property
    def trained_tokens(self) -> int:
        """Tokens trained by this process (since `start`)."""
        return (self.step - self.start) * self.tokens_per_step

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.t_start

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit. Called on every
        rank (gathering a sharded model's state takes them all); rank 0 saves it."""
        return {
            "step": self.step, "tokens": self.tokens_before + self.trained_tokens,
            "elapsed": self.elapsed_before + self.wall_s,
            "model": full_model_state(self.raw_model), "optimizer": full_optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(), "sampler": self.sampler.state_dict(), "rng": rng_state(),
            "val_loss": self.val[1] if self.val is not None and self.val[0] == self.step else None,
            "model_config": self.raw_model.config.to_dict(), "train_config": self.cfg.to_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        cfg = self.cfg
        load_model_state(self.raw_model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule comes from the flags (a resumed run may extend --steps).
        self.scheduler.lr_lambdas = [LRSchedule(cfg.schedule, cfg.steps, cfg.warmup, cfg.min_lr_ratio, cfg.cooldown)
                                     for _ in self.optimizer.param_groups]
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.step = self.start = int(state["step"])
        self.tokens_before, self.elapsed_before = int(state["tokens"]), float(state["elapsed"])
        if state.get("val_loss") is not None:
            self.val = (self.step, float(state["val_loss"]))
        self.saved_step = self.step

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        if self.main:
            self.log.sync()  # the log must hold every record the checkpoint covers
            save_checkpoint(state, self.dir[CHECKPOINT_NAME], keep_previous=self.dir[PREVIOUS_NAME])
        self.saved_step = self.step

    # ------------------------------------------------------------ resume

    def restore(self) -> None:
        """With --overwrite: delete the previous run's files, now that this run's
        data and model are known to be usable. With --resume: load the newest
        readable checkpoint and cut the log back to it (unless the run already
        finished, see `finished_summary`). Then the temp files a killed run left go."""
        if self.cfg.overwrite and self.main:
            self.dir.discard_previous()
        if self.cfg.resume:
            self._resume()
        if self.main:
            self.dir.discard_stale_temp_files()

    def _resume(self) -> None:
        try:
            state, path, problems = load_latest_checkpoint(self.dir.path, self.device, STATE_TYPES)
        except CheckpointError as e:
            raise ConfigError("--resume", f"{e}; start afresh with --overwrite") from None
        for problem in problems:
            self.say(f"warning: {problem}; resuming from the checkpoint before it")
        if state is None:
            self.say(f"no checkpoint in {self.dir.path}; starting from step 0")
        else:
            self._check_resumable(state, path)
            try:
                self.load_state_dict(state)
            except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as e:
                raise ConfigError("--resume", f"{path} does not fit this run: {' '.join(str(e).split())[:300]}") from None
        if self.finished_summary() is not None:
            return  # train() says so; the run's files stay as they are
        if self.main:
            _, set_aside = self.log.rollback(self.step)
            if set_aside:
                print(f"warning: {self.log.path} held {set_aside} unreadable line(s); moved them to "
                      f"{self.log.unreadable_path} and kept every readable record", file=sys.stderr, flush=True)
        if state is not None:
            self.say(f"resumed from {path} at step {self.step}")

    def finished_summary(self) -> dict | None:
        """With --resume: the summary of a run that already ran all --steps and wrote its outputs; else None."""
        if not self.cfg.resume or self.step < self.cfg.steps:
            return None
        try:
            summary = json.loads(self.dir[SUMMARY_NAME].read_text())
        except (OSError, ValueError):  # killed before the summary: the end of the run is redone
            return None
        done = isinstance(summary, dict) and summary.get("status") == "done" and summary.get("step") == self.step
        return summary if done else None

    def _check_resumable(self, state: dict, path) -> None:
        saved, mine = architecture(state["model_config"]), architecture(self.raw_model.config.to_dict())
        if saved != mine:
            diff = ", ".join(f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in mine.items() if saved.get(k) != v)
            raise ConfigError("--resume", f"{path} holds a different model ({diff}); pass that run's --model, "
                                          "--attention, --parameter-matched and --data, or start afresh with --overwrite")
        optimizer = state["train_config"].get("optimizer")
        if optimizer != self.cfg.optimizer:
            raise ConfigError("--resume", f"{path} was trained with --optimizer {optimizer}, not {self.cfg.optimizer}; "
                                          "pass the same optimizer or start afresh with --overwrite")

    # ------------------------------------------------------------ training

    def fit(self, stop: StopRequest) -> None:
        """Train to --steps (or --stop-after), evaluating and checkpointing on the way."""
        cfg = self.cfg
        stop_at = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
        ckpt_every = cfg.ckpt_every or cfg.eval_every
        self._describe()
        self._estimate(stop_at)
        bar = ProgressBar(stop_at, start=self.step, every=cfg.log_every, enabled=self.main and cfg.progress)
        self.model.train()
        try:
            while self.step < stop_at:
                stopping = self._train_step(stop)
                self._log_step(bar)
                if self.step % cfg.eval_every == 0 or self.step == stop_at:
                    self._evaluate(bar)
                if self.step % ckpt_every == 0 or self.step == stop_at or stopping:
                    self.save_checkpoint()
                if stopping:
                    raise TrainingInterrupted(stop.signum, self.step, self.dir[CHECKPOINT_NAME])
        finally:
            bar.close()
        if self.saved_step != self.step and cfg.stop_after is not None and self.step < cfg.steps:
            self.save_checkpoint()  # --stop-after at the step the run is already at

    def _describe(self) -> None:
        cfg, ds = self.cfg, self.ds
        self.say(f"data: {ds.description}: {len(ds.train):,} train / {len(ds.val):,} val tokens, vocab {ds.vocab_size}")
        self.say(f"system: {self.device}, {torch.get_num_threads()} CPU thread(s), world size {self.world}")
        self.say(f"model: {cfg.model} ({cfg.attention}{', parameter-matched' if cfg.parameter_matched else ''}), "
                 f"{self.params:,} parameters; optimizer {cfg.optimizer}")
        self.say(f"run: {cfg.steps} steps x {self.tokens_per_step:,} tokens (batch {cfg.batch_size} x seq {cfg.seq_len} "
                 f"x accum {cfg.grad_accum} x {self.world}); unigram baseline {self.unigram:.4f} bits/token")

    def _estimate(self, stop_at: int) -> None:
        """Say how long the steps to `stop_at` (with their evaluations and sample) will take and how much
        memory they need; warn when that looks like the wrong device or does not fit."""
        cfg, device = self.cfg, self.device
        if not self.main:
            return
        evals = len({s for s in range(self.step + 1, stop_at + 1) if s % cfg.eval_every == 0} | {stop_at})
        sample = cfg.sample_tokens if stop_at >= cfg.steps else 0
        guess = estimate(
            self.raw_model, optimizer=cfg.optimizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
            grad_accum=cfg.grad_accum, steps=stop_at - self.step, evals=evals,
            eval_tokens=len(self.windows) * cfg.seq_len // self.world, sample_tokens=sample, device=device,
            dtype=torch.float32 if self.autocast is contextlib.nullcontext else torch.bfloat16,
            torch_path=cfg.attention == "parallax" and (cfg.backend == "torch" or device.type != "cuda"))
        self.say(f"estimate: {stop_at - self.step} steps in about {describe_seconds(guess.train_s)}, "
                 f"{evals} evaluation{'s' if evals > 1 else ''}{' and the sample' if sample else ''} in about "
                 f"{describe_seconds(guess.eval_s)}; peak memory about {describe_bytes(guess.memory_bytes)} "
                 f"({device} matmuls at {guess.rate / 1e9:.3g} GFLOP/s just now)")
        if cfg.model.lower() in GPU_PRESETS and device.type == "cpu":
            _warn(f"{cfg.model} is a GPU preset: on this CPU it needs about {describe_seconds(guess.seconds)} and "
                  f"{describe_bytes(guess.memory_bytes)}; --model small trains in minutes on a CPU "
                  "(Ctrl-C stops with a checkpoint, --resume continues)")
        free = free_memory(device)
        if free is not None and guess.memory_bytes > free:
            _warn(f"the run needs about {describe_bytes(guess.memory_bytes)} but {device} has "
                  f"{describe_bytes(free)} free; "
                  "a smaller --batch-size with a larger --grad-accum trains the same tokens per step in less memory")

    def _train_step(self, stop: StopRequest) -> bool:
        """One optimizer step; True when every rank should stop after it."""
        cfg, device = self.cfg, self.device
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = self.sampler.next()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1 or self.world == 1 or cfg.fsdp
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast():
                _, loss = self.model(x, y)
                if self.loss_hook is not None:
                    loss = self.loss_hook(self.step, loss)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
        loss_avg, stopping = loss_sum / cfg.grad_accum, bool(stop)
        if self.world > 1:  # the stop flag rides along, so every rank stops after the same step
            both = torch.stack([loss_avg, torch.tensor(float(stopping), device=device)])
            dist.all_reduce(both)
            loss_avg, stopping = both[0] / self.world, bool(both[1] > 0)
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
                     if cfg.grad_clip > 0 else torch.zeros(()))
        grad_norm = whole(grad_norm)
        self.last_loss = float(loss_avg)
        if not (math.isfinite(self.last_loss) and math.isfinite(float(grad_norm))):
            kept = latest_checkpoint(self.dir.path)
            what, value = ("loss", self.last_loss) if not math.isfinite(self.last_loss) else ("gradient norm",
                                                                                              float(grad_norm))
            raise NonFiniteLossError(
                f"{what} is {value} at step {self.step + 1}; training stopped. "
                + (f"The last good checkpoint is {kept}." if kept else "No checkpoint was written yet.")
                + " Try a lower --lr / --embed-lr or a longer --warmup.")
        self.lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.train_s += time.perf_counter() - t0
        return stopping

    def _log_step(self, bar: ProgressBar) -> None:
        tokens_per_s = self.trained_tokens / max(self.train_s, 1e-9)
        if self.main:
            self.log.append({"kind": "train", "step": self.step, "loss": self.last_loss, "lr": self.lrs[0],
                             "embed_lr": self.lrs[-1], "tokens": self.tokens_before + self.trained_tokens,
                             "train_tokens_per_s": tokens_per_s, "wall_s": self.wall_s})
        bar.update(self.step, loss=self.last_loss, train_tok_s=int(tokens_per_s))

    def _evaluate(self, bar: ProgressBar | None = None) -> float:
        cfg = self.cfg
        # FSDP: every rank evaluates every window, so all run the same sharded forwards.
        rank, world = (0, 1) if cfg.fsdp else (self.rank, self.world)
        progress = self._progress_bar("eval", -(-len(self.windows[rank::world]) // cfg.batch_size))
        val = evaluate(self.model, self.ds, self.windows, cfg.seq_len, cfg.batch_size, self.device, self.autocast,
                       rank, world, progress=lambda done, _: progress.update(done))
        progress.clear()
        self.val = (self.step, val)
        if self.main:
            self.log.append({"kind": "val", "step": self.step, "val_loss": val, "val_bpb": val * self.bits_per_nat,
                             "unigram_bpb": self.unigram})
            if self.eval_hook is not None:
                self.eval_hook(self.step, self.raw_model)
            line = (f"step {self.step}: val_loss {val:.4f}  val_bpb {val * self.bits_per_nat:.4f}  "
                    f"(unigram {self.unigram:.4f})")
            if bar is not None:
                bar.write(line, self.out)
            else:
                self.say(line)
        return val

    def _progress_bar(self, label: str, total: int) -> ProgressBar:
        """A bar for a phase between training steps (evaluation, the sample): a few lines off a terminal."""
        return ProgressBar(total, every=max(1, total // 4), enabled=self.main and self.cfg.progress, label=label)

    # ------------------------------------------------------------ outputs

    def finish(self, stop: StopRequest) -> dict:
        """Plot, sample and summary; returns the summary."""
        cfg = self.cfg
        if self.val is None or self.val[0] != self.step:  # nothing evaluated at this step yet
            self._evaluate()
        if stop:
            raise TrainingInterrupted(stop.signum, self.step, self.dir[CHECKPOINT_NAME])
        finished = self.step >= cfg.steps
        sample_model = unsharded_copy(self.raw_model) if finished and cfg.sample_tokens > 0 else None  # every rank
        try:
            # Rank 0's own work, after the step's checkpoint: a stop signal ends it at once.
            with stop.at_once():
                if self.main:
                    plot_losses(self.dir[LOG_NAME], self.dir[PLOT_NAME], baseline=self.unigram / self.bits_per_nat,
                                title=f"{cfg.model} {cfg.attention} {cfg.optimizer}")
                    if sample_model is not None:
                        self._write_sample(sample_model)
        except StopNow:
            raise TrainingInterrupted(stop.signum, self.step, self.dir[CHECKPOINT_NAME]) from None
        summary = self.summary(finished)
        if self.main:
            with atomic_write(self.dir[SUMMARY_NAME]) as f:
                f.write((json.dumps(summary, indent=1) + "\n").encode())
            self.say(format_summary(summary))
        return summary

    def _write_sample(self, model: GPT) -> None:
        cfg, ds = self.cfg, self.ds
        prompt_len = min(32, self.raw_model.config.block_size // 2, len(ds.val))
        prompt = torch.from_numpy(ds.val.read(0, 0, prompt_len)).to(self.device)[None]
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        progress = self._progress_bar("sample", cfg.sample_tokens)
        # Each new token passes lm_head once (a CUDA graph's replays do not run hooks: the bar then jumps).
        produced = model.lm_head.register_forward_hook(
            lambda *_: progress.update(min(progress.step + 1, progress.total)))
        try:
            tokens = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=None, generator=gen)
        finally:
            produced.remove()
        if progress.step < progress.total:
            progress.update(progress.total)
        progress.clear()
        text = ds.decode(tokens[0].tolist())
        with atomic_write(self.dir[SAMPLE_NAME]) as f:
            f.write(text.encode())
        self.say("---- sample (prompt: the first %d tokens of the val split) ----\n%s\n----" % (prompt_len, text))

    def summary(self, finished: bool) -> dict:
        """train_s / train_tokens_per_s: the training steps only (no evaluation,
        checkpoints or sampling); wall_s / tokens_per_s: this process's whole run."""
        val_loss = self.val[1]
        wall_s = self.wall_s
        return {
            "status": "done" if finished else "stopped",
            "step": self.step,
            "steps": self.cfg.steps,
            "val_loss": val_loss,
            "val_bpb": val_loss * self.bits_per_nat,
            "unigram_bpb": self.unigram,
            "bpb_ratio": val_loss * self.bits_per_nat / self.unigram,
            "train_loss": self.last_loss,
            "tokens": self.tokens_before + self.trained_tokens,
            "train_s": self.train_s,
            "train_tokens_per_s": self.trained_tokens / self.train_s if self.train_s > 0 else 0.0,
            "wall_s": wall_s,
            "tokens_per_s": self.trained_tokens / wall_s if wall_s > 0 else 0.0,
            "params": self.params,
            "world_size": self.world,
            "out": str(self.dir.path),
        }
