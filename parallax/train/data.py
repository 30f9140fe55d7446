"""Token streams for training: the stdlib corpus, text files, or uint16 .bin shards.

Every stream is a memory-mapped 1-D array (uint8 bytes or uint16 tokens),
never loaded whole. Text is cached once as a uint8 file; the stdlib corpus
and directories of text are split into train/val *by file* with a fixed
hash, so every machine with the same interpreter gets the same split.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write
from .config import ConfigError

SPLIT_SEED = "parallax-split-0"
VAL_FRACTION = 0.05
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
NANOGPT_SHARD_MAGIC = 20240520  # modded-nanogpt/llm.c shard header: 256 int32, tokens follow
_CHUNK = 1 << 22
SCAN_LIMIT = 1 << 28  # tokens per split read for the unigram baseline and the vocab size
SHARD_WORDS = {"train": {"train"}, "val": {"val", "valid", "validation"}}  # see `shard_split`


class DataError(ConfigError):
    """Unusable data (missing path, empty split, unknown format, token ids past
    the vocabulary, an unwritable cache); `flag` names the flag to fix."""

    def __init__(self, message: str, flag: str = "--data"):
        super().__init__(flag, message)


@dataclass
class Stream:
    """One split: a list of memory-mapped token arrays (shards)."""

    shards: list[np.ndarray]

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def windows(self, n: int) -> np.ndarray:
        """Number of valid window starts of n tokens per shard."""
        return np.array([max(0, len(s) - n + 1) for s in self.shards], dtype=np.int64)

    def read(self, shard: int, start: int, n: int) -> np.ndarray:
        return np.asarray(self.shards[shard][start:start + n], dtype=np.int64)


@dataclass
class Dataset:
    train: Stream
    val: Stream
    vocab_size: int
    byte_level: bool  # tokens are UTF-8 bytes: bits per token == bits per byte
    description: str
    info: dict = field(default_factory=dict)

    def decode(self, tokens) -> str:
        if self.byte_level:
            return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")
        return " ".join(str(int(t)) for t in tokens)

    def encode(self, text: str) -> list[int]:
        if not self.byte_level:
            raise ValueError("encode needs a byte-level dataset")
        return list(text.encode("utf-8"))


def default_cache_dir() -> Path:
    env = os.environ.get("PARALLAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "parallax"


def _split_hash(name: str) -> bytes:
    # surrogateescape: a file name that is not UTF-8 hashes as its raw bytes.
    return hashlib.sha256(f"{SPLIT_SEED}:{name}".encode("utf-8", "surrogateescape")).digest()


def _is_val(name: str) -> bool:
    return int.from_bytes(_split_hash(name)[:8], "big") / 2 ** 64 < VAL_FRACTION


def split_files(names: list[str]) -> tuple[list[str], list[str]]:
    """Split sorted relative names into (train, val) by a fixed hash of each name.

    The split depends only on a name, not on which other files exist; with
    at least two files both sides are non-empty (the lowest-hash file moves).
    """
    names = sorted(names)
    val = [n for n in names if _is_val(n)]
    train = [n for n in names if not _is_val(n)]
    if len(names) >= 2 and (not val or not train):
        src, dst = (train, val) if not val else (val, train)
        mover = min(src, key=_split_hash)
        src.remove(mover)
        dst.append(mover)
    return sorted(train), sorted(val)


def _atomic_concat(root: Path, names: list[str], dest: Path) -> None:
    """Write the bytes of root/name for each name, newline-separated, to dest atomically."""
    try:
        with atomic_write(dest) as out:
            for name in names:
                try:
                    f = open(root / name, "rb")
                except OSError as e:
                    raise DataError(f"cannot read {root / name}: {e.strerror}") from None
                with f:
                    while chunk := f.read(_CHUNK):
                        out.write(chunk)
                out.write(b"\n")
    except OSError as e:
        raise DataError(f"cannot write the data cache {dest.parent}: {e.strerror}", flag="--cache-dir") from None


def _memmap(path: Path, dtype=np.uint8, offset: int = 0) -> np.ndarray:
    if path.stat().st_size <= offset:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset)


def _build_cached_text(root: Path, names: list[str], cache_dir: Path, tag: str) -> tuple[Stream, Stream, dict]:
    train_names, val_names = split_files(names)
    stamp = [(n, (root / n).stat().st_size, (root / n).stat().st_mtime_ns) for n in sorted(names)]
    key = hashlib.sha256(json.dumps([str(root.resolve()), stamp]).encode()).hexdigest()[:16]
    folder = cache_dir / f"{tag}-{key}"
    out = {}
    for split, chosen in (("train", train_names), ("val", val_names)):
        path = folder / f"{split}.u8"
        try:
            cached = path.exists()
        except OSError as e:  # a name too long, say
            raise DataError(f"cannot use the data cache {folder}: {e.strerror}", flag="--cache-dir") from None
        if not cached:
            _atomic_concat(root, chosen, path)
        out[split] = Stream([_memmap(path)])
    info = {"files_train": len(train_names), "files_val": len(val_names), "cache": str(folder)}
    return out["train"], out["val"], info


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> tuple[Path, list[str]]:
    """The standard library's *.py files (no site-packages, no test dirs), sorted."""
    root = stdlib_root()
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        rel = Path(dirpath).relative_to(root)
        names.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    return root, sorted(names)


