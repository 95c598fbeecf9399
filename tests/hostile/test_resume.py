"""``--resume`` on hostile CSVs: hypothesis-generated flops CSVs (odd types, NaN/inf, formulas, control characters
in cells, ragged rows, huge cells, a last row torn at any byte or without its line end, a torn header) resumed by
``vimbench flops`` with its counting stubbed. The rule, from the generated file alone:

  * a malformed row before the last: exit 2, one line naming it, the file byte for byte unchanged;
  * otherwise exit 0: every whole row kept byte for byte, a torn last row moved to ``<name>.torn`` and its
    configuration measured again (never counted done, never glued to the next row), every configuration ok.
"""
from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from run_cli import records, run_cli, stub_flops  # noqa: F401 (a fixture)
from vimbench.rows.schema import FLOPS

COLUMNS = list(FLOPS.columns)
RES = (32, 48, 64)
ARGV = ["flops", "--models", "deit_tiny", "--attn", "eager", "--res", ",".join(map(str, RES)), "--resume"]
KEYS = {res: dict(model="deit_tiny", impl="eager", res=str(res), batch="1", head="False", mode="infer",
                  grad_checkpointing="False") for res in RES}
"""The key columns of each configuration of ``ARGV``, as a row of ``vimbench flops`` writes them."""
HUGE = 140_000
"""Characters in a huge cell: above the csv module's field limit (131072)."""
BAD = ("ragged",)
"""Kinds of row that are malformed wherever they stand (a huge cell is data)."""

cells = st.one_of(st.sampled_from(["", "nan", "NaN", "inf", "-inf", "1e308", "-0", "0x1p3", "True", "None", '"',
                                   ",", "\r\n", "=1+1", "ok"]), st.text(max_size=10))


@st.composite
def rows(draw) -> tuple[str, list[str]]:
    """(kind, fields): a row of a configuration of ``ARGV`` (status often ok), of garbage, ragged, or with a
    huge cell."""
    kind = draw(st.sampled_from(["key", "garbage", "ragged", "huge"]))
    if kind == "ragged":
        n = draw(st.one_of(st.integers(1, len(COLUMNS) - 1), st.integers(len(COLUMNS) + 1, len(COLUMNS) + 3)))
        return kind, [draw(cells) for _ in range(n)]
    row = {c: draw(cells) for c in COLUMNS}
    if kind != "garbage":
        row.update(KEYS[draw(st.sampled_from(RES))], status=draw(st.sampled_from(["ok", "ok", "error", "OK", " ok"])))
    if kind == "huge":
        row["error"] = "x" * HUGE
    return kind, [row[c] for c in COLUMNS]


def _line(fields: list[str]) -> bytes:
    buf = io.StringIO(newline="")
    csv.writer(buf).writerow(fields)
    return buf.getvalue().encode()


@st.composite
def files(draw) -> tuple[list[tuple[str, list[str]]], list[bytes], bool]:
    """(rows with their kinds, header first; the file's lines; whether its last line is torn)."""
    body = draw(st.lists(rows(), max_size=6))
    kinds = [("header", COLUMNS), *body]
    lines = [_line(fields) for _, fields in kinds]
    tail = draw(st.sampled_from(["whole", "whole", "no line end", "cut"]))
    if tail == "no line end":
        lines[-1] = lines[-1][:-2]
    elif tail == "cut":
        lines[-1] = lines[-1][:draw(st.integers(1, len(lines[-1]) - 1))]
    torn = tail != "whole" or kinds[-1][0] in BAD
    return kinds, lines, torn


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(case=files())
def test_resume_keeps_every_whole_row_and_sets_a_torn_one_aside(stub_flops, case):  # noqa: F811
    kinds, lines, torn = case
    before = b"".join(lines)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "f.csv"
        out.write_bytes(before)
        rc, _, err = run_cli([*ARGV, "--out", str(out)])
        after, side = out.read_bytes(), out.with_name("f.csv.torn")
        assert "Traceback" not in err
        if any(kind in BAD for kind, _ in kinds[1:-1]):  # a malformed row before the last one
            assert rc == 2 and after == before and not side.exists()
            [line] = err.strip().splitlines()
            assert line.startswith("vimbench flops: error: cannot --resume") and "malformed" in line
            return
        assert rc == 0, err
        kept = b"".join(lines[:-1]) if torn else before
        assert after.startswith(kept)  # no whole row lost or changed
        assert side.read_bytes() == lines[-1] + b"\n" if torn else not side.exists()
        assert ("was torn" in err) == torn
        whole = kinds[1:-1] if torn else kinds[1:]
        done = {res for res in RES for _, fields in whole
                if dict(zip(COLUMNS, fields)) == {**dict(zip(COLUMNS, fields)), **KEYS[res], "status": "ok"}}
        new = records(after[len(kept):])
        if not kept:  # the header itself was torn: written again
            assert new.pop(0) == COLUMNS
        assert all(len(r) == len(COLUMNS) for r in new)
        new = [dict(zip(COLUMNS, r)) for r in new]
        assert sorted(int(r["res"]) for r in new) == [res for res in RES if res not in done]
        assert all(r["status"] == "ok" and r == {**r, **KEYS[int(r["res"])]} for r in new)
