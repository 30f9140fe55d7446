"""train.py under hostile flag values: every flag the parser declares, one at
a time, with values chosen to break parsers (empty, whitespace, huge,
non-finite, negative zero, unicode digits, lone surrogates of undecodable
argv bytes) next to valid ones. Each run exits 0 having trained, or 2 with
one line naming the flag and nothing written (not even an empty --out); it
never touches a file outside --out and the cache."""
import contextlib
import tempfile
from pathlib import Path

from hypothesis import assume, given
from hypothesis import strategies as st

from parallax.train.config import build_parser

from .budget import budget, no_hang
from .runs import QUICK, assert_only_its_own_files_changed, one_error_line, run_main, snapshot, write_corpus

HOSTILE = ["", " ", "0", "-0", "1", "-1", "2", "nan", "-nan", "inf", "-inf", "1e309", "1e-320", "-0.0", "0.5",
           "2147483648", "9223372036854775808", "9" * 30, "0x10", "1_000", " 7 ", "\u0663", "\uff11", "1.5", "true",
           "yes", "None", "-", "--", "--steps", "\udcff", "caf\udce9", "\u00e9", "a" * 4000, "1\n2", "cuda:" + "9" * 25,
           "cuda:-1", "cuda:0", "mps", "cpu", "auto", "bfloat16", "float32", "float16", "tiny", "TINY", "small",
           "softmax", "adamw", "cosine", "wsd", "constant"]
# Paths relative to the run's scratch folder ({} is it); the corpus is data/corpus.txt.
PATHS = ["{}", "{}/data", "{}/data/corpus.txt", "{}/data/sub", "{}/missing", "{}/data/corpus.txt/sub", "/dev/null",
         "/dev/zero", "{}/new/deeper/out", "{}/caf\udce9", "{}/ ", "{}/out/../out", "{}/data/../out2",
         "{}/" + "x" * 300, "{}/data/corpus.txt/" + "x" * 300]
PATH_FLAGS = {"--data", "--out", "--cache-dir"}
SKIPPED = {"-h", "--export-hf",  # export: its own tests (tests/hf)
           "--compile"}  # compiles for a minute on CPU
# Valid values that would make a run long or large: the runs here take a second.
EXPENSIVE = {"--batch-size": 64, "--grad-accum": 4, "--threads": 4, "--seq-len": 64}


def flags():
    actions = [a for a in build_parser()._actions if a.option_strings[0] not in SKIPPED]
    return [(a.option_strings, a.nargs == 0) for a in actions]


@st.composite
def one_flag(draw):
    names, switch = draw(st.sampled_from(flags()))
    name = draw(st.sampled_from(names))
    if switch:  # --progress, --resume, ...: bare, or with a value argparse must refuse
        return [draw(st.sampled_from([name, f"{name}=yes", f"{name}=", f"{name}=0"]))]
    pool = PATHS if names[0] in PATH_FLAGS else HOSTILE
    value = draw(st.sampled_from(pool) | st.integers(-2**70, 2**70).map(str) | st.floats().map(repr))
    return [name, value]


def canonical(flag: str) -> str:
    flag = flag.split("=")[0]
    return {"--adamw-lr": "--embed-lr"}.get(flag, flag.replace("--no-", "--"))


def affordable(args) -> bool:
    if len(args) != 2 or args[0] not in EXPENSIVE:
        return True
    try:
        return int(args[1]) <= EXPENSIVE[args[0]]
    except ValueError:
        return True


@budget(60)
@given(args=one_flag())
def test_one_hostile_flag(args):
    assume(affordable(args))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "data").mkdir()
        write_corpus(root / "data" / "corpus.txt")
        args = [a.format(root) for a in args]
        out, cache = root / "out", root / "cache"
        before = snapshot(root)
        with no_hang(120), contextlib.chdir(root):  # relative paths land in the scratch folder
            code, stdout, err = run_main([*QUICK, "--data", root / "data" / "corpus.txt", "--cache-dir", cache,
                                          "--out", out, *args])
        out = root / args[1] if args[0] == "--out" else out
        cache = root / args[1] if args[0] == "--cache-dir" else cache
        assert code in (0, 2), (code, err)
        if code == 2:
            line = one_error_line(code, err)
            assert line.startswith(f"train.py: error: {canonical(args[0])}") or (
                args[0] in PATH_FLAGS and line.startswith("train.py: error: --")), line
            assert "step 1" not in stdout  # nothing trained
        else:
            assert stdout.splitlines()[-1].startswith("status="), stdout  # trained (or, --steps 0, evaluated)
        assert_only_its_own_files_changed(root, before, out, cache)
        if code == 2:
            assert not out.exists() or str(out.relative_to(root)) in before
