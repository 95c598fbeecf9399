"""Append-only CSV results: one row per configuration, written whole and synced as it finishes, never rewritten.

A sweep killed at any moment, or stopped by a full disk, leaves a valid CSV of the rows already finished:
each row goes to the file in one append followed by ``fsync``, and a write that fails is cut back off the file.
While a command writes a CSV it holds an exclusive lock on it (``fcntl.flock``): a second run on the same file
is refused. ``--resume`` reads the existing file and refuses it if its columns differ or a row before the last
is malformed; a torn last row (a write cut short: no line end, an open quote, too few or too many fields) is
moved to ``<name>.torn`` beside it and its configuration runs again. The rest tells which configurations are
already ``ok``.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import re
import sys
from pathlib import Path

from vimbench.errors import InputError
from vimbench.rows.schema import Schema

TORN_SUFFIX = ".torn"
"""Appended to a CSV's name for the file that keeps the torn last rows ``--resume`` set aside."""
_LINE = re.compile(r"[^\n]*\n|[^\n]+")


def check_writable(path: str | os.PathLike) -> None:
    """InputError unless ``path`` is a regular file (or does not exist yet) that can be created or appended to.
    Creates missing parent folders; never creates or truncates the file itself."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out {path} is a directory, not a file")
    if path.exists() and not path.is_file():
        raise InputError(f"--out {path} is not a regular file (a device, pipe or socket): name a CSV file")
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


def write_new_file(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` (absent or empty: ``check_new_file``) and syncs it; a write that fails (a full
    disk) leaves the file empty and InputError names the reason: never a half-written file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:
        raise InputError(f"cannot write --out {path}: {e.strerror or e}") from None
    try:
        _write_all(fd, text.encode())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        raise InputError(f"cannot write --out {path}: {e.strerror or e}; nothing was written") from None
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> int:
    """Writes all of ``data`` to ``fd`` and syncs it; the bytes written so far are in the exception's
    ``written`` attribute if a write fails."""
    done = 0
    try:
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    except BaseException as e:
        e.written = done
        raise
    return done


def _line(values: list) -> bytes:
    """One CSV record (``csv`` quoting, ``\\r\\n`` line end), UTF-8."""
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
    return buf.getvalue().encode("utf-8", "backslashreplace")


def _records(text: str) -> tuple[list[tuple[int, int, list[str] | str]], int]:
    """The non-blank CSV records of ``text`` as (start char, first line number, fields), read strictly up to the
    first that cannot be read, which ends the list with why in place of its fields; and the char where reading
    stopped (``len(text)`` unless a record before the end could not be read)."""
    ends = [0]  # where each line the reader took ends

    def lines():
        for m in _LINE.finditer(text):
            ends.append(m.end())
            yield m.group()

    reader, records = csv.reader(lines(), strict=True), []
    limit = csv.field_size_limit(len(text) + 1)  # a huge cell is data, not a malformed record
    try:
        while ends[-1] < len(text):
            start, first = ends[-1], reader.line_num + 1
            try:
                fields = next(reader)
            except csv.Error as e:
                fields = str(e)
            if fields != []:  # blank lines are skipped, as csv.DictReader does
                records.append((start, first, fields))
            if isinstance(fields, str):
                break
    finally:
        csv.field_size_limit(limit)
    return records, ends[-1]


class CsvLog:
    """Rows of one ``Schema`` appended to ``path``, which stays locked until ``close`` (or the end of a
    ``with`` block, or of the process).

    resume=False: ``path`` must not hold results yet (an existing non-empty file is refused, never
    overwritten). resume=True: ``path`` may exist and must have exactly the schema's columns; ``rows``
    holds its rows (a torn last row set aside, see the module docstring).
    """

    @classmethod
    def open(cls, path: str | os.PathLike, schema: Schema, resume: bool, given: bool = True) -> "CsvLog":
        """The log a command writes: ``path`` is its --out (``given``) or a default name; --resume needs
        an explicit --out."""
        if resume and not given:
            raise InputError("--resume needs --out naming the CSV to continue")
        return cls(path, schema, resume=resume)

    def __init__(self, path: str | os.PathLike, schema: Schema, resume: bool = False):
        self.path, self.schema, self.columns = Path(path), schema, list(schema.columns)
        self.rows: list[dict] = []
        check_writable(self.path)
        created = not self.path.exists()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as e:
            raise InputError(f"cannot write --out {self.path}: {e.strerror or e}") from None
        try:
            self._lock()
            size = os.fstat(self._fd).st_size
            if size and not resume:
                raise InputError(f"{self.path} already holds results; use --resume to continue it or another --out")
            if size:
                self.rows = self._read()
            if not os.fstat(self._fd).st_size:
                self._write(_line(self.columns))
        except BaseException:
            if created and not os.fstat(self._fd).st_size:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self.close()
            raise

    def __enter__(self) -> "CsvLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Releases the lock and the file; no more rows can be appended."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _lock(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"--out {self.path} is being written by another vimbench run: wait for it to end "
                             "or choose another --out") from None
        except OSError as e:  # a file system without locks (some network mounts): said, not silent
            print(f"warning: cannot lock --out {self.path} ({e.strerror or e}); a second run on it would not be "
                  "refused", file=sys.stderr)

    def _read(self) -> list[dict]:
        """The rows of the existing file; a torn last record (see the module docstring) moved to the side file
        and cut off; InputError for other columns or a malformed record before the last."""
        text = self.path.read_bytes().decode("utf-8", "surrogateescape")
        records, end = _records(text)
        torn = None  # (start, first line, why) of a torn last record
        if records:
            start, first, fields = records[-1]
            why = (fields if isinstance(fields, str) else
                   "no line end" if not text.endswith("\n") else
                   f"{len(fields)} fields, not {len(self.columns)}" if len(records) > 1
                   and len(fields) != len(self.columns) else "")
            if why and end == len(text):
                torn = (start, first, why)
                records.pop()
        header, *rows = records or [(0, 1, self.columns)]
        if header[2] != self.columns:
            found = header[2] if isinstance(header[2], list) else []
            missing, extra = sorted(set(self.columns) - set(found)), sorted(set(found) - set(self.columns))
            raise InputError(f"cannot --resume {self.path}: its columns differ "
                             f"(missing {missing or 'none'}, unexpected {extra or 'none'})")
        for _, first, fields in rows:
            if isinstance(fields, str) or len(fields) != len(self.columns):
                why = fields if isinstance(fields, str) else f"{len(fields)} fields, not {len(self.columns)}"
                raise InputError(f"cannot --resume {self.path}: line {first} is malformed ({why}); only a torn last "
                                 f"row is set aside: mend or remove line {first}")
        if torn:
            self._set_aside(text, *torn)
        return [dict(zip(self.columns, fields)) for _, _, fields in rows]

    def _set_aside(self, text: str, start: int, first: int, why: str) -> None:
        """Moves the torn record from char ``start`` to the end to the side file, then cuts it off the CSV."""
        side = self.path.with_name(self.path.name + TORN_SUFFIX)
        torn = text[start:].encode("utf-8", "surrogateescape")
        try:
            with open(side, "ab") as f:
                _write_all(f.fileno(), torn + b"\n")
            os.ftruncate(self._fd, len(text[:start].encode("utf-8", "surrogateescape")))
            os.fsync(self._fd)
        except OSError as e:
            raise InputError(f"cannot --resume {self.path}: its last row is torn ({why}) and cannot be set aside "
                             f"in {side}: {e.strerror or e}") from None
        print(f"resuming {self.path}: its last row (line {first}) was torn ({why}); moved to {side}, its "
              "configuration runs again", file=sys.stderr)

    def key(self, row: dict) -> tuple:
        """The configuration key of a row (or configuration dict): its values of ``Schema.key``, as strings."""
        return tuple(str(row[c]) for c in self.schema.key)

    def done(self) -> set[tuple]:
        """Keys of the rows already present with status ok."""
        return {self.key(r) for r in self.rows if r.get("status") == "ok"}

    def append(self, row: dict) -> None:
        """Writes one row (missing columns empty, unknown keys rejected) and syncs it to disk. A write that
        fails (a full disk) is cut off the file, which keeps every row before it: InputError naming why."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"row has columns the CSV does not: {sorted(unknown)}")
        self._write(_line([row.get(c, "") for c in self.columns]))
        self.rows.append(row)

    def _write(self, data: bytes) -> None:
        size = os.fstat(self._fd).st_size  # the lock keeps other vimbench runs from appending meanwhile
        try:
            _write_all(self._fd, data)
        except BaseException as e:
            if isinstance(e, OSError) or e.written < len(data):  # never a partial row
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
                    os.fsync(self._fd)
            if isinstance(e, OSError):
                raise InputError(f"cannot write --out {self.path}: {e.strerror or e}; the rows written before are "
                                 "kept (--resume continues it)") from None
            raise
