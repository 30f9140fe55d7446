"""Every `python ...` / `torchrun ...` command in README.md, docs/*.md and
train.py's docstring runs.

Commands come from shell code blocks and the docstring (a line, or each
`&&` / `;` part of one) and from inline code spans of the markdown. A span holding a placeholder (`[--flag]`,
`<path>`, `a|b`, `...`) is a synopsis, not a command, and is left out.

RULES says, for a command prefix, how the command is run here: flags
appended to shorten it (argparse keeps the last value of a flag), extra
environment variables, files it expects, whether it needs CUDA (then it is a
`gpu` case), or why it is not run at all. The longest matching prefix wins;
a command no rule matches fails `test_every_doc_command_has_a_rule`, so a new
doc command cannot escape this test: add its rule here.

Each command runs once, in its own scratch directory (holding a link to
train.py and the rule's files), so outputs such as runs/default land there;
a rule's setup may reuse another command's outputs (`from_run`). `python`
is this interpreter and `torchrun` is `python -m torch.distributed.run`.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "train.py"]
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
SYNOPSIS = re.compile(r"\[|<|\||\.\.\.")

# train.py in seconds: 2 steps of 2 sequences, one evaluation batch, a short sample.
TRAIN_SHORT = ("--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2",
               "--sample-tokens", "8", "--threads", "1", "--no-progress")


def summary(stdout: str) -> dict:
    return dict(kv.split("=", 1) for kv in stdout.strip().splitlines()[-1].split())


def check_train(proc, cwd: Path) -> None:
    """A finished run: the summary line last, every output in --out."""
    s = summary(proc.stdout)
    assert s["status"] == "done", proc.stdout[-2000:]
    for key in ("val_loss", "val_bpb", "unigram_bpb", "tokens_per_s", "train_tokens_per_s", "params", "wall_s"):
        assert float(s[key]) > 0, key
    assert float(s["train_s"]) <= float(s["wall_s"])
    assert float(s["tokens_per_s"]) <= float(s["train_tokens_per_s"])  # the whole run includes the training steps
    out = cwd / s["out"]
    assert {"checkpoint.pt", "log.jsonl", "loss.png", "sample.txt", "summary.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "train.lock").exists()


def check_ddp(proc, cwd: Path) -> None:
    s = summary(proc.stdout)
    assert s["world_size"] == "2" and s["status"] == "done"
    assert proc.stdout.count("val_loss=") == 1  # only rank 0 reports


def write_text_file(cwd: Path, run) -> None:
    (cwd / "input.txt").write_bytes((ROOT / "parallax" / "train" / "loop.py").read_bytes() * 4)


def write_token_shards(cwd: Path, run) -> None:
    folder = cwd / "data" / "openwebtext"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 20_000, dtype=np.uint16).tofile(folder / f"{split}.bin")


def from_run(command: str, *paths: str):
    """A setup that copies `paths` from the scratch directory of `command`'s (shared) run."""
    def setup(cwd: Path, run) -> None:
        _, source = run(command)
        for path in paths:
            shutil.copytree(source / path, cwd / path)
    return setup


def free_port_env() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}  # torchrun's flags, by environment


@dataclass(frozen=True)
class Rule:
    prefix: str
    append: tuple[str, ...] = ()
    env: Callable[[], dict] | None = None
    setup: Callable[[Path, Callable], None] | None = None  # (scratch dir, run(command) -> (proc, its dir))
    check: Callable | None = None
    needs_cuda: bool = False
    not_run: str | None = None  # why a matching command is not run by this test
    timeout: int = 300


RULES = [
    Rule("python -m pytest", not_run="the test suite itself: CI runs it verbatim (.ci/run, tests/test_readme.py)"),
    Rule("python train.py", append=TRAIN_SHORT, check=check_train),
    Rule("python train.py --data input.txt", append=TRAIN_SHORT, setup=write_text_file, check=check_train),
    # The 125m preset is for GPUs: here made-up shards, the tiny model and short sequences.
    Rule("python train.py --data data/openwebtext", setup=write_token_shards, check=check_train,
         append=TRAIN_SHORT + ("--model", "tiny", "--seq-len", "32", "--grad-accum", "1")),
    Rule("torchrun --nproc_per_node 2 train.py", append=TRAIN_SHORT, env=free_port_env, check=check_ddp),
    Rule("python -m benchmarks.bench_muon", append=("--quick", "--repeats", "1", "--device", "cpu", "--out", "muon.md")),
    Rule("python -m benchmarks.bench_train_kernels", append=("--quick",), needs_cuda=True),
    # The benchmark's smoke run in the Triton interpreter: one tiny cell, every step (checks, timing, breakdown).
    Rule("python -m benchmarks.bench_train_kernels --device cpu", append=("--out", "train.md")),
    Rule("python -m benchmarks.bench_decode", needs_cuda=True),
    Rule("python benchmarks/bench_decode.py", needs_cuda=True),
    # The full sweep is ~15 CPU-minutes; docs commands run the CI subset (tests/kernels/test_aot.py checks its rows).
    Rule("python -m parallax.kernels.aot", append=("--subset", "ci")),
    Rule("python -m benchmarks.bench_torch_path",
         append=("--seq-lens", "128", "--tokens", "256", "--repeats", "1", "--no-peak", "--out", "torch_path.md")),
    Rule("python -m benchmarks.bench_generate",
         append=("--device", "cpu", "--new-tokens", "2", "--repeats", "1", "--prompts", "8", "--batches", "1",
                 "--out", "generate.md")),
    Rule("python -m parallax.hf.export runs/default", setup=from_run("python train.py", "runs/default")),
]


