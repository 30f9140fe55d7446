"""bench_train_kernels' loader of the official Parallax kernels, which import
as `parallax` like this package: the loaded function works and this
package's modules are back in place afterwards, whether the import worked
or not. (The benchmark itself runs end to end on CPU in test_docs_commands.)"""
import sys
import zipfile

import pytest

import parallax
from benchmarks.bench_train_kernels import load_official

OFFICIAL_INIT = "from parallax.triton import parallax_func\n"
OFFICIAL_TRITON = (
    "MARK = 'official'\n"
    "def parallax_func(q, r, k, v, qk_scale=None, window_size_left=-1):\n"
    "    return (MARK, q, window_size_left)\n"
)


def _wheel(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def _ours():
    return {name: module for name, module in sys.modules.items() if name == "parallax" or name.startswith("parallax.")}


def test_official_kernels_load_beside_this_package(tmp_path):
    before = _ours()
    wheel = _wheel(tmp_path / "parallax_kernel-9.9-py3-none-any.whl",
                   {"parallax/__init__.py": OFFICIAL_INIT, "parallax/triton/__init__.py": OFFICIAL_TRITON})
    baseline, note = load_official(wheel)
    assert baseline is not None, note
    assert baseline.name == "official" and baseline.layout == "bhtd" and wheel.name in note
    assert _ours() == before and sys.modules["parallax"] is parallax
    # Its function keeps its own module's globals; the window maps to FA2's window_size_left.
    assert baseline.call("q", "r", "k", "v", None) == ("official", "q", -1)
    assert baseline.call("q", "r", "k", "v", 64) == ("official", "q", 64)


@pytest.mark.parametrize("files", [
    {"parallax/__init__.py": "raise RuntimeError('no GPU')\n"},
    {"parallax/__init__.py": ""},  # no parallax.triton
    {"parallax/__init__.py": "", "parallax/triton/__init__.py": "x = 1\n"},  # no parallax_func
], ids=["raises", "no-triton-module", "no-function"])
def test_a_broken_official_wheel_loses_its_column_not_the_run(tmp_path, files):
    before = _ours()
    baseline, note = load_official(_wheel(tmp_path / "parallax_kernel-0.0-py3-none-any.whl", files))
    assert baseline is None and note.startswith("official not importable")
    assert _ours() == before and sys.modules["parallax"] is parallax
