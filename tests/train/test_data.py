import math
import os

import numpy as np
import pytest
import torch

from parallax.train.data import (
    NANOGPT_SHARD_MAGIC, BatchSampler, DataError, eval_windows, load_dataset, shard_split, split_files, stdlib_files,
    unigram_bits,
)


def test_split_files_is_fixed_and_non_empty():
    names = [f"pkg/mod{i}.py" for i in range(200)]
    train, val = split_files(list(reversed(names)))
    assert (train, val) == split_files(names)
    assert set(train) | set(val) == set(names) and not set(train) & set(val)
    assert 2 <= len(val) <= 25
    # a file's side does not depend on the other files
    train2, val2 = split_files(names[:100])
    assert set(val2) == set(val) & set(names[:100]) or len(val2) == 1
    for pair in (["a", "b"], ["x.py", "y.py"]):
        t, v = split_files(pair)
        assert len(t) == len(v) == 1


def test_stdlib_corpus(tmp_path):
    root, names = stdlib_files()
    assert names == sorted(names) and "os.py" in names
    assert not any("site-packages" in n or n.startswith("test/") for n in names)
    ds = load_dataset(None, cache_dir=tmp_path)
    assert ds.byte_level and ds.vocab_size == 256
    assert len(ds.train) > 1_000_000 and len(ds.val) > 50_000
    assert ds.train.shards[0].dtype == np.uint8 and isinstance(ds.train.shards[0], np.memmap)
    bits = unigram_bits(ds)
    assert 4.0 < bits < 5.5
    again = load_dataset(None, cache_dir=tmp_path)  # the cache is reused
    assert len(again.val) == len(ds.val)


def test_text_file_splits_by_position(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(bytes(range(256)) * 40)
    ds = load_dataset(path, cache_dir=tmp_path / "cache")
    assert len(ds.train) + len(ds.val) == 256 * 40
    assert len(ds.val) == pytest.approx(0.1 * 256 * 40, abs=2)
    assert ds.decode([104, 105]) == "hi"


def test_directory_of_text_files(tmp_path):
    src = tmp_path / "texts"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / ("sub" if i % 2 else "") / f"f{i}.txt").write_text(f"file {i}\n" * 50)
    (src / ".hidden").write_text("skip me")
    ds = load_dataset(src, cache_dir=tmp_path / "cache")
    total = sum(len(f"file {i}\n" * 50) + 1 for i in range(30))  # newline between files
    assert len(ds.train) + len(ds.val) == total
    assert len(ds.val) > 0 and len(ds.train) > len(ds.val)
    assert b"skip" not in bytes(np.asarray(ds.train.shards[0]))


