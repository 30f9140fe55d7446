"""What every benchmark table states about where it was measured, how it is laid out, and where it goes.

A table goes to out/bench/ (git-ignored) unless --out says otherwise; the
committed tables in benchmarks/results/ change only with
`--out benchmarks/results/` (benchmarks/gpu.sh passes it).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
from pathlib import Path

import torch

OUT = "out/bench/"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: torch.device, extra_distributions: tuple[str, ...] = ()) -> str:
    """One line: device, software versions and the date (UTC)."""
    parts = [f"Device: {device_name(device)}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts[0] += f" (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
        parts.append(f"CUDA {torch.version.cuda}")
    else:
        parts[0] += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    parts += [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("triton", *extra_distributions):
        found = version(dist)
        parts.append(f"{dist} {found}" if found else f"{dist} not installed")
    parts.append(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return "; ".join(parts)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines; cells are formatted by str()."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def table_name(prefix: str, device: torch.device) -> str:
    """<prefix>_<device>.md, the device name made file-safe."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device) if device.type == "cuda" else "cpu").strip("-")
    return f"{prefix}_{slug.lower()}.md"


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", default=OUT, metavar="PATH",
                        help=f"the table's file, or a directory (existing, or ending in /) to write {name} into "
                             f"(default: {OUT}; --out benchmarks/results/ updates the committed table)")


def table_path(out: str, name: str) -> Path:
    """Where --out puts the table called `name`: out itself, or out/name when out is a directory."""
    path = Path(out)
    return path / name if out.endswith(("/", os.sep)) or path.is_dir() else path


def save(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
