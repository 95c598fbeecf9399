"""The two Triton scan designs against each other (``kernels.selective_scan.triton_kernel.DESIGNS``): which is
faster at one shape, and by how much, from the ok rows of a kernels CSV."""
from __future__ import annotations

import pandas as pd

from vimbench.kernels.selective_scan.backends import TRITON_DESIGNS

VIM_TI_1248 = {"model": "vim_tiny", "tokens": 6085, "batch": 64}
"""The shape the designs are chosen at: Vim-Ti at 1248 px (L = 78^2 + 1), batch 64."""


def design_comparison(kernels: pd.DataFrame, at: dict = VIM_TI_1248) -> list[dict]:
    """One row per (op, dtype) where every design has an ok scan row at ``at`` (columns to values):
    op, dtype, one ``<design>_ms`` column each (median time_ms), faster (the design with the smaller time)
    and speedup (slower / faster time, >= 1). Empty for a table without those columns (a CSV cut short)."""
    if not {"impl", "op", "status", "dtype", "time_ms", *at} <= set(kernels.columns):
        return []
    rows = kernels[kernels["impl"].isin(TRITON_DESIGNS) & kernels["op"].isin(["scan", "scan_bidir"])
                   & (kernels["status"] == "ok")]
    for column, value in at.items():
        rows = rows[rows[column] == value]
    out = []
    for (op, dtype), g in rows.groupby(["op", "dtype"], sort=True):
        times = g.drop_duplicates("impl", keep="last").set_index("impl")["time_ms"]
        if set(times.index) != set(TRITON_DESIGNS):
            continue
        fastest, slowest = times.idxmin(), times.idxmax()
        out.append({"op": op, "dtype": dtype, **{f"{d}_ms": float(times[d]) for d in TRITON_DESIGNS},
                    "faster": fastest, "speedup": float(times[slowest] / times[fastest])})
    return out


def describe(row: dict) -> str:
    """'scan_bidir fp32: triton_pipelined is 1.32x faster than triton (1.23 ms vs 1.62 ms)'."""
    slower = next(d for d in TRITON_DESIGNS if d != row["faster"])
    return (f"{row['op']} {row['dtype']}: {row['faster']} is {row['speedup']:.2f}x faster than {slower} "
            f"({row[row['faster'] + '_ms']:.3g} ms vs {row[slower + '_ms']:.3g} ms)")
