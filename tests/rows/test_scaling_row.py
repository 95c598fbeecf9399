"""rows/scaling.py: what a scaling row keeps when the counting or the prediction beside the measurement fails."""
from __future__ import annotations

from vimbench.config import ScalingConfig
from vimbench.rows import scaling as scaling_rows

CFG = ScalingConfig("deit_tiny", {"attn": "eager"}, res=32, batch=1, warmup=0, repeats=1, min_time=0)
MEASURED = {"status": "ok", "time_ms": 3.0, "throughput_img_s": 333.3}


def test_a_failed_flop_count_keeps_the_measured_row(monkeypatch):
    monkeypatch.setattr(scaling_rows, "run_isolated", lambda fn, args, timeout=None: dict(MEASURED))

    def broken(cfg):
        raise TypeError("formula broke")

    monkeypatch.setattr(scaling_rows, "count_flops", broken)
    row = scaling_rows.scaling_row(CFG, {}, backoff=False)
    assert row["status"] == "ok" and row["time_ms"] == 3.0 and "flops_total" not in row
    assert row["error"] == "flops failed: TypeError: formula broke"
    assert row["mem_pred_peak_gib"] > 0          # the prediction still ran


def test_counts_are_added_when_they_work(monkeypatch):
    monkeypatch.setattr(scaling_rows, "run_isolated", lambda fn, args, timeout=None: dict(MEASURED))
    row = scaling_rows.scaling_row(CFG, {}, backoff=False)
    assert row["status"] == "ok" and row["flops_total"] > 0 and row["tokens"] == 5 and "error" not in row
