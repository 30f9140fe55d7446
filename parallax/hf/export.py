"""Export a train.py checkpoint to a transformers model directory.

    python -m parallax.hf.export runs/default exported/     # a run directory (its checkpoint.pt)
    python -m parallax.hf.export runs/default/checkpoint.pt exported/

The directory holds config.json, generation_config.json and model.safetensors;
`AutoModelForCausalLM.from_pretrained(dir)` loads it once `parallax.hf` is
imported. It is written next to its final place and renamed into it, so an
interrupted export never leaves a half-written model.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..models import GPT, GPTConfig
from ..train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from .modeling import ParallaxConfig, ParallaxForCausalLM


def save_pretrained_gpt(model: GPT, out_dir: str | os.PathLike) -> Path:
    """Write `model` (a parallax GPT) as a ParallaxForCausalLM directory, replacing out_dir atomically."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a parallax.models.GPT, got {type(model).__name__}")
    hf_model = ParallaxForCausalLM(ParallaxConfig.from_gpt_config(model.config))
    hf_model.transformer.load_state_dict(model.state_dict())
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(staging)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export a train.py checkpoint file, or the checkpoint of a run directory, to out_dir."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} is not a file (pass a checkpoint.pt or a train.py --out directory)")
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ValueError(f"checkpoint: {path} is not a train.py checkpoint (no 'model' / 'model_config')")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return save_pretrained_gpt(model, out_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallax.hf.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a train.py checkpoint.pt, or the --out directory of a run")
    parser.add_argument("out_dir", help="the model directory to write")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
