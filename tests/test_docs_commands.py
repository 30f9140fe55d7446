"""Every `python ...` / `torchrun ...` command in README.md, docs/*.md and
train.py's docstring runs, in the order the file gives them, in one directory.

Commands come from shell code blocks and the docstring (a line, or each
`&&` / `;` part of one) and from inline code spans of the markdown. A span holding a placeholder (`[--flag]`,
`<path>`, `a|b`, `...`) is a synopsis, not a command, and is left out.

RULES says, for a command prefix, how the command is run here: flags
appended to shorten it (argparse keeps the last value of a flag), extra
environment variables, files it expects, whether it needs CUDA (then it is a
`gpu` case), or why it is not run at all. The longest matching prefix wins;
a command no rule matches fails `test_every_doc_command_has_a_rule`, so a new
doc command cannot escape this test: add its rule here.

A file's commands run one after the other, each once, in one scratch
directory (holding a link to train.py), as a reader who runs the file top to
bottom in one clone would: each must exit 0 with no traceback and no warning
on stderr, so no command may refuse what an earlier one left behind (a run
directory, an export). A rule's `setup` writes the files its command expects
(input.txt, token shards); `after` names commands of other files whose outputs
it reads (run first, once, unless the file ran them already). `python` is
this interpreter and `torchrun` is `python -m torch.distributed.run`. Commands
that need CUDA run in the file's `gpu`-marked case, all of its commands with
them.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
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
WARNING = re.compile(r"^warning:|\w+Warning: ", re.MULTILINE)  # ours, or a Python warning

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


def shows_the_flags(proc, cwd: Path) -> None:
    assert proc.stdout.startswith("usage: train.py") and "--out" in proc.stdout, proc.stdout[:2000]


def wrote_a_table(proc, cwd: Path) -> None:
    """Benchmarks write to out/bench/ by default, never to the committed benchmarks/results/."""
    assert list((cwd / "out" / "bench").glob("*.md")), proc.stdout[-2000:]


def write_text_file(cwd: Path) -> None:
    (cwd / "input.txt").write_bytes((ROOT / "parallax" / "train" / "loop.py").read_bytes() * 4)


def write_token_shards(cwd: Path) -> None:
    folder = cwd / "data" / "openwebtext"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, 50257, 20_000, dtype=np.uint16).tofile(folder / f"{split}.bin")


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
    setup: Callable[[Path], None] | None = None  # writes what the command reads into the scratch dir
    after: tuple[str, ...] = ()  # doc commands whose outputs this one reads
    check: Callable | None = None
    needs_cuda: bool = False
    not_run: str | None = None  # why a matching command is not run by this test
    timeout: int = 300


RULES = [
    Rule("python -m pytest", not_run="the test suite itself: CI runs it verbatim (.ci/run, tests/test_readme.py)"),
    Rule("python train.py", append=TRAIN_SHORT, check=check_train),
    Rule("python train.py --help", check=shows_the_flags),
    Rule("python train.py --data input.txt", append=TRAIN_SHORT, setup=write_text_file, check=check_train),
    # The 125m preset is for GPUs: here made-up shards, the tiny model and short sequences.
    Rule("python train.py --data data/openwebtext", setup=write_token_shards, check=check_train,
         append=TRAIN_SHORT + ("--model", "tiny", "--seq-len", "32", "--grad-accum", "1")),
    Rule("torchrun --nproc_per_node 2 train.py", append=TRAIN_SHORT, env=free_port_env, check=check_ddp),
    Rule("python -m benchmarks.bench_muon", append=("--quick", "--repeats", "1", "--device", "cpu"),
         check=wrote_a_table),
    Rule("python -m benchmarks.bench_train_kernels", append=("--quick",), needs_cuda=True),
    # The benchmark's smoke run in the Triton interpreter: one tiny cell, every step (checks, timing, breakdown).
    Rule("python -m benchmarks.bench_train_kernels --device cpu", append=("--out", "train.md")),
    Rule("python -m benchmarks.bench_decode", needs_cuda=True),
    Rule("python benchmarks/bench_decode.py", needs_cuda=True),
    # The full sweep is ~15 CPU-minutes; docs commands run the CI subset (tests/kernels/test_aot.py checks its rows).
    Rule("python -m parallax.kernels.aot", append=("--subset", "ci")),
    Rule("python -m benchmarks.bench_torch_path", append=("--seq-lens", "128", "--tokens", "256", "--repeats", "1",
                                                          "--no-peak"), check=wrote_a_table),
    Rule("python -m benchmarks.bench_generate",
         append=("--device", "cpu", "--new-tokens", "2", "--repeats", "1", "--prompts", "8", "--batches", "1"),
         check=wrote_a_table),
    Rule("python -m parallax.hf.export runs/small-parallax", after=("python train.py",)),
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


def doc_commands() -> dict[str, dict[str, list[str]]]:
    """doc file -> {command -> where it appears ("file:line")}, in the file's order."""
    found: dict[str, dict[str, list[str]]] = {}
    for doc in DOCS:
        commands = found.setdefault(str(doc.relative_to(ROOT)), {})
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
                    commands.setdefault(" ".join(piece.split()), []).append(where)
    return {doc: commands for doc, commands in found.items() if commands}


