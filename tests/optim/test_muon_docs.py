"""docs/muon.md documents every rule and option the code has, and its Python runs."""
import re
from pathlib import Path

import pytest

from parallax.optim import UPDATE_RULES
from parallax.optim.options import AdamWOptions, MuonOptions, PolarOptions, names

DOC = (Path(__file__).resolve().parents[2] / "docs" / "muon.md").read_text()


def section(title):
    start = DOC.index(f"\n## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end > 0 else None]


@pytest.mark.parametrize("block", re.findall(r"```python\n(.*?)```", DOC, re.S))
def test_python_blocks_run(block):
    exec(compile(block, "docs/muon.md", "exec"), {})


def test_every_option_and_rule_is_in_the_docs():
    options = section("Options")
    documented = set(re.findall(r"`(\w+)`", options))
    optimizer = set(names(MuonOptions)) | set(names(PolarOptions)) | {f"adamw_{n}" for n in names(AdamWOptions)}
    rules = {name for rule in UPDATE_RULES.values() for name in rule.option_names()}
    assert optimizer | rules <= documented
    table = section("Update rules")
    assert all(f'`"{name}"`' in table for name in UPDATE_RULES)
