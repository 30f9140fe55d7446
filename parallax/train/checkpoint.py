"""Atomic, safely loadable training checkpoints.

A checkpoint is one torch.save'd dict of plain containers and tensors
(model / optimizer / scheduler state_dicts, sampler position, RNG states),
written to a temp file in the same directory, fsync'd and renamed over the
old one, so a crash mid-save leaves the previous checkpoint intact. It loads
with torch.load(weights_only=True): no arbitrary code runs on load.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    """Python, numpy and torch (CPU + CUDA) RNG states in weights_only-loadable form."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
                         "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])})
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """torch.save `state` to path atomically (temp file + fsync + rename)."""
    with atomic_write(path) as f:
        torch.save(state, f)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True (tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    path = Path(out_dir) / CHECKPOINT_NAME
    return path if path.is_file() else None