def test_bin_shards_with_and_without_header(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, size=5000).astype(np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    tokens[:1000].tofile(tmp_path / "val.bin")
    ds = load_dataset(tmp_path)
    assert not ds.byte_level and ds.vocab_size == 1024  # max token + 1, rounded up to 64
    assert len(ds.train) == 5000 and ds.train.shards[0].dtype == np.uint16
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (NANOGPT_SHARD_MAGIC, 1, 700)
    other = tmp_path / "fw"
    other.mkdir()
    for name, n in (("fineweb_train_000001.bin", 700), ("fineweb_train_000002.bin", 700), ("fineweb_val_000000.bin", 700)):
        with open(other / name, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens[:n].tobytes())
    ds = load_dataset(other, vocab_size=50304)
    assert ds.vocab_size == 50304 and len(ds.train.shards) == 2 and len(ds.train) == 1400
    np.testing.assert_array_equal(ds.val.read(0, 0, 700), tokens[:700])
    x, y = BatchSampler(ds.train, 8, 64).next()
    assert x.shape == (8, 64) and x.max() < 1000


def test_bad_data(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        load_dataset(tmp_path / "empty")
    only = tmp_path / "only"
    only.mkdir()
    np.zeros(10, dtype=np.uint16).tofile(only / "train.bin")
    with pytest.raises(DataError, match="val"):
        load_dataset(only)


def test_sampler_is_deterministic_and_resumable(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000).astype(np.uint8).tobytes())
    ds = load_dataset(path)
    a, b = BatchSampler(ds.train, 4, 32, seed=1), BatchSampler(ds.train, 4, 32, seed=1)
    batches = [a.next() for _ in range(5)]
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert all(torch.equal(p[0], b.next()[0]) for p in batches)
    c = BatchSampler(ds.train, 4, 32, seed=1)
    c.load_state_dict(BatchSampler(ds.train, 4, 32, seed=1).state_dict() | {"count": 3})
    assert torch.equal(c.next()[0], batches[3][0])
    other_rank = BatchSampler(ds.train, 4, 32, seed=1, rank=1)
    assert not torch.equal(other_rank.next()[0], batches[0][0])
    with pytest.raises(DataError, match="shorter"):
        BatchSampler(ds.val, 1, len(ds.val))


def test_unigram_bits_and_eval_windows(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"ab" * 5000)
    ds = load_dataset(path)
    # train and val are half a, half b; add-one smoothing over 256 bytes
    n = len(ds.train)
    assert unigram_bits(ds) == pytest.approx(-math.log2((n / 2 + 1) / (n + 256)), rel=1e-9)
    windows = eval_windows(ds.val, 16, 10)
    assert len(windows) == 10 and windows == eval_windows(ds.val, 16, 10)
    assert all(o + 17 <= len(ds.val) for _, o in windows)
    assert windows[0][1] == 0 and windows[-1][1] == len(ds.val) - 17
    assert math.isfinite(unigram_bits(ds))


@pytest.mark.parametrize("name,split", [
    ("train.bin", "train"), ("val.bin", "val"), ("fineweb_train_000001.bin", "train"),
    ("fineweb_val_000000.bin", "val"), ("retrieval_train.bin", "train"), ("TinyStories-valid.bin", "val"),
    ("wiki.validation.bin", "val"), ("trainval.bin", None), ("train_val.bin", None), ("retrieval.bin", None),
    ("interval_train.bin", "train"), ("evaluate.bin", None), ("training.bin", None),
])
def test_shard_split_is_by_whole_words(name, split):
    assert shard_split(name) == split


@pytest.mark.parametrize("bad", ["trainval.bin", "train_val.bin", "tokenizer.bin"])
def test_a_shard_in_both_splits_or_neither_is_refused(tmp_path, bad):
    for name in ("retrieval_train.bin", "retrieval_val.bin", bad):
        np.arange(100, dtype=np.uint16).tofile(tmp_path / name)
    with pytest.raises(DataError, match=rf"{bad}: cannot tell whether this shard is train or val"):
        load_dataset(tmp_path)
    (tmp_path / bad).unlink()
    ds = load_dataset(tmp_path)
    assert ds.info == {"shards_train": 1, "shards_val": 1}  # retrieval_train.bin is not val data


def test_file_names_that_are_not_utf8(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, name in enumerate([b"caf\xe9.txt", b"\xff\xfe.txt", b"plain.txt"]):
        with open(bytes(folder) + b"/" + name, "wb") as f:
            f.write(b"text %d\n" % i * 50)
    ds = load_dataset(folder, cache_dir=tmp_path / "cache")
    assert len(ds.train) + len(ds.val) == 3 * (len(b"text 0\n") * 50 + 1)


def fifo(path):
    os.mkfifo(path)


def dev_zero(path):
    os.symlink("/dev/zero", path)


def dangling(path):
    os.symlink(path.parent / "nowhere", path)


@pytest.mark.parametrize("make", [fifo, dev_zero, dangling])
@pytest.mark.parametrize("layout", ["text", "shards", "itself"])
def test_data_that_is_no_regular_file_is_refused_not_read(tmp_path, make, layout):
    """A FIFO would block the read forever and /dev/zero never end it (filling the cache's disk)."""
    folder = tmp_path / "data"
    folder.mkdir()
    if layout == "text":
        (folder / "a.txt").write_text("text\n" * 100)
        odd = folder / "b.txt"
    elif layout == "shards":
        np.arange(100, dtype=np.uint16).tofile(folder / "train.bin")
        odd = folder / "val.bin"
    else:
        odd = folder / "corpus.txt"
    make(odd)
    with pytest.raises(DataError, match=rf"{odd.name}"):
        load_dataset(odd if layout == "itself" else folder, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.u8"))
