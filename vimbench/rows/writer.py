"""Append-only CSV results: one row per configuration, flushed as it finishes, never rewritten.

A sweep killed at any moment leaves a valid CSV of the rows already finished. ``--resume`` reads the
existing file, refuses it if its columns differ, and reports which configurations are already ``ok``.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from vimbench.errors import InputError
from vimbench.rows.schema import Schema


def check_writable(path: str | os.PathLike) -> None:
    """InputError unless ``path`` can be created or appended to. Creates missing parent folders; never
    creates or truncates the file itself."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out {path} is a directory, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write --out {path}: {e.strerror}") from None
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise InputError(f"cannot write --out {path}: permission denied")


def check_new_file(path: str | os.PathLike) -> None:
    """``check_writable``, and InputError if ``path`` already holds something (never overwritten)."""
    check_writable(path)
    if Path(path).exists() and Path(path).stat().st_size > 0:
        raise InputError(f"--out {path} already exists; results are never overwritten: choose another path")


class CsvLog:
    """Rows of one ``Schema`` appended to ``path``.

    resume=False: ``path`` must not hold results yet (an existing non-empty file is refused, never
    overwritten). resume=True: ``path`` may exist and must have exactly the schema's columns; ``rows``
    holds its rows.
    """

    @classmethod
    def open(cls, path: str | os.PathLike, schema: Schema, resume: bool, given: bool = True) -> "CsvLog":
        """The log a command writes: ``path`` is its --out (``given``) or a default name; --resume needs
        an explicit --out."""
        if resume and not given:
            raise InputError("--resume needs --out naming the CSV to continue")
        check_writable(path)
        return cls(path, schema, resume=resume)

    def __init__(self, path: str | os.PathLike, schema: Schema, resume: bool = False):
        self.path, self.schema, self.columns = Path(path), schema, list(schema.columns)
        self.rows: list[dict] = []
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not resume:
            raise InputError(f"{self.path} already holds results; use --resume to continue it or another --out")
        if exists:
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != self.columns:
                    missing = sorted(set(self.columns) - set(reader.fieldnames or []))
                    extra = sorted(set(reader.fieldnames or []) - set(self.columns))
                    raise InputError(f"cannot --resume {self.path}: its columns differ "
                                     f"(missing {missing or 'none'}, unexpected {extra or 'none'})")
                self.rows = list(reader)
        else:
            check_writable(self.path)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)

    def key(self, row: dict) -> tuple:
        """The configuration key of a row (or configuration dict): its values of ``Schema.key``, as strings."""
        return tuple(str(row[c]) for c in self.schema.key)

    def done(self) -> set[tuple]:
        """Keys of the rows already present with status ok."""
        return {self.key(r) for r in self.rows if r.get("status") == "ok"}

    def append(self, row: dict) -> None:
        """Writes one row (missing columns empty, unknown keys rejected) and flushes it to disk."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"row has columns the CSV does not: {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({c: row.get(c, "") for c in self.columns})
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