def rule_for(command: str) -> Rule | None:
    bare = _strip_env(command)[1]
    matching = [r for r in RULES if bare == r.prefix or bare.startswith(r.prefix + " ")]
    return max(matching, key=lambda r: len(r.prefix), default=None)


FILES = doc_commands()
COMMANDS = {c: w for commands in FILES.values() for c, w in commands.items()}


def runnable(doc: str, cuda: bool) -> list[str]:
    """The commands of `doc` this test runs, in order (with CUDA: all, without: those that need none)."""
    rules = {c: rule_for(c) for c in FILES[doc]}
    return [c for c, r in rules.items() if r is not None and r.not_run is None and (cuda or not r.needs_cuda)]


CASES = [pytest.param(doc, False, id=doc) for doc in FILES if runnable(doc, False)] + [
    pytest.param(doc, True, marks=pytest.mark.gpu, id=f"{doc}-cuda")
    for doc in FILES if len(runnable(doc, True)) > len(runnable(doc, False))]


def test_every_doc_command_has_a_rule():
    assert len(COMMANDS) >= 8, COMMANDS  # the extraction still finds the known commands
    unmatched = [f"{c}  ({', '.join(w)})" for c, w in COMMANDS.items() if rule_for(c) is None]
    assert not unmatched, "add a rule to RULES in tests/test_docs_commands.py for:\n" + "\n".join(unmatched)
    unknown = {a for r in RULES for a in r.after} - set(COMMANDS)
    assert not unknown, f"rules run these before others, but no doc shows them: {unknown}"


def test_extraction_reads_blocks_chains_and_inline_spans(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("Run `python a.py --x 1` or `python b.py [--quick]`.\n```bash\n"
                   "pip install -e . && python c.py   # comment\nX=1 torchrun d.py; echo done\n```\n"
                   "```python\nprint('python e.py')\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [doc])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert {d: list(c) for d, c in doc_commands().items()} == {
        "x.md": ["python a.py --x 1", "python c.py", "X=1 torchrun d.py"]}


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("docs-cache")  # the stdlib corpus is cached once for all files


def run_command(command: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    rule = rule_for(command)
    env_vars, bare = _strip_env(command)
    words = shlex.split(bare) + list(rule.append)
    launcher = [sys.executable] if words[0] == "python" else [sys.executable, "-m", "torch.distributed.run"]
    if rule.setup is not None:
        rule.setup(cwd)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PARALLAX_CACHE": str(cache),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           **(rule.env() if rule.env else {}), **env_vars}
    proc = subprocess.run(launcher + words[1:], cwd=cwd, env=env, capture_output=True, text=True, timeout=rule.timeout)
    where = f"{' '.join(words)}  ({', '.join(COMMANDS[command])})"
    assert proc.returncode == 0, f"{where}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{where}\n{proc.stderr[-3000:]}"
    assert not WARNING.search(proc.stderr), f"{where} warns:\n{proc.stderr[-3000:]}"
    if rule.check is not None:
        rule.check(proc, cwd)
    return proc


@pytest.mark.parametrize("doc,cuda", CASES)
def test_doc_commands_run_in_order_in_one_directory(doc, cuda, tmp_path, data_cache):
    (tmp_path / "train.py").symlink_to(ROOT / "train.py")
    done = set()
    for command in runnable(doc, cuda):
        for earlier in rule_for(command).after:
            if earlier not in done:
                run_command(earlier, tmp_path, data_cache)
                done.add(earlier)
        run_command(command, tmp_path, data_cache)
        done.add(command)
