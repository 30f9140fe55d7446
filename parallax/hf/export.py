"""Export a train.py checkpoint to a transformers model directory.

    python -m parallax.hf.export runs/default exported/     # a run directory (its newest readable checkpoint)
    python -m parallax.hf.export runs/default/checkpoint.pt exported/

The directory gets what `save_pretrained` writes for a `ParallaxForCausalLM`
(config.json, generation_config.json, model.safetensors);
`AutoModelForCausalLM.from_pretrained(dir)` loads it once `parallax.hf` is
imported. The directory must be new, empty, or a previous export, and lie
neither inside nor around the checkpoint it comes from: the export writes
only its own files, each through `train.atomic.atomic_write` (a reader sees
the old file or the whole new one; an interrupted export is completed by
running it again). Checkpoints are read as `train.py --resume` reads them:
every zip record's CRC is checked, and a run directory whose newest
checkpoint is damaged falls back to the one before.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from transformers.utils import logging as hf_logging

from ..models import GPT, GPTConfig
from ..train.atomic import atomic_write, temp_file_target
from ..train.checkpoint import CHECKPOINT_NAME, CheckpointError, load_latest_checkpoint, read_checkpoint
from .modeling import ParallaxConfig, ParallaxForCausalLM

PROG = "python -m parallax.hf.export"
# What save_pretrained writes for our model: config, generation config, and the weights (sharded when large).
EXPORT_FILE = re.compile(r"(config|generation_config)\.json|model(-\d+-of-\d+)?\.safetensors"
                         r"|model\.safetensors\.index\.json")
REQUIRED = {"model": dict, "model_config": dict}  # key -> type, as load_latest_checkpoint takes it


class ExportError(ValueError):
    """The export cannot go where it was asked to, or its checkpoint cannot be exported."""


class Export(NamedTuple):
    out: Path  # the model directory
    checkpoint: Path  # the checkpoint file exported
    skipped: list[str]  # why newer checkpoints of the run were passed over


def _own(name: str) -> bool:
    """A file an export writes (or atomic_write's temp file of one, left by an export that was killed)."""
    return EXPORT_FILE.fullmatch(temp_file_target(name) or name) is not None


def _is_export(directory: Path) -> bool:
    config = directory / "config.json"
    if config.is_symlink() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == ParallaxConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


def check_export_dir(out_dir: str | os.PathLike, keep_out_of=()) -> Path:
    """The resolved directory an export may write to; ExportError unless it is
    new, empty or holds only a previous export (no other file, no link), and
    neither equals, contains nor lies inside a path of `keep_out_of` (a run's
    --out, its data and cache, the checkpoint exported)."""
    if not str(out_dir).strip():
        raise ExportError("the export directory must be a path, got ''")
    try:
        return _check_export_dir(Path(out_dir), keep_out_of)
    except (OSError, RuntimeError) as e:  # a name too long, a folder it may not list, a link loop
        raise ExportError(f"cannot use {getattr(e, 'filename', None) or out_dir}: "
                          f"{getattr(e, 'strerror', None) or e}") from None


def _check_export_dir(out: Path, keep_out_of) -> Path:
    target = out.resolve()
    if target.exists() and not target.is_dir():
        raise ExportError(f"{out} is a file, not a directory")
    for path in keep_out_of:
        other = Path(path).resolve()
        relation = ("is" if target == other else "holds" if other.is_relative_to(target)
                    else "lies inside" if target.is_relative_to(other) else None)
        if relation is not None:
            raise ExportError(f"{out} {relation} {path}; export to a directory of its own")
    if target.is_dir():
        entries = sorted(target.iterdir())
        foreign = [p.name for p in entries if not (_own(p.name) and p.is_file() and not p.is_symlink())]
        if entries and (foreign or not _is_export(target)):
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "") if foreign else "no config.json"
            raise ExportError(f"{out} is not empty and not a parallax export ({shown}); export to a new or empty "
                              "directory")
    return target


