"""Tables as text: plain columns for the terminal, and the one Markdown renderer every report, summary and
generated doc uses."""
from __future__ import annotations


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"
    return "" if v is None else str(v)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Left-aligned columns, a header line, one line per row; floats to 4 significant digits."""
    cells = [columns] + [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def markdown_table(header: list[str], rows) -> list[str]:
    """A GitHub Markdown table as lines: ``| a | b |``, ``|---|---|``, then one line per row. Cells are
    written as given (``str``), already formatted by the caller; a ``|`` inside a cell is the caller's to
    escape."""
    return ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(map(str, row)) + " |" for row in rows]
