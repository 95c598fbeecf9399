"""Which rows of a checked result CSV (``reader.load_results``) ``report`` and ``plot`` can draw and fit.

Figures put times, memory and FLOPs on log axes and fit power laws in log-log space; file names carry the
values of a setting's columns (``reader.split_settings``). So, per kind of CSV:

  * a row is left out when a setting cell (device, dtype, batch, ...) is empty, or text that is not a plain
    name (letters, digits, ``_ . : + -``, at most ``NAME_MAX`` characters: no ``/``, space or line break),
    or a number that is not a whole number from 0 to 2**31 - 1 (1 up for a batch or width); when a position
    on the x axis (res, tokens) or the batch it ran at is not a positive number within ``RANGE``; and, for
    an ok row, when its time or throughput is not (``POSITIVE``);
  * a value that is only drawn or fitted where present (``BLANKED``: percentiles, memory, FLOPs) is blanked
    when it is not within ``RANGE`` (FLOP parts: infinite or negative), so the rest of its row is kept.

Each left-out row and blanked value is counted in a note (rows numbered from 1, the first after the
header); a CSV with no ok row left is refused with one line.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from vimbench.errors import InputError
from vimbench.rows.schema import SCHEMAS

NAME_MAX = 40
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:+-]{{0,{NAME_MAX - 1}}}")
_POSITIVE_KEYS = ("batch", "width")  # setting columns that must be above 0 (batch_requested may be 0: --max-batch)

POSITIVE = {
    "scaling": {"every": ("res",), "present": ("tokens", "batch"), "ok": ("time_ms", "throughput_img_s", "batch")},
    "kernels": {"every": ("tokens",), "present": (), "ok": ("time_ms",)},
    "memory": {"every": ("res",), "present": ("tokens", "batch"), "ok": ("tokens", "mem_pred_peak_gib",
                                                                          "mem_pred_used_gib")},
}
"""Columns whose cell must be a positive number within ``RANGE``, or the row is left out: in ``every`` row, where
``present`` (not empty), and in ``ok`` rows."""
BLANKED = {
    "scaling": {"positive": ("time_ms_p10", "time_ms_p90", "mem_peak_gib", "mem_reserved_gib", "mem_nvml_gib",
                             "mem_pred_peak_gib", "flops_total"),
                "nonnegative": ("flops_scan", "flops_attention", "flops_linear", "flops_other")},
    "kernels": {"positive": ("time_ms_p10", "time_ms_p90", "mem_peak_gib"), "nonnegative": ()},
    "memory": {"positive": ("paper_gib",), "nonnegative": ()},
}
"""Columns whose value is blanked (the row kept) when it is not positive within ``RANGE`` (finite, non-negative)."""


RANGE = (1e-30, 1e30)
"""A drawn value lies in this range: log axes spanning more decades overflow matplotlib's limits and guides."""


def _positive(col: pd.Series) -> pd.Series:
    """Where ``col`` is a positive number within ``RANGE`` (never NaN or infinite)."""
    return (col >= RANGE[0]) & (col <= RANGE[1])


def _setting_ok(kind: str, df: pd.DataFrame) -> dict[str, pd.Series]:
    """Per setting column of ``kind`` (those scaling and kernel CSVs name files by), which rows hold a
    usable value."""
    if kind not in ("scaling", "kernels"):
        return {}
    out = {}
    for col in SCHEMAS[kind].setting:
        values = df[col]
        if pd.api.types.is_bool_dtype(values):
            continue
        if pd.api.types.is_numeric_dtype(values):
            whole = np.isfinite(values) & (values == np.floor(values)) & (values < 2**31)
            out[col] = whole & ((values > 0) if col in _POSITIVE_KEYS else (values >= 0))
        else:
            out[col] = values.map(lambda v: isinstance(v, str) and _NAME.fullmatch(v) is not None)
    return out


def _rows(mask: pd.Series) -> str:
    """The row numbers (1: the first after the header) where ``mask`` holds, the first five."""
    where = [int(i) + 1 for i in mask.index[mask]]
    return ", ".join(map(str, where[:5])) + (f" and {len(where) - 5} more" if len(where) > 5 else "")


def _example(values: pd.Series) -> str:
    first = values.iloc[0]
    return repr(first.item() if isinstance(first, np.generic) else first)


def plottable(kind: str, df: pd.DataFrame, source) -> tuple[pd.DataFrame, list[str]]:
    """(the rows of ``df`` that can be drawn and fitted, with unusable optional values blanked; one note per
    reason a row was left out or a value blanked, naming ``source``). ``df`` comes from
    ``reader.load_results`` (its index counts the CSV's rows from 0). Raises ``InputError`` when no ok row
    is left."""
    rules, reasons = POSITIVE[kind], []
    ok = df["status"] == "ok"
    checks = _setting_ok(kind, df)
    checks.update({col: _positive(df[col]) for col in rules["every"] if col in df.columns})
    checks.update({col: checks.get(col, True) & (df[col].isna() | _positive(df[col]))
                   for col in rules["present"] if col in df.columns})
    checks.update({col: checks.get(col, True) & (~ok | _positive(df[col])) for col in rules["ok"] if col in df.columns})
    keep = pd.Series(True, index=df.index)
    for col, good in checks.items():
        bad = keep & ~good
        if bad.any():
            what = ("not a number in range" if pd.api.types.is_numeric_dtype(df[col])
                    else "not a plain name (letters, digits, _ . : + -)")
            reasons.append(f"left out row(s) {_rows(bad)}: {col} empty or {what}, e.g. {_example(df.loc[bad, col])}")
        keep &= good
    out = df[keep].copy()
    blanked = BLANKED[kind]
    for col in blanked["positive"] + blanked["nonnegative"]:
        if col not in out.columns:
            continue
        values = out[col]
        usable = _positive(values) if col in blanked["positive"] else np.isfinite(values) & (values >= 0)
        good = values.isna() | usable
        if not good.all():
            reasons.append(f"blanked {col} in row(s) {_rows(~good)}: "
                           f"{'not within 1e-30..1e30' if col in blanked['positive'] else 'infinite or negative'}, "
                           f"e.g. {_example(values[~good])}; not drawn or fitted")
            out.loc[~good, col] = np.nan
    if not (out["status"] == "ok").any():
        raise InputError(f"{source}: no ok row can be drawn or fitted" + (f" ({reasons[0]})" if reasons else ""))
    return out, [f"{source}: {r}" for r in reasons]
