"""Reading the AOT compile table (`python -m parallax.kernels.aot --out`) back."""
from parallax.kernels.aot import COLUMNS


def parse_table(text: str) -> list[dict]:
    """Rows of a table written by `aot.markdown`, as dicts keyed by COLUMNS."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS) and cells[0] != COLUMNS[0] and not cells[0].startswith("---"):
            rows.append(dict(zip(COLUMNS, cells)))
    return rows
