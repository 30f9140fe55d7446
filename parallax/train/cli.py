"""`python train.py`: parse flags into a TrainConfig and call `train`.

Every failure prints one line on stderr, never a traceback:
- status 2: a bad flag, unusable data or --out, or a --resume that does not
  fit the checkpoint; nothing was trained.
- status 1: a NaN/inf loss, or an output that could not be written (a full
  disk); the newest complete checkpoint is kept.
- status 128 + N: stopped by signal N (SIGINT 130, SIGTERM 143); after the
  first signal a checkpoint is saved at the end of the current step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..models.config import ATTENTION_KINDS, PRESETS
from .checkpoint import CheckpointError
from .config import DTYPES, OPTIMIZERS, PRESET_DEFAULTS, ConfigError, TrainConfig
from .schedule import SCHEDULES

PROG = "train.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block, the flag first
        if message.startswith("argument "):
            message = message[len("argument "):]
            flag, _, rest = message.partition(": ")
            message = f"{flag.split('/')[0]}: {rest}"
        elif message.startswith("unrecognized arguments: "):
            message = f"{message[len('unrecognized arguments: '):]}: unknown flag (see --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bool_flag(parser, name: str, help: str, default: bool) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog=PROG, description="Train a small GPT (Parallax or softmax attention) with Muon.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, help=f"preset: {', '.join(PRESETS)}")
    g.add_argument("--attention", default=d.attention, help=f"{' or '.join(ATTENTION_KINDS)}")
    _bool_flag(g, "parameter-matched", "widen a softmax model's MLP to the Parallax model's parameter count",
               d.parameter_matched)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data,
                   help="text file, directory of text files, or directory of uint16 train/val .bin shards "
                        "(default: the Python standard library's sources, no download)")
    g.add_argument("--cache-dir", default=d.cache_dir, help="where text corpora are cached (default $PARALLAX_CACHE "
                                                            "or ~/.cache/parallax)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size, help=".bin shards: vocabulary size "
                                                                         "(default: max token + 1, rounded up to 64)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default=d.optimizer, help=f"{' or '.join(OPTIMIZERS)} (Muon: hidden matrices; "
                                                            "AdamW: embeddings, lm_head, gains)")
    g.add_argument("--lr", type=float, default=d.lr, help="lr of hidden matrices (default 0.03 Muon, 3e-3 AdamW)")
    g.add_argument("--embed-lr", "--adamw-lr", dest="embed_lr", type=float, default=d.embed_lr,
                   help="AdamW lr of embeddings, lm_head and gains")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay of hidden matrices")
    g.add_argument("--momentum", type=float, default=d.momentum, help="Muon momentum")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    g.add_argument("--schedule", default=d.schedule, help=f"{', '.join(SCHEDULES)} (all with linear warmup)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="warmup steps")
    g.add_argument("--cooldown", type=float, default=d.cooldown, help="wsd: fraction of steps in the final decay")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step per process")
    g.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="tokens per sequence, at most the model's block_size (default: the preset's, "
                        + ", ".join(f"{m} {v['seq_len']}" for m, v in PRESET_DEFAULTS.items()) + ")")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of the schedule")
    g.add_argument("--stop-after", type=int, default=d.stop_after,
                   help="stop at this step of the schedule, checkpoint and exit (continue with --resume)")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between val evaluations")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches, help="val batches per evaluation")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="steps between checkpoints (default: eval-every)")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines off a terminal")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="tokens of the final text sample")
    _bool_flag(g, "progress", "show the progress bar", d.progress)
    g = p.add_argument_group("system")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--dtype", default=d.dtype, help=f"{', '.join(DTYPES)} (auto: bf16 autocast on GPU, fp32 on CPU)")
    _bool_flag(g, "compile", "torch.compile the model", d.compile)
    _bool_flag(g, "fsdp", "under torchrun, shard the model with FSDP2 instead of replicating it (DDP)", d.fsdp)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--out", default=d.out, help="output directory: log.jsonl, loss.png, sample.txt, checkpoint.pt")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous run in --out")
    g.add_argument("--export-hf", default=d.export_hf, metavar="DIR",
                   help="at the end, write the model as a transformers directory (AutoModelForCausalLM; see docs/hf.md)")
    return p


def parse_config(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    cfg.validate()
    if cfg.data is not None and not Path(cfg.data).exists():
        raise ConfigError("--data", f"{cfg.data} does not exist")
    return cfg


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return status


def main(argv=None) -> int:
    from .loop import NonFiniteLossError, TrainingInterrupted, train

    try:
        cfg = parse_config(argv)
        train(cfg)
    except ConfigError as e:  # DataError included
        return _fail(str(e), 2)
    except NonFiniteLossError as e:
        return _fail(str(e), 1)
    except TrainingInterrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except KeyboardInterrupt:
        return _fail("interrupted; the newest complete checkpoint is intact, continue with --resume", 130)
    except (OSError, CheckpointError) as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        what = e.strerror if getattr(e, "strerror", None) else e
        return _fail(f"cannot write the run's outputs: {where}{what}; the newest complete checkpoint is intact, "
                     "free space (or fix the problem) and continue with --resume", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
