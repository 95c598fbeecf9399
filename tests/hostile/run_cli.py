"""What the hostile-input tests share: a command run in-process through ``main`` with its output captured, the
rule every refusal follows, and ``vimbench flops`` with its counting stubbed (a sweep that needs no timing)."""
from __future__ import annotations

import contextlib
import csv
import io

import pytest

from vimbench.commands import main
from vimbench.count.flops import FlopCount
from vimbench.rows import flops as flops_rows


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``vimbench argv``; an exception ``main`` lets through (a traceback) fails
    the test that called it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def the_one_line(err: str, command: str) -> str:
    """The message of a refused or stopped command: ``err`` holds exactly one line starting "vimbench
    <command>: " and it is the last (lines before it are a progress bar or notes); no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"vimbench {command}: ")]
    assert len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0], err
    return lines[0]


def records(data: bytes) -> list[list[str]]:
    """The records of a CSV that must be whole: empty (no records: a resumed sweep with nothing left to run), or it
    ends in a line end and reads strictly (``csv`` raises on an open quote)."""
    assert not data or data.endswith(b"\n"), data[-80:]
    return list(csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""), strict=True))


def fake_count_flops(cfg) -> FlopCount:
    """Made-up FLOP columns of a configuration (linear in tokens), without building the model."""
    tokens, batch = (cfg.res // 16) ** 2 + 1, cfg.batch
    return FlopCount(flops_total=10 * tokens * batch, flops_scan=0, flops_attention=4 * tokens * batch,
                     flops_linear=6 * tokens * batch, flops_other=0, params=1000, tokens=tokens)


@pytest.fixture(scope="module")
def stub_flops():
    """``vimbench flops`` counts with ``fake_count_flops`` for the module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flops_rows, "count_flops", fake_count_flops)
        yield
