"""Where a sweep writes, and how it stops: --out on a device or in /proc and /sys, a read-only --out-dir, a disk
that fills up at any byte (a file-size limit, ``RLIMIT_FSIZE``, set around the call: writes past it fail as on a
full disk), Ctrl-C at any configuration, and a second run on a CSV being written. ``vimbench flops`` (counting
stubbed) is the sweep. The rule: one line, exit 2 (130 for Ctrl-C), no traceback, every whole row kept and no
partial one, and --resume completes the CSV afterwards."""
from __future__ import annotations

import contextlib
import resource
import signal
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers_csv import scaling_frame
from run_cli import fake_count_flops, records, run_cli, stub_flops, the_one_line  # noqa: F401 (a fixture)
from vimbench.rows import flops as flops_rows
from vimbench.rows.schema import FLOPS
from vimbench.rows.writer import CsvLog

RES = (32, 48, 64, 80, 96, 112)
ARGV = ["flops", "--models", "deit_tiny", "--attn", "eager", "--res", ",".join(map(str, RES))]


def _whole_rows(path: Path) -> list[dict]:
    """The rows of ``path``, which must hold the flops header and whole rows only, in configuration order."""
    header, *rows = records(path.read_bytes())
    assert header == list(FLOPS.columns) and all(len(r) == len(header) for r in rows)
    rows = [dict(zip(header, r)) for r in rows]
    assert [int(r["res"]) for r in rows] == list(RES[:len(rows)]) and all(r["status"] == "ok" for r in rows)
    return rows


def _resumed(out: Path) -> None:
    rc, _, err = run_cli([*ARGV, "--out", str(out), "--resume"])
    assert rc == 0, err
    assert len(_whole_rows(out)) == len(RES)


@pytest.mark.parametrize("out", ["/dev/null", "/dev/full", "/proc/self/status", "/proc/vimbench-nope/x.csv",
                                 "/sys/vimbench.csv"])
def test_out_on_a_device_or_a_kernel_file_system_is_one_line_exit_2(stub_flops, out):
    rc, _, err = run_cli([*ARGV, "--out", out])
    assert rc == 2 and the_one_line(err, "flops").startswith("vimbench flops: error: ")


@pytest.mark.parametrize("command", ["plot", "report"])
@pytest.mark.parametrize("out_dir", ["/sys", "/proc/self"])
def test_an_out_dir_that_cannot_be_written_is_one_line_exit_2(tmp_path, command, out_dir):
    # /sys and /proc refuse new files to root too (a folder's mode bits would not stop a root test run)
    csv = tmp_path / "s.csv"
    scaling_frame().to_csv(csv, index=False)
    rc, _, err = run_cli([command, "--out-dir", out_dir, str(csv)])
    assert rc == 2 and the_one_line(err, command).startswith(f"vimbench {command}: error: --out-dir {out_dir}")


@contextlib.contextmanager
def _disk_full_at(size: int):
    """Writes past ``size`` bytes of any file fail (EFBIG, as ENOSPC would) while in the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the signal would end the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


FULL = 4096
"""More bytes than a run of ``ARGV`` writes (its header and six rows)."""


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(size=st.integers(0, FULL))
def test_a_disk_that_fills_up_ends_the_sweep_with_one_line_and_whole_rows(stub_flops, size):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "f.csv"
        with _disk_full_at(size):
            rc, _, err = run_cli([*ARGV, "--out", str(out)])
        if rc == 0:  # it fitted
            assert len(_whole_rows(out)) == len(RES)
            return
        assert rc == 2 and the_one_line(err, "flops").startswith(f"vimbench flops: error: cannot write --out {out}")
        assert not out.exists() or out.stat().st_size <= size
        if out.exists() and out.stat().st_size:
            _whole_rows(out)
            _resumed(out)


@settings(max_examples=len(RES), deadline=None, derandomize=True, database=None)
@given(stop=st.integers(0, len(RES) - 1))
def test_ctrl_c_ends_a_sweep_with_one_line_exit_130_and_the_rows_kept(stop):
    def count(cfg):
        if cfg.res == RES[stop]:
            raise KeyboardInterrupt
        return fake_count_flops(cfg)

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(flops_rows, "count_flops", count)
        out = Path(tmp) / "f.csv"
        rc, _, err = run_cli([*ARGV, "--out", str(out)])
        assert rc == 130
        assert str(out) in the_one_line(err, "flops") and "--resume" in err
        assert len(_whole_rows(out)) == stop
        mp.setattr(flops_rows, "count_flops", fake_count_flops)
        _resumed(out)


def test_a_second_run_on_a_csv_being_written_is_refused(stub_flops, tmp_path):
    out = tmp_path / "f.csv"
    with CsvLog(out, FLOPS):  # a run still writing it
        before = out.read_bytes()
        rc, _, err = run_cli([*ARGV, "--out", str(out), "--resume"])
        assert rc == 2 and "being written by another vimbench run" in the_one_line(err, "flops")
        assert out.read_bytes() == before
    _resumed(out)  # the first run ended: the lock is gone
