"""parallax's parts depend one way: no import cycle between its subpackages
(the command line, parallax/cli.py, sits above them all)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "parallax"


def part_of(module: str) -> str | None:
    """The subpackage a dotted module name of parallax lies in."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "parallax" else None


def imports_between_parts() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = "parallax." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        package = module.rsplit(".", 1)[0]  # of a module, or of an __init__
        here = part_of(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                names = [f"{base}.{node.module}" if node.module else base] if node.level else [node.module or ""]
                names += [f"{names[0]}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                there = part_of(name)
                if here and there and there != here and (PACKAGE / there).is_dir():
                    graph.setdefault(here, set()).add(there)
    return graph


def test_no_cycle_between_subpackages():
    graph = imports_between_parts()
    assert "train" in graph["hf"]  # the export reads train's checkpoints (the graph is read at all)
    assert "hf" not in graph.get("train", set()), "parallax.train must not import parallax.hf (hf reads train's files)"

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    cycles = sorted(part for part in graph if reaches(part, part))
    assert not cycles, f"import cycles through {cycles}: {graph}"


def kernel_imports() -> dict[str, set[str]]:
    """{folder of parallax/kernels: the kernels folders its modules import (top level: "")}."""
    root = PACKAGE / "kernels"
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        here = parts[0] if len(parts) > 1 else ""
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                package = parts[:-1][:max(0, len(parts) - node.level)] if node.level > 1 else parts[:-1]
                target = (*package, *(node.module or "").split(".")) if node.module else package
                target = tuple(t for t in target if t)
                there = target[0] if target and (root / target[0]).is_dir() else ""
                if there != here:
                    graph.setdefault(here, set()).add(there)
    return graph


def test_kernels_folders_show_the_architecture():
    """The torch path and the Triton kernels do not reach into each other or into the AOT tool; only the
    public ops above them choose between the two, and the AOT tool compiles the Triton kernels."""
    graph = kernel_imports()
    assert "triton" in graph["aot"] and "torch_path" in graph[""]  # the graph is read at all
    assert graph.get("torch_path", set()) <= {""}, graph
    assert graph.get("triton", set()) <= {""}, graph
    assert "aot" not in set().union(*(graph[k] for k in graph if k != "aot")), graph
