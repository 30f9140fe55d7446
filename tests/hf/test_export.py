"""Exporting train.py checkpoints: `python -m parallax.hf.export` and `train.py --export-hf`.

The export writes only its own files, into a directory that is new, empty or
a previous export; every other layout (the run's --out or a folder around
it, the data, a folder of user files, a link to any of them, a file) exits 2
with one line and leaves every file under the test's folder as it was (train.py:
before any training). Checkpoints are read through the loader --resume uses.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from parallax.cli import main as train_main
from parallax.hf.export import main as export_main
from parallax.models import GPT, GPTConfig
from parallax.train import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=48)
OWN = {"config.json", "generation_config.json", "model.safetensors"}


def snapshot(root: Path) -> dict:
    """Every path under root: a file's bytes' hash, a link's target, 'dir' or 'other' (a FIFO)."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            state[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            state[key] = "dir"
        elif not path.is_file():
            state[key] = "other"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def changed(before: dict, after: dict) -> set:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def one_error_line(capsys, prog) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def same_logits(export_dir: Path, gpt: GPT) -> bool:
    x = torch.randint(0, gpt.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(AutoModelForCausalLM.from_pretrained(export_dir)(x, use_cache=False).logits, gpt(x)[0])


def trained_like(seed=0, **shape) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(**{**SHAPE, **shape}))
    with torch.no_grad():
        for block in gpt.blocks:
            block.attn.r_proj.weight.normal_(std=0.3)
    return gpt


def write_run(run: Path, gpt: GPT, name="checkpoint.pt", step=3) -> Path:
    run.mkdir(exist_ok=True)
    return save_checkpoint({"model": gpt.state_dict(), "model_config": gpt.config.to_dict(), "step": step}, run / name)


# ---------------------------------------------------------------- python -m parallax.hf.export

@torch.no_grad()
def test_export_from_a_checkpoint_file_and_a_run_dir(tmp_path, capsys):
    gpt = trained_like()
    run = tmp_path / "run"
    write_run(run, gpt)
    for source in (run, run / "checkpoint.pt"):
        out = tmp_path / f"hf-{source.name}"
        assert export_main([str(source), str(out)]) == 0
        assert {p.name for p in out.iterdir()} == OWN and same_logits(out, gpt)
    capsys.readouterr()  # transformers' progress bars
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "does not exist" in one_error_line(capsys, "python -m parallax.hf.export")


@torch.no_grad()
def test_re_export_replaces_only_its_own_files_and_drops_stale_ones(tmp_path):
    first, second = trained_like(0), trained_like(1, n_layer=1)
    write_run(tmp_path / "a", first)
    write_run(tmp_path / "b", second)
    out = tmp_path / "hf"
    assert export_main([str(tmp_path / "a"), str(out)]) == 0
    (out / "model-00001-of-00002.safetensors").write_bytes(b"a shard of an older, bigger export")
    (out / "config.json.x1y2z3ab.parallax.tmp").write_bytes(b"left by a killed export")
    assert export_main([str(tmp_path / "b"), str(out)]) == 0
    assert {p.name for p in out.iterdir()} == OWN and same_logits(out, second)


@torch.no_grad()
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    old, new = trained_like(0), trained_like(1)
    run = tmp_path / "run"
    write_run(run, old, name="checkpoint.prev.pt", step=2)
    data = bytearray(write_run(run, new).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / "checkpoint.pt").write_bytes(bytes(data))
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "corrupt" in captured.err and "checkpoint.prev.pt" in captured.out
    assert same_logits(tmp_path / "hf", old)
    capsys.readouterr()
    assert export_main([str(run / "checkpoint.pt"), str(tmp_path / "hf2")]) == 2  # a file is read as is
    assert "corrupt" in one_error_line(capsys, "python -m parallax.hf.export")
    assert not (tmp_path / "hf2").exists()


def not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    return path


def unknown_fields(tmp_path):
    gpt = trained_like()
    return save_checkpoint({"model": gpt.state_dict(), "model_config": {**gpt.config.to_dict(), "moe_experts": 8},
                            "step": 1}, tmp_path / "future.pt")