def stdlib_dataset(cache_dir: Path | None = None) -> Dataset:
    root, names = stdlib_files()
    if len(names) < 2:
        raise DataError(f"found no Python standard library sources under {root}")
    tag = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}"
    train, val, info = _build_cached_text(root, names, Path(cache_dir or default_cache_dir()), tag)
    return Dataset(train, val, 256, True, f"Python {sys.version.split()[0]} standard library sources", info)


def _regular_file(path: Path) -> Path:
    """`path`, if it is a regular file (or a link to one): a FIFO would block
    the read and a device such as /dev/zero never end it."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is not a regular file (a FIFO, socket or device); move it out of the data")
    return path


def _text_files(root: Path) -> list[str]:
    """The non-hidden files under root (links to directories are not followed), sorted."""
    def unreadable(e: OSError):  # os.walk would skip the directory silently
        raise DataError(f"cannot read {e.filename}: {e.strerror}")

    names = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        names.extend((rel / f).as_posix() for f in filenames
                     if not f.startswith(".") and _regular_file(Path(dirpath) / f))
    return sorted(names)


def _positional_split(path: Path) -> tuple[Stream, Stream]:
    data = _memmap(path)
    cut = int(len(data) * (1 - VAL_FRACTION * 2))  # 90 / 10
    return Stream([data[:cut]]), Stream([data[cut:]])


def _shard_array(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        raw = f.read(12)
    head = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=np.int32)
    size = path.stat().st_size
    offset = 256 * 4 if len(head) == 3 and head[0] == NANOGPT_SHARD_MAGIC else 0
    if (size - offset) % 2:
        raise DataError(f"{path} holds {size - offset} bytes of tokens, not a whole number of uint16 tokens")
    tokens = _memmap(path, np.uint16, offset=offset)
    if offset:
        count = int(head[2])
        if not 0 <= count <= len(tokens):
            raise DataError(f"{path}: its header announces {count} tokens but the file holds {len(tokens)}")
        tokens = tokens[:count]
    return tokens


def _chunks(stream: Stream, limit: int | None = None):
    """Consecutive pieces of a stream, at most `limit` (default SCAN_LIMIT) tokens in all (spread over its shards)."""
    limit = SCAN_LIMIT if limit is None else limit
    per_shard = max(1, limit // max(1, len(stream.shards)))
    for shard in stream.shards:
        for i in range(0, min(len(shard), per_shard), _CHUNK):
            yield np.asarray(shard[i:min(i + _CHUNK, per_shard)])


def _max_token(streams: list[Stream]) -> int:
    return max((int(c.max()) for stream in streams for c in _chunks(stream) if len(c)), default=0)


def shard_split(name: str) -> str | None:
    """'train' or 'val' for a .bin shard's file name, by the words of its stem
    (split at '_', '-' and '.', any case): the word train makes a train shard,
    val, valid or validation a val shard. None when neither or both appear."""
    words = set(re.split(r"[_.-]", name.removesuffix(".bin").lower()))
    found = [split for split, marks in SHARD_WORDS.items() if words & marks]
    return found[0] if len(found) == 1 else None


def _bin_dataset(files: list[Path], where: Path, vocab_size: int | None) -> Dataset:
    for f in files:
        if shard_split(f.name) is None:
            raise DataError(f"{f}: cannot tell whether this shard is train or val data; its name must hold exactly "
                            "one of the words train, val (words are separated by _ - .), e.g. fineweb_train_000001.bin")
        _regular_file(f)
    train = [f for f in files if shard_split(f.name) == "train"]
    val = [f for f in files if shard_split(f.name) == "val"]
    if not train or not val:
        raise DataError(f"{where}: .bin shards must include train and val files (e.g. train.bin and val.bin)")
    tr, va = Stream([_shard_array(f) for f in train]), Stream([_shard_array(f) for f in val])
    top = _max_token([tr, va])
    if vocab_size is None:
        vocab_size = -(-(top + 1) // 64) * 64
    elif top >= vocab_size:
        raise DataError(f"{where} holds token id {top}, at or above --vocab-size {vocab_size}", flag="--vocab-size")
    if vocab_size > 65536:
        raise DataError(f"{where}: vocabulary of {vocab_size} does not fit uint16 tokens")
    desc = f"uint16 token shards in {where} ({len(train)} train, {len(val)} val)"
    return Dataset(tr, va, vocab_size, False, desc, {"shards_train": len(train), "shards_val": len(val)})


def load_dataset(path: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                 vocab_size: int | None = None) -> Dataset:
    """The training data.

    path=None: the stdlib corpus. A text file: bytes, first 90% train, last
    10% val. A directory holding *.bin files: nanoGPT uint16 shards (files
    named *train*.bin / *val*.bin; the modded-nanogpt 1 KiB header is
    skipped). Any other directory: its text files as bytes, split by file.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        return _load_dataset(path, cache, vocab_size)
    except OSError as e:  # unreadable files: name the file, no traceback
        raise DataError(f"cannot read {e.filename or path}: {e.strerror}") from None