@contextlib.contextmanager
def _no_progress_bar():
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_pretrained_gpt(model: GPT, out_dir: str | os.PathLike, keep_out_of=()) -> Path:
    """Write `model` (a parallax GPT) as a ParallaxForCausalLM directory (see the module docstring)."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a parallax.models.GPT, got {type(model).__name__}")
    target = check_export_dir(out_dir, keep_out_of)
    hf_model = ParallaxForCausalLM(ParallaxConfig.from_gpt_config(model.config))
    hf_model.transformer.load_state_dict(model.state_dict())
    with tempfile.TemporaryDirectory(prefix="parallax-export-") as staging:
        with _no_progress_bar():  # the export reports itself in one line
            hf_model.save_pretrained(staging)
        # config.json first: a folder an interrupted export leaves is still recognised as an export.
        names = sorted(os.listdir(staging), key=lambda name: name != "config.json")
        unknown = [name for name in names if not EXPORT_FILE.fullmatch(name)]
        if unknown:
            raise RuntimeError(f"save_pretrained wrote files an export does not know: {', '.join(unknown)}")
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            with open(Path(staging) / name, "rb") as source, atomic_write(target / name) as f:
                shutil.copyfileobj(source, f)
    for stale in target.iterdir():  # a previous export's files this one did not write (its shards, temp files)
        if _own(stale.name) and stale.name not in names:
            stale.unlink()
    return Path(out_dir)


def _read(checkpoint: Path) -> tuple[dict, Path, list[str]]:
    try:
        is_dir, exists = checkpoint.is_dir(), checkpoint.exists()
    except OSError as e:  # a name too long, say
        raise ExportError(f"cannot read {checkpoint}: {e.strerror or e}") from None
    if is_dir:
        try:
            state, path, skipped = load_latest_checkpoint(checkpoint, required=REQUIRED)
        except CheckpointError as e:
            raise ExportError(str(e)) from None
        if state is None:
            raise ExportError(f"{checkpoint} holds no {CHECKPOINT_NAME} (pass a train.py --out directory or a "
                              "checkpoint file)")
        return state, path, skipped
    if not exists:
        raise ExportError(f"{checkpoint} does not exist (pass a checkpoint.pt or a train.py --out directory)")
    try:
        state = read_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise ExportError(f"{checkpoint} is not a train.py checkpoint (no {', '.join(missing)})")
    return state, checkpoint, []


def _model(state: dict, path: Path) -> GPT:
    wrong = [key for key, kind in REQUIRED.items() if not isinstance(state[key], kind)]
    if wrong:
        raise ExportError(f"{path}: {', '.join(wrong)} is not a dict")
    fields = state["model_config"]
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        raise ExportError(f"{path}: model_config has fields this version of parallax does not know "
                          f"({', '.join(map(str, unknown))}); export it with the parallax that wrote it")
    try:
        model = GPT(GPTConfig(**fields))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        why = " ".join(str(e).split())[:300]
        raise ExportError(f"{path}: the weights do not fit its model_config: {why}") from None
    return model


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, keep_out_of=()) -> Export:
    """Export a train.py checkpoint file, or the newest readable checkpoint of a
    run directory, to out_dir (also kept out of `keep_out_of`, see
    `check_export_dir`). Raises ExportError for anything but an I/O failure."""
    source = Path(checkpoint)
    check_export_dir(out_dir, (source, *keep_out_of))  # before the checkpoint is read
    state, path, skipped = _read(source)
    return Export(save_pretrained_gpt(_model(state, path), out_dir, (source, *keep_out_of)), path, skipped)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a train.py checkpoint.pt, or the --out directory of a run")
    parser.add_argument("out_dir", help="the model directory to write: new, empty, or a previous export")
    args = parser.parse_args(argv)
    try:
        result = export_checkpoint(args.checkpoint, args.out_dir)
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: cannot write the export: {e.filename or args.out_dir}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    for problem in result.skipped:
        print(f"{PROG}: warning: {problem}; exported the checkpoint before it", file=sys.stderr)
    print(f"exported {result.checkpoint} to {result.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