def wrong_weights(tmp_path):
    gpt = trained_like()
    return save_checkpoint({"model": gpt.state_dict(), "model_config": {**gpt.config.to_dict(), "n_layer": 3},
                            "step": 1}, tmp_path / "mismatch.pt")


def no_model(tmp_path):
    return save_checkpoint({"step": 1}, tmp_path / "optimizer_only.pt")


def weights_not_a_dict(tmp_path):
    torch.save({"model": [1.0], "model_config": trained_like().config.to_dict(), "step": 1}, tmp_path / "odd.pt")
    return tmp_path / "odd.pt"


def a_fifo(tmp_path):
    os.mkfifo(tmp_path / "checkpoint.pt")  # reading it would block
    return tmp_path / "checkpoint.pt"


def a_run_with_a_fifo(tmp_path):
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "checkpoint.pt")
    return tmp_path / "run"


def a_name_too_long(tmp_path):
    return tmp_path / ("x" * 300)


@pytest.mark.parametrize("make,message", [(not_a_checkpoint, "cannot be read"), (unknown_fields, "moe_experts"),
                                          (wrong_weights, "do not fit"), (no_model, "not a train.py checkpoint"),
                                          (weights_not_a_dict, "model is not a dict"), (a_fifo, "not a regular file"), (a_run_with_a_fifo, "not a regular file"),
                                          (a_name_too_long, "File name too long")])
def test_a_file_that_cannot_be_exported_is_one_line_not_a_traceback(tmp_path, capsys, make, message):
    source = make(tmp_path)
    before = snapshot(tmp_path)
    assert export_main([str(source), str(tmp_path / "hf")]) == 2
    assert message in one_error_line(capsys, "python -m parallax.hf.export")
    assert snapshot(tmp_path) == before


