"""`vimbench report` and `plot` on hostile CSVs: generated damage to a good CSV, and crafted cases.

A good scaling or kernel CSV (``helpers_csv``) is damaged by a drawn list of edits: a cell set to inf,
-inf, NaN, zero, a negative, a huge or tiny number, text, or a name with ``/``, a space, ``|`` or a line
break; a line cut short (ragged), given an extra field, or the file torn at a byte; rows repeated (huge).
Each call runs the real command (figures drawn at a low resolution to keep it fast) and must:

  * exit 0 or 2, never with an unhandled exception; on exit 2 print one line naming the problem;
  * write nothing outside its --out-dir, and only file names made of letters, digits and ``_ . + -``;
  * on exit 0, never pass over an unusable value in silence: an ok row whose time, throughput, memory,
    FLOPs, resolution or tokens is infinite, zero or negative, or whose setting cell is not a plain name,
    is named in a note (report.md's "Rows left out", plot's ``note:`` lines).
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from helpers_csv import kernel_frame, scaling_frame
from vimbench.commands import main

BAD_NUMBERS = ["inf", "-inf", "0", "-1", "-0.0", "1e400", "1e-400"]
VALUES = BAD_NUMBERS + ["nan", "", "1e300", "1e-300", "2.5", "abc", " 7 ", "0x10"]
NAMES = ["cuda/0", "../../escape", "a b", "fp32|x", "fp32\nx", "cpu\r", "x" * 300, "fp32"]
NUMERIC = {"scaling": ["time_ms", "throughput_img_s", "mem_peak_gib", "flops_total", "res", "tokens", "batch",
                       "time_ms_p10", "flops_scan"],
           "kernels": ["time_ms", "mem_peak_gib", "tokens", "width", "batch", "time_ms_p90"]}
CHECKED = {"time_ms", "throughput_img_s", "mem_peak_gib", "flops_total", "res", "tokens"}
"""Columns whose unusable value in an ok row must be named in a note when the command succeeds."""
NEEDED = {"scaling": {"time_ms", "throughput_img_s", "res"}, "kernels": {"time_ms", "tokens"}}
"""Columns that an ok row cannot be drawn without: empty or NaN there is unusable too."""
SETTING_NAMES = ["device", "dtype"]
PLAIN_FILE = re.compile(r"[A-Za-z0-9_.+-]+")


@pytest.fixture(autouse=True)
def fast_figures(monkeypatch):
    """Figures drawn for real, the PNG at 10 dpi (the drawing of log axes, limits and text is what can
    fail); the PDF, a second drawing of the same figure, written empty."""
    real = Figure.savefig

    def savefig(self, fname, **kw):
        if str(fname).endswith(".pdf"):
            Path(fname).write_bytes(b"")
        else:
            real(self, fname, **{**kw, "dpi": 10})
    monkeypatch.setattr(Figure, "savefig", savefig)


def base_rows(kind: str) -> list[dict]:
    df = scaling_frame() if kind == "scaling" else kernel_frame()
    return [{k: ("" if isinstance(v, float) and math.isnan(v) else str(v)) for k, v in r.items()}
            for r in df.to_dict("records")]


def csv_text(rows: list[dict], edits) -> tuple[str, list[tuple[int, str, str]]]:
    """The CSV of ``rows`` after ``edits``; also the cells set (row, column, value)."""
    rows = [dict(r) for r in rows]
    header = list(rows[0])
    cells, cut, extra, torn, repeat = [], set(), set(), None, 1
    for edit in edits:
        if edit[0] == "cell":
            _, i, col, value = edit
            rows[i % len(rows)][col] = value
            cells.append((i % len(rows), col, value))
        elif edit[0] == "ragged":
            cut.add(edit[1] % len(rows))
        elif edit[0] == "extra":
            extra.add(edit[1] % len(rows))
        elif edit[0] == "torn":
            torn = edit[1]
        else:
            repeat = edit[1]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for _ in range(repeat):
        for i, r in enumerate(rows):
            values = [r[c] for c in header]
            w.writerow(values[: len(values) // 2] if i in cut else values + ["x"] if i in extra else values)
    text = out.getvalue()
    return (text[: int(len(text) * torn)] if torn is not None else text), cells


def edits(kind: str):
    cell = st.tuples(st.just("cell"), st.integers(0, 40), st.sampled_from(NUMERIC[kind]), st.sampled_from(VALUES))
    name = st.tuples(st.just("cell"), st.integers(0, 40), st.sampled_from(SETTING_NAMES), st.sampled_from(NAMES))
    shape = st.one_of(st.tuples(st.sampled_from(["ragged", "extra"]), st.integers(0, 40)),
                      st.tuples(st.just("torn"), st.floats(0.05, 0.99)),
                      st.tuples(st.just("repeat"), st.integers(2, 8)))
    return st.lists(st.one_of(cell, cell, name, shape), min_size=1, max_size=4)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def unusable(kind: str, col: str, value: str) -> bool:
    """Whether ``value`` cannot be drawn in ``col`` (text is refused whole: the exit-code rule covers it)."""
    try:
        x = float(value) if value.strip() else math.nan
    except ValueError:
        return False
    return col in NEEDED[kind] if math.isnan(x) else not 1e-30 <= x <= 1e30


def run(command: str, kind: str, text: str, cells, tmp_path: Path, capsys) -> None:
    """Runs ``command`` on the CSV ``text`` and asserts the rules of the module docstring."""
    src = tmp_path / "src"
    src.mkdir(parents=True)
    (src / "sweep.csv").write_text(text)
    (src / "kept.csv").write_text("written earlier\n")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    try:
        code = main([command, str(src / "sweep.csv"), "--out-dir", str(out)])
    except BaseException as e:  # noqa: BLE001 (the rule: never a traceback)
        pytest.fail(f"{command} raised {type(e).__name__}: {e}")
    captured = capsys.readouterr()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before
    assert all(PLAIN_FILE.fullmatch(p.name) for p in out.rglob("*")), sorted(map(str, out.rglob("*")))
    if code == 2:
        assert captured.err.count("\n") == 1 and captured.err.startswith(f"vimbench {command}: error:"), captured.err
        return
    assert code == 0, captured.err
    if command == "report":
        report = (out / "report.md").read_text()
        notes = report.split("## Rows left out")[1] if "## Rows left out" in report else ""
    else:
        notes = "\n".join(ln for ln in captured.out.splitlines() if ln.startswith("note:"))
    notes = notes.replace(str(src / "sweep.csv"), "").replace("sweep.csv", "")
    rows = list(csv.DictReader(io.StringIO(text)))
    for i, col, value in cells:
        ok = i < len(rows) and (rows[i].get("status") or "") == "ok"
        if ok and rows[i].get(col) == value and (col in CHECKED and unusable(kind, col, value)
                                                 or col in SETTING_NAMES and value not in ("fp32", "")):
            assert re.search(rf"\b{col}\b", notes), f"{col}={value!r} in ok row {i + 1} passed without a note"


CRAFTED = {**{f"time-{v}": [("cell", 0, "time_ms", v)] for v in BAD_NUMBERS},
           "all-times-nan": [("cell", i, "time_ms", "nan") for i in range(60)],
           "mem-zero": [("cell", 0, "mem_peak_gib", "0")], "mem-negative": [("cell", 2, "mem_peak_gib", "-2")],
           "tokens-negative": [("cell", 0, "tokens", "-3")], "batch-zero": [("cell", 0, "batch", "0")],
           "batch-inf": [("cell", 0, "batch", "inf")], "time-text": [("cell", 0, "time_ms", "abc")],
           "slash-in-device": [("cell", 0, "device", "cuda/../../x")],
           "newline-in-dtype": [("cell", 0, "dtype", "fp32\nx")], "pipe-in-dtype": [("cell", 0, "dtype", "fp|32")],
           "ragged": [("ragged", 3)], "extra-field": [("extra", 3)], "torn": [("torn", 0.5)],
           "batch-huge": [("cell", 1, "batch", "1e300")], "batch-fraction": [("cell", 1, "batch", "1.5")],
           "time-huge-torn": [("torn", 0.52), ("cell", 1, "time_ms", "1e300")],
           "time-tiny": [("cell", 0, "time_ms", "1e-300")], "tokens-huge": [("cell", 0, "tokens", "1e300")]}
"""Crafted damage: name -> edits (see ``csv_text``)."""


FAST = ("time-inf", "slash-in-device", "all-times-nan")
"""The crafted cases of the default run; the others, and the generated ones, are slow (2 to 5 s of CPU a
call: the figures are drawn)."""


@pytest.mark.parametrize("command, kind", [("report", "scaling"), ("plot", "scaling"), ("plot", "kernels")])
@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CRAFTED])
def test_crafted_damage(command, kind, case, tmp_path, capsys):
    edits = [e for e in CRAFTED[case] if e[0] != "cell" or e[2] in NUMERIC[kind] + SETTING_NAMES]
    rows = base_rows(kind)
    run(command, kind, *csv_text(rows, [e for e in edits if e[0] != "cell" or e[1] < len(rows)]), tmp_path, capsys)


def _generated(command: str, kind: str):
    @pytest.mark.slow
    @settings(max_examples=20, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(edits(kind))
    def test(tmp_path_factory, capsys, drawn):
        run(command, kind, *csv_text(base_rows(kind), drawn), tmp_path_factory.mktemp(command), capsys)
    return test


test_generated_report_scaling = _generated("report", "scaling")
test_generated_plot_scaling = _generated("plot", "scaling")
test_generated_plot_kernels = _generated("plot", "kernels")
