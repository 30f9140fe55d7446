"""Atomic, verified, safely loadable training checkpoints.

A checkpoint is one torch.save'd dict of plain containers and tensors
(model / optimizer / scheduler state_dicts, sampler position, RNG states).
It is written to a temp file in the same directory, fsync'd, verified (every
zip record's CRC and a weights_only load) and only then renamed over the old
one, which moves to `checkpoint.prev.pt`: a crash or a full disk mid-save
leaves the previous checkpoints intact, and a latest one that is later found
corrupt falls back to the one before. It loads with
torch.load(weights_only=True): no arbitrary code runs on load.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
PREVIOUS_NAME = "checkpoint.prev.pt"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or none that exists can be read."""


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


def save_checkpoint(state: dict, path: str | os.PathLike, *, keep_previous: str | os.PathLike | None = None) -> Path:
    """torch.save `state` to path atomically (temp file + fsync + verify + rename).

    With keep_previous, the checkpoint `path` held until now is moved there
    once the new one is complete and verified. A failed write raises
    OSError (e.g. a full disk) or CheckpointError and changes nothing.
    """
    def verify(tmp: Path) -> None:
        loaded = read_checkpoint(tmp)
        if loaded.get("step") != state.get("step"):
            raise CheckpointError(f"{path}: the file written reads back as step {loaded.get('step')}, "
                                  f"not {state.get('step')}")

    try:
        with atomic_write(path, verify=verify, keep_previous=keep_previous) as f:
            torch.save(state, f)
    except RuntimeError as e:  # torch's writer reports some I/O failures as RuntimeError
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot write {path}: {e}") from e
    return Path(path)


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint after checking every zip record's CRC (torch.load does
    not: a flipped byte would load silently). Raises CheckpointError naming the
    problem for a missing, truncated, corrupt or foreign file."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read, a device never end it
        raise CheckpointError(f"{path} is not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"{path} is corrupt (checksum mismatch in {bad})")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict")
    return state


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True (tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    path = Path(out_dir) / CHECKPOINT_NAME
    return path if path.is_file() else None


def load_latest_checkpoint(out_dir: str | os.PathLike, map_location="cpu",
                           required: dict[str, type | tuple[type, ...]] | None = None,
                           ) -> tuple[dict | None, Path | None, list[str]]:
    """The newest readable checkpoint of a run: (state, path, problems).

    Tries checkpoint.pt, then checkpoint.prev.pt; one that lacks a key of
    `required`, or holds a value not of its type there, is not readable.
    `problems` says why a newer one was skipped. (None, None, []) when the
    directory holds neither; raises CheckpointError when some exist but none
    is readable.
    """
    problems = []
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        path = Path(out_dir) / name
        if not path.exists():
            continue
        try:
            state = read_checkpoint(path, map_location)
            missing = [key for key in required or {} if key not in state]
            if missing:
                raise CheckpointError(f"{path} lacks {', '.join(missing)}")
            wrong = [key for key, kind in (required or {}).items()
                     if not isinstance(state[key], kind) or isinstance(state[key], bool)]
            if wrong:
                raise CheckpointError(f"{path} holds a {', '.join(wrong)} of the wrong type")
            return state, path, problems
        except CheckpointError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError("no readable checkpoint: " + "; ".join(problems))
    return None, None, []