def _load_dataset(path, cache: Path, vocab_size: int | None) -> Dataset:
    if path is None:
        return stdlib_dataset(cache)
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p} does not exist")
    if not p.is_dir():
        _regular_file(p)
        if p.suffix == ".bin":
            raise DataError(f"{p}: pass the directory holding the train/val .bin shards")
        if vocab_size is not None:
            raise DataError(f"{p} is text (bytes, vocabulary 256); --vocab-size only applies to .bin token shards",
                            flag="--vocab-size")
        train, val = _positional_split(p)
        if len(val) < 2:
            raise DataError(f"{p} is too small to split into train and val")
        return Dataset(train, val, 256, True, f"text file {p}", {"bytes": len(train) + len(val)})
    bins = sorted(f for f in p.iterdir() if f.suffix == ".bin" and not f.is_dir())
    if bins:
        return _bin_dataset(bins, p, vocab_size)
    if vocab_size is not None:
        raise DataError(f"{p} holds text (bytes, vocabulary 256); --vocab-size only applies to .bin token shards",
                        flag="--vocab-size")
    names = _text_files(p)
    if not names:
        raise DataError(f"{p} holds no files")
    if len(names) == 1:
        train, val = _positional_split(p / names[0])
        return Dataset(train, val, 256, True, f"text file {p / names[0]}", {})
    train, val, info = _build_cached_text(p, names, cache, "text")
    return Dataset(train, val, 256, True, f"{len(names)} text files in {p}", info)


def unigram_bits(ds: Dataset) -> float:
    """Cross-entropy (bits per token) of the val split under the train split's
    token frequencies with add-one smoothing: the best a model that ignores
    context can do, measured like the model's val loss. Splits longer than
    SCAN_LIMIT tokens are counted on their first SCAN_LIMIT tokens (spread
    over the shards)."""
    counts = [np.zeros(ds.vocab_size, dtype=np.int64) for _ in range(2)]
    for c, stream in zip(counts, (ds.train, ds.val)):
        for chunk in _chunks(stream):
            c += np.bincount(chunk, minlength=ds.vocab_size)[: ds.vocab_size]
    train, val = counts
    p = (train + 1) / (train.sum() + ds.vocab_size)
    return float(-(val * np.log2(p)).sum() / max(1, val.sum()))


class BatchSampler:
    """Random windows of seq_len + 1 tokens from a stream.

    Batch n is drawn from a torch.Generator seeded with (seed, rank, n), so
    the sampler's whole state is the count of batches drawn: same seed, same
    batches, and a restored count continues exactly where a run stopped.
    """

    def __init__(self, stream: Stream, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0,
                 vocab_size: int | None = None):
        self.stream, self.batch_size, self.seq_len, self.vocab_size = stream, batch_size, seq_len, vocab_size
        self.seed, self.rank, self.count = seed, rank, 0
        self.valid = stream.windows(seq_len + 1)
        if self.valid.sum() < 1:
            raise DataError(f"split of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
        self.cum = np.cumsum(self.valid)
        self.generator = torch.Generator()

    def state_dict(self) -> dict:
        return {"count": self.count, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Folded into [0, 2**63) so any seed works; smaller values (seed 0's included) are unchanged.
        self.generator.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_000_007 + self.count) % 2**63)
        self.count += 1
        total = int(self.cum[-1])
        picks = torch.randint(total, (self.batch_size,), generator=self.generator).numpy()
        shard = np.searchsorted(self.cum, picks, side="right")
        starts = picks - np.concatenate(([0], self.cum))[shard]
        rows = np.stack([self.stream.read(int(s), int(o), self.seq_len + 1) for s, o in zip(shard, starts)])
        check_token_ids(rows, self.vocab_size)
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]


def check_token_ids(rows: np.ndarray, vocab_size: int | None) -> None:
    """Token ids past the vocabulary would index outside the embedding; the
    up-front scan reads at most SCAN_LIMIT tokens, so batches are checked too."""
    if vocab_size is not None and rows.size and int(rows.max()) >= vocab_size:
        raise DataError(f"a batch holds token id {int(rows.max())}, at or above the vocabulary size {vocab_size}",
                        flag="--vocab-size")


def eval_windows(stream: Stream, seq_len: int, count: int) -> list[tuple[int, int]]:
    """`count` fixed (shard, start) windows of seq_len + 1 tokens spread evenly over a split."""
    valid = stream.windows(seq_len + 1)
    total = int(valid.sum())
    if total < 1:
        raise DataError(f"val split of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    cum = np.cumsum(valid)
    count = max(1, min(count, math.ceil(total / (seq_len + 1)) if total > seq_len else 1))
    picks = np.linspace(0, total - 1, count).astype(np.int64)
    shard = np.searchsorted(cum, picks, side="right")
    starts = picks - np.concatenate(([0], cum))[shard]
    return [(int(s), int(o)) for s, o in zip(shard, starts)]
