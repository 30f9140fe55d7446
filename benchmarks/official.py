"""The Parallax authors' kernels (github.com/Yifei-Zuo/Parallax, MIT), for benchmarks only.

`bash benchmarks/fetch_wheels.sh` places their source in .whl/Yifei-Zuo-Parallax/
(git-ignored; nothing of it is copied into this repository). Their package is
also named `parallax`, so it is imported with ours set aside and ours put back
afterwards: `import parallax` goes on meaning this package, and the modules
returned keep working as long as they import at load time (their decode
kernel does; an import inside a function would find ours).
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / ".whl" / "Yifei-Zuo-Parallax"


def import_official(module: str, source: Path = SOURCE) -> types.ModuleType:
    """Import `module` (e.g. "parallax.cute.parallax_decode") from the authors'
    source. Their top-level package `__init__` is not run (it imports every
    backend); subpackages are. Raises ImportError when the source is missing."""
    root = source / "parallax"
    if not root.is_dir():
        raise ImportError(f"no source at {source} (bash benchmarks/fetch_wheels.sh)")
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if _in_package(name)}
    package = types.ModuleType("parallax")
    package.__path__ = [str(root)]
    sys.modules["parallax"] = package
    try:
        return importlib.import_module(module)
    finally:
        for name in [name for name in sys.modules if _in_package(name)]:
            del sys.modules[name]
        sys.modules.update(ours)


def _in_package(name: str) -> bool:
    return name == "parallax" or name.startswith("parallax.")
