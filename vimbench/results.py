"""Reading the result CSVs that plots and reports are drawn from (measuring stays elsewhere).

Two kinds, told apart by their columns: a *scaling* CSV (``vimbench scaling``: one row per model, backend
and resolution; has ``res`` and ``throughput_img_s``) and a *kernel* CSV (``vimbench kernels``: one row
per op, backend and sequence length; has ``L`` and ``time_ms``). A CSV can hold several *settings*
(device, dtype, batch, ...): curves are only drawn or fitted within one setting. A scaling setting is keyed
by the batch asked for (``batch_requested``): ``vimbench scaling`` retries an OOM at smaller batches and
records the batch that ran in ``batch``. A CSV without ``batch_requested`` gets it equal to ``batch``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import InputError

SCALING_REQUIRED = ("model", "family", "impl", "res", "tokens", "batch", "dtype", "device", "head", "status",
                    "latency_ms", "latency_ms_p10", "latency_ms_p90", "throughput_img_s", "mem_peak_gib",
                    "flops_total", "flops_scan", "flops_attention", "flops_linear", "flops_other", "device_name")
KERNEL_REQUIRED = ("op", "impl", "L", "width", "batch", "dtype", "device", "status", "time_ms", "time_ms_p10",
                   "time_ms_p90", "mem_peak_gib")
REQUIRED = {"scaling": SCALING_REQUIRED, "kernel": KERNEL_REQUIRED}
SETTING_KEYS = {"scaling": ("device", "dtype", "batch_requested", "head"),
                "kernel": ("device", "dtype", "batch", "width")}
_NUMERIC = ("res", "tokens", "batch", "batch_requested", "L", "width", "latency_ms", "latency_ms_p10", "latency_ms_p90",
            "throughput_img_s", "repeats", "mem_peak_gib", "mem_reserved_gib", "mem_nvml_gib", "mem_pred_gib",
            "flops_total", "flops_scan", "flops_attention", "flops_linear", "flops_other", "params",
            "time_ms", "time_ms_p10", "time_ms_p90", "flops", "bytes")


def load_results(path, kinds=("scaling", "kernel")) -> tuple[str, pd.DataFrame]:
    """(kind, rows) of the CSV at ``path``, checked and normalised: ``status`` lower-case, ``head`` bool,
    metric columns numeric (empty cells NaN). Raises ``InputError`` (one line naming the problem) for a
    missing or empty file, an unknown or unwanted kind (``kinds``), missing columns, or no ``ok`` row."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: no such file")
    try:
        df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a readable CSV: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise InputError(f"{path} has a header but no rows")
    kind = csv_kind(df, path)
    if kind not in kinds:
        raise InputError(f"{path} is a {kind} CSV; this needs a {' or '.join(kinds)} CSV")
    missing = [c for c in REQUIRED[kind] if c not in df.columns]
    if missing:
        raise InputError(f"{path}: {kind} CSV lacks column(s) {', '.join(missing)}")
    df["status"] = df["status"].astype(str).str.strip().str.lower()
    if kind == "scaling" and "batch_requested" not in df.columns:
        df["batch_requested"] = df["batch"]
    for col in _NUMERIC:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if "head" in df.columns:
        df["head"] = _as_bool(df["head"], path)
    if not (df["status"] == "ok").any():
        counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
        raise InputError(f"{path}: no rows with status ok ({counts})")
    return kind, df


def csv_kind(df: pd.DataFrame, path="CSV") -> str:
    """"scaling" (has res and throughput_img_s) or "kernel" (has L and time_ms); InputError otherwise."""
    cols = set(df.columns)
    if {"res", "throughput_img_s"} <= cols:
        return "scaling"
    if {"L", "time_ms"} <= cols:
        return "kernel"
    raise InputError(f"{path}: neither a scaling CSV (res, throughput_img_s) nor a kernel CSV (L, time_ms)")


def _as_bool(col: pd.Series, path) -> pd.Series:
    text = col.astype(str).str.strip().str.lower()
    table = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
    bad = sorted(set(text) - set(table))
    if bad:
        raise InputError(f"{path}: column head holds {bad[0]!r}; expected True or False")
    return text.map(table).astype(bool)


@dataclass(frozen=True)
class Setting:
    """The rows of one setting (the values of ``SETTING_KEYS[kind]``) and its file-name slug."""
    key: dict
    slug: str
    rows: pd.DataFrame

    @property
    def batch(self) -> int:
        """The batch of the setting (for a scaling CSV the one requested; OOM retries may run less)."""
        return int(self.key.get("batch_requested", self.key.get("batch")))

    @property
    def is_cpu(self) -> bool:
        return str(self.key["device"]).startswith("cpu")


def split_settings(kind: str, df: pd.DataFrame) -> list[Setting]:
    """The settings of a CSV, in a stable order; rows with no value in a key column are dropped."""
    keys = list(SETTING_KEYS[kind])
    out = []
    for values, rows in df.dropna(subset=keys).groupby(keys, sort=True):
        key = dict(zip(keys, values))
        last = ("head" if key["head"] else "backbone") if kind == "scaling" else f"w{int(key['width'])}"
        batch = key.get("batch_requested", key.get("batch"))
        slug = f"{str(key['device']).replace(':', '')}-{key['dtype']}-b{int(batch)}-{last}"
        out.append(Setting(key, slug, rows.reset_index(drop=True)))
    return out
