"""`vimbench check-kernels`: every launcher configuration compiles for sm_80 and sm_90 without spills."""
import csv
import json
import os

import pytest

from vimbench.commands import main
from vimbench.kernels.selective_scan.triton_kernel import kernel_configs

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles the real kernels; TRITON_INTERPRET=1 replaces them")


def test_check_kernels_compiles_both_archs_without_spills(tmp_path, capsys):
    out = tmp_path / "kernels.csv"
    assert main(["check-kernels", "--out", str(out)]) == 0
    assert "sm_90" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(kernel_configs())
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["status"] == "ok", r
        assert int(r["registers"]) > 0 and int(r["spill_bytes"]) == 0 and int(r["shared_bytes"]) >= 0


def test_check_kernels_json(capsys):
    assert main(["check-kernels", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"} and all(r["registers"] > 0 for r in rows)


def test_check_kernels_bad_out_is_one_line_exit_2(capsys):
    assert main(["check-kernels", "--out", "report.txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vimbench check-kernels: error:") and "\n" not in err