def _strip_env(command: str) -> tuple[dict, str]:
    """Leading VAR=value assignments -> (env, rest of the command)."""
    words, env = shlex.split(command), {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, shlex.join(words)


def _is_command(text: str) -> bool:
    text = _strip_env(text)[1] if "=" in text.split(" ", 1)[0] else text
    return text.startswith(("python ", "torchrun ")) or text == "python"


def doc_commands() -> dict[str, list[str]]:
    """command -> where it appears ("file:line")."""
    found: dict[str, list[str]] = {}
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        if doc.suffix == ".py":  # its docstring reads as one shell block
            docstring = ast.get_docstring(ast.parse("\n".join(lines))) or ""
            lines = ["```bash", *docstring.splitlines(), "```"]
        fence = None
        for number, line in enumerate(lines, 1):
            where = f"{doc.relative_to(ROOT)}:{number}"
            stripped = line.strip()
            if stripped.startswith("```"):
                fence = stripped[3:].strip() if fence is None else None
                continue
            if fence is not None:
                if fence in SHELL_BLOCKS:
                    code = re.sub(r"(^|\s)#.*$", "", stripped.removeprefix("$ "))
                    pieces = re.split(r"&&|;", code)
                else:
                    pieces = []
            else:
                pieces = re.findall(r"`([^`]+)`", line)
            for piece in (p.strip() for p in pieces):
                if _is_command(piece) and not SYNOPSIS.search(piece):
                    found.setdefault(" ".join(piece.split()), []).append(where)
    return found


def rule_for(command: str) -> Rule | None:
    bare = _strip_env(command)[1]
    matching = [r for r in RULES if bare == r.prefix or bare.startswith(r.prefix + " ")]
    return max(matching, key=lambda r: len(r.prefix), default=None)


COMMANDS = doc_commands()
CASES = [pytest.param(command, marks=[pytest.mark.gpu] if rule.needs_cuda else [], id=command)
         for command, rule in ((c, rule_for(c)) for c in COMMANDS) if rule is not None and rule.not_run is None]


def test_every_doc_command_has_a_rule():
    assert len(COMMANDS) >= 8, COMMANDS  # the extraction still finds the known commands
    unmatched = [f"{c}  ({', '.join(w)})" for c, w in COMMANDS.items() if rule_for(c) is None]
    assert not unmatched, "add a rule to RULES in tests/test_docs_commands.py for:\n" + "\n".join(unmatched)


def test_extraction_reads_blocks_chains_and_inline_spans(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("Run `python a.py --x 1` or `python b.py [--quick]`.\n```bash\n"
                   "pip install -e . && python c.py   # comment\nX=1 torchrun d.py; echo done\n```\n"
                   "```python\nprint('python e.py')\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [doc])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert list(doc_commands()) == ["python a.py --x 1", "python c.py", "X=1 torchrun d.py"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(command) -> (CompletedProcess, scratch dir), each command once per session."""
    cache = tmp_path_factory.mktemp("docs-cache")  # the stdlib corpus is cached once for all commands
    done: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def run_once(command: str):
        if command not in done:
            rule = rule_for(command)
            cwd = tmp_path_factory.mktemp("doc-command")
            env_vars, bare = _strip_env(command)
            words = shlex.split(bare) + list(rule.append)
            launcher = [sys.executable] if words[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
            (cwd / "train.py").symlink_to(ROOT / "train.py")
            if rule.setup is not None:
                rule.setup(cwd, run_once)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PARALLAX_CACHE": str(cache),
                   "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **(rule.env() if rule.env else {}), **env_vars}
            proc = subprocess.run(launcher + words[1:], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=rule.timeout)
            assert proc.returncode == 0, f"{' '.join(words)}\n{proc.stderr[-3000:]}"
            done[command] = proc, cwd
        return done[command]

    return run_once


@pytest.mark.parametrize("command", CASES)
def test_doc_command_runs(command, run):
    proc, cwd = run(command)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rule = rule_for(command)
    if rule.check is not None:
        rule.check(proc, cwd)
