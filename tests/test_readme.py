"""The README opens with the two commands (CI runs the second one verbatim),
and every Python snippet in it runs as written, without a warning. Its shell
commands are run by tests/test_docs_commands.py."""
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def python_snippets() -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block."""
    return [(README[:m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", README, re.S)]


def test_readme_opens_with_two_commands():
    head = README.split("```bash", 1)[0]
    assert head.strip() == "# parallax"
    main, tests = readme_commands()
    assert main.endswith("python train.py")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


@pytest.mark.parametrize("line,code", python_snippets(), ids=lambda v: f"README.md:{v}" if isinstance(v, int) else "")
def test_readme_snippet_runs_as_written(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a snippet that writes files writes them here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})


def test_snippets_are_found():
    assert len(python_snippets()) >= 2
