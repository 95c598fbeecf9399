"""The Triton design comparison: which design is faster at Vim-Ti 1248, batch 64, and by how much."""
import pandas as pd

from vimbench.analysis.designs import describe, design_comparison


def rows(*specs):
    return pd.DataFrame([dict(op=op, impl=impl, dtype=dtype, model="vim_tiny", tokens=tokens, batch=64, status=status,
                              time_ms=ms) for op, impl, dtype, tokens, status, ms in specs])


def test_faster_design_and_speedup_per_op_and_dtype():
    df = rows(("scan_bidir", "triton", "fp32", 6085, "ok", 2.0), ("scan_bidir", "triton_pipelined", "fp32", 6085, "ok", 1.6),
              ("scan", "triton", "bf16", 6085, "ok", 0.5), ("scan", "triton_pipelined", "bf16", 6085, "ok", 0.8),
              ("scan", "triton", "fp32", 197, "ok", 0.1), ("scan", "triton_pipelined", "fp32", 197, "ok", 0.05),
              ("scan", "triton", "fp32", 6085, "ok", 1.0), ("scan", "triton_pipelined", "fp32", 6085, "error", None),
              ("scan", "cpu", "bf16", 6085, "ok", 0.1))
    out = design_comparison(df)
    assert [(r["op"], r["dtype"], r["faster"]) for r in out] == [("scan", "bf16", "triton"),
                                                                 ("scan_bidir", "fp32", "triton_pipelined")]
    assert out[0]["speedup"] == 0.8 / 0.5 and out[1]["speedup"] == 2.0 / 1.6
    assert describe(out[1]) == "scan_bidir fp32: triton_pipelined is 1.25x faster than triton (1.6 ms vs 2 ms)"
