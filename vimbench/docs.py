"""The generated parts of ``docs/*.md``: each command's usage and option table, read from its Click parameters,
and each CSV kind's column table, read from ``vimbench.rows.schema``.

    python -m vimbench.docs      rewrite every generated block of docs/*.md in place (run after adding or
                                 changing an option, a column or a column's doc); prints the files it changed

A generated block sits between two marker lines; what is between them is replaced, the rest of the file is not:

    <!-- generated: options scaling -->          (a command's usage line and options)
    <!-- generated: schema kernels -->           (a CSV kind's key and columns, environment columns left out)
    <!-- generated: schema environment -->       (the columns every row ends with, and which kinds have them)
    <!-- end generated -->

``tests/test_docs.py`` regenerates every block in memory and fails when the committed docs differ.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from vimbench.present.tables import markdown_table
from vimbench.rows import schema

DOCS = Path(__file__).resolve().parents[1] / "docs"
"""docs/ of the checkout this package runs from (an installed wheel has none)."""
BLOCK = re.compile(r"(<!-- generated: (\w+) ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)
TAIL = [*schema.ENVIRONMENT, *schema.PRECISION, *schema.GPU_TELEMETRY, *schema.PLACEMENT]
"""The columns rows end with, documented once in the environment table."""


def _cell(text) -> str:
    """Markdown-safe table cell: no line breaks, ``|`` escaped, ``<`` written as an entity (GitHub drops tags)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "&lt;")


def _default(p: click.Parameter) -> str:
    """The default as the option table shows it: the value when Click shows it, the off side of a flag, else empty
    (the help text then says it in brackets)."""
    if isinstance(p, click.Option) and p.is_flag:
        if p.secondary_opts:
            return "`" + (p.opts[0] if p.default else p.secondary_opts[0]) + "`"
        return "off"
    if isinstance(p, click.Option) and p.multiple:
        return "repeatable"
    shown = isinstance(p, click.Option) and p.show_default and p.default not in (None, "") and not callable(p.default)
    return f"`{p.default}`" if shown else ""


def options_block(name: str) -> list[str]:
    """``vimbench NAME``'s usage line and one table row per option: option, default, meaning (its help)."""
    from vimbench.commands import cli
    command = cli.commands[name]
    ctx = click.Context(command, info_name=f"vimbench {name}")
    usage = " ".join([f"vimbench {name}", *command.collect_usage_pieces(ctx)])
    rows = [[_cell(" / ".join(f"`{o}`" for o in p.opts + p.secondary_opts)), _default(p), _cell(p.help or "")]
            for p in command.params if isinstance(p, click.Option)]
    return [f"Usage: `{usage}`", ""] + markdown_table(["option", "default", "meaning"], rows)


def _meaning(kind: str, column: str) -> str:
    """A column's doc for the table of ``kind``: a leading "kind: " or "kind, " that restricts it is dropped."""
    doc = schema.COLUMN_DOCS[column][1]
    for prefix in (f"{kind}: ", f"{kind}, "):
        if doc.startswith(prefix):
            return doc[len(prefix):]
    return doc


def schema_block(kind: str) -> list[str]:
    """The key and the column table (column, unit, meaning) of one CSV kind, or with ``environment`` the
    columns rows end with and the kinds that have each."""
    if kind == "environment":
        rows = [[f"`{c}`", schema.COLUMN_DOCS[c][0], _cell(schema.COLUMN_DOCS[c][1]) or "version",
                 ", ".join(k for k, s in schema.SCHEMAS.items() if c in s.columns)] for c in TAIL]
        return markdown_table(["column", "unit", "meaning", "in"], rows)
    s = schema.SCHEMAS[kind]
    rows = [[f"`{c}`", schema.COLUMN_DOCS[c][0], _cell(_meaning(kind, c))] for c in s.columns if c not in TAIL]
    return [f"A row is identified by {', '.join(f'`{c}`' for c in s.key)}.", ""] + \
        markdown_table(["column", "unit", "meaning"], rows)


GENERATORS = {"options": options_block, "schema": schema_block}


def regenerate(text: str) -> str:
    """``text`` with every generated block rewritten from the code."""
    return BLOCK.sub(lambda m: m[1] + "\n".join(GENERATORS[m[2]](m[3])) + "\n" + m[5], text)


def main() -> int:
    """Rewrite the generated blocks of docs/*.md; 2 with one line when there is no docs/ folder."""
    if not DOCS.is_dir():
        print(f"vimbench.docs: error: no docs folder at {DOCS}: run it from a vimbench checkout", file=sys.stderr)
        return 2
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        new = regenerate(text)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
