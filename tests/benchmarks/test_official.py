"""benchmarks/official.py: the Parallax authors' package (also named `parallax`) imported beside ours."""
import sys

import pytest

import parallax
from benchmarks.official import import_official


def write_package(root, decode_body: str) -> None:
    """A stand-in for their source tree: a top-level __init__ that must not run, a subpackage."""
    (root / "parallax" / "cute").mkdir(parents=True)
    (root / "parallax" / "__init__.py").write_text("raise RuntimeError('their top-level __init__ ran')\n")
    (root / "parallax" / "cute" / "__init__.py").write_text("from parallax.cute.decode import answer\n")
    (root / "parallax" / "cute" / "helper.py").write_text("VALUE = 41\n")
    (root / "parallax" / "cute" / "decode.py").write_text(decode_body)


def ours_intact(before: dict) -> None:
    assert sys.modules["parallax"] is parallax
    assert {n: m for n, m in sys.modules.items() if n == "parallax" or n.startswith("parallax.")} == before
    assert "parallax.cute" not in sys.modules


def test_their_module_loads_and_ours_comes_back(tmp_path):
    write_package(tmp_path, "from parallax.cute import helper\n\ndef answer():\n    return helper.VALUE + 1\n")
    before = {n: m for n, m in sys.modules.items() if n == "parallax" or n.startswith("parallax.")}
    module = import_official("parallax.cute.decode", tmp_path)
    assert module.answer() == 42  # their imports, bound at load time, keep working
    ours_intact(before)
    import parallax.models  # noqa: F401 - ours still imports

    assert parallax.models.GPT is not None


def test_a_failing_import_still_puts_ours_back(tmp_path):
    write_package(tmp_path, "raise ImportError('their wheel is missing')\n")
    before = {n: m for n, m in sys.modules.items() if n == "parallax" or n.startswith("parallax.")}
    with pytest.raises(ImportError, match="their wheel is missing"):
        import_official("parallax.cute.decode", tmp_path)
    ours_intact(before)


def test_missing_source_says_how_to_get_it(tmp_path):
    with pytest.raises(ImportError, match="fetch_wheels.sh"):
        import_official("parallax.cute.parallax_decode", tmp_path / "absent")