def test_as_a_module_it_warns_of_nothing(tmp_path):
    """No runpy RuntimeWarning (parallax.hf does not import the module), no traceback."""
    source = unknown_fields(tmp_path)
    done = subprocess.run([sys.executable, "-m", "parallax.hf.export", str(source), str(tmp_path / "hf")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    assert "moe_experts" in done.stderr and "Warning" not in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- the layouts an export may and may not go to

def user_folder(tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    (tmp / "mine" / "model.safetensors").write_bytes(b"someone else's weights")
    return tmp / "mine"


def link_to(make):
    def layout(tmp):
        target = make(tmp)
        (tmp / "link").symlink_to(target, target_is_directory=True)
        return tmp / "link"
    return layout


def export_with_a_link_inside(tmp):
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").symlink_to(tmp / "data" / "a.txt")
    return tmp / "hf"


def empty(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


# (layout name, tmp -> the export directory); tmp holds run/ (a finished run) and data/ (a text folder).
REFUSED = [
    ("the run's --out", lambda tmp: tmp / "run"),
    ("a folder around --out", lambda tmp: tmp),
    ("the data folder", lambda tmp: tmp / "data"),
    ("a folder of user files", user_folder),
    ("a link to --out", link_to(lambda tmp: tmp / "run")),
    ("a link to user files", link_to(user_folder)),
    ("a folder with a link in it", export_with_a_link_inside),
    ("a file", lambda tmp: tmp / "data" / "a.txt"),
    ("an empty path", lambda tmp: ""),
]
# Only train.py knows these: its --out (new/run) is created by the run; its data is read by later runs.
TRAIN_REFUSED = [
    ("a new folder around a new --out", lambda tmp: tmp / "new"),
    ("a new folder in the data", lambda tmp: tmp / "data" / "hf"),
]
ALLOWED = [
    ("a new folder", lambda tmp: tmp / "exports" / "hf"),
    ("an empty folder", empty),
    ("a link to an empty folder", link_to(empty)),
]


@pytest.fixture
def layout(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    write_run(run, trained_like())
    data.mkdir()
    (data / "a.txt").write_text("def f(x):\n    return x + 1\n" * 300)
    return tmp_path


def train_flags(tmp, export_dir, out="run2"):
    return ["--model", "tiny", "--data", str(tmp / "data"), "--out", str(tmp / out), "--batch-size", "2",
            "--seq-len", "16", "--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "0",
            "--threads", "1", "--no-progress", "--export-hf", str(export_dir)]


@pytest.mark.parametrize("name,where", REFUSED, ids=[name for name, _ in REFUSED])
def test_export_refuses_a_directory_that_is_not_its_own(layout, capsys, name, where):
    target = where(layout)
    before = snapshot(layout)
    assert export_main([str(layout / "run"), str(target)]) == 2
    one_error_line(capsys, "python -m parallax.hf.export")
    assert snapshot(layout) == before


@pytest.mark.parametrize("name,where", REFUSED + TRAIN_REFUSED, ids=[name for name, _ in REFUSED + TRAIN_REFUSED])
def test_train_refuses_it_before_any_training(layout, capsys, name, where, one_thread):
    target = where(layout)
    out = "new/run" if name == "a new folder around a new --out" else "run" if "--out" in name else "run2"
    before = snapshot(layout)
    assert train_main(train_flags(layout, target, out)) == 2
    assert one_error_line(capsys, "train.py").startswith("train.py: error: --export-hf: ")
    assert snapshot(layout) == before  # nothing trained, nothing written


@pytest.mark.parametrize("name,where", ALLOWED, ids=[name for name, _ in ALLOWED])
def test_export_writes_only_its_own_files(layout, capsys, name, where):
    target = where(layout)
    before = snapshot(layout)
    assert export_main([str(layout / "run"), str(target)]) == 0
    written = {str(Path(target).resolve().relative_to(layout.resolve()) / f) for f in OWN}
    assert changed(before, snapshot(layout)) <= written | {"exports", "exports/hf"}
    assert {p.name for p in Path(target).iterdir()} == OWN


@pytest.mark.parametrize("name,where", ALLOWED, ids=[name for name, _ in ALLOWED])
def test_train_exports_its_final_checkpoint_there(layout, capsys, name, where, one_thread):
    target = where(layout)
    before = snapshot(layout)
    assert train_main(train_flags(layout, target)) == 0
    err = capsys.readouterr().err
    assert "exported" in err and "checkpoint.pt" in err
    new = changed(before, snapshot(layout))
    exported = {str(Path(target).resolve().relative_to(layout.resolve()) / f) for f in OWN}
    assert {p for p in new if not p.startswith("run2")} <= exported | {"exports", "exports/hf"}
    state = torch.load(layout / "run2" / "checkpoint.pt", weights_only=True)
    gpt = GPT(GPTConfig(**state["model_config"]))
    gpt.load_state_dict(state["model"])
    assert same_logits(Path(target), gpt)


def test_an_export_directory_it_cannot_use_is_one_line(layout, capsys):
    link_loop = layout / "loop"
    link_loop.symlink_to(link_loop)
    for target in (layout / ("x" * 300), link_loop / "hf"):
        before = snapshot(layout)
        assert export_main([str(layout / "run"), str(target)]) == 2
        assert "cannot use" in one_error_line(capsys, "python -m parallax.hf.export")
        assert snapshot(layout) == before


def test_train_refuses_an_export_in_its_cache(layout, capsys, one_thread):
    cache = layout / "cache"
    for target in (cache, cache / "hf"):
        before = snapshot(layout)
        assert train_main([*train_flags(layout, target), "--cache-dir", str(cache)]) == 2
        assert one_error_line(capsys, "train.py").startswith("train.py: error: --export-hf: ")
        assert snapshot(layout) == before


def test_train_refuses_an_empty_export_path_as_a_flag(tmp_path, capsys):
    assert train_main(["--export-hf", "", "--out", str(tmp_path / "o")]) == 2
    assert one_error_line(capsys, "train.py") == "train.py: error: --export-hf: must be a directory path"
