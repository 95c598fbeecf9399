"""Reading result CSVs, the only input of figures and reports (measuring stays in ``vimbench.measure``).

The kind of a CSV is told from its header (``schema.kind_of``). Columns renamed since the CSV was written
are mapped to their current names (``schema.RENAMED``), so old results keep working. A CSV can hold several
*settings* (``Schema.setting``: device, dtype, batch, ...): curves are only drawn or fitted within one. A
scaling setting is keyed by the batch asked for (``batch_requested``): ``vimbench scaling`` retries an OOM
at smaller batches and records the batch that ran in ``batch``. A CSV without ``batch_requested`` (or a row
with it empty) gets it equal to ``batch``; a CSV without ``mode`` gets infer (it measured inference); a
scaling or kernel CSV without the regime columns (``schema.REGIME``: compile, amp) gets none for both, the eager
full-precision regime it was measured in.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from vimbench.errors import InputError
from vimbench.rows.schema import BOOLEAN, GRAD_CHECKPOINTING, MODE, NUMERIC, REGIME, RENAMED, SCHEMAS, kind_of



def with_current_names(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the columns renamed since it was written given their current names (``RENAMED``)."""
    return df.rename(columns={old: new for old, new in RENAMED.items() if old in df.columns and new not in df.columns})


def with_regime(kind: str, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with its ``mode`` filled (infer where absent or empty: every CSV from before training mode measured
    inference), the regime columns (``REGIME``) of a scaling or kernel CSV filled: none where absent or empty,
    and ``grad_checkpointing`` where a setting has it: False where absent or empty (no checkpointing)."""
    fill = {MODE: "infer", **({col: "none" for col in REGIME} if kind in ("scaling", "kernels") else {})}
    df = df.assign(**{col: df[col].astype(object).fillna(v).astype(str) if col in df.columns else v
                      for col, v in fill.items()})
    if GRAD_CHECKPOINTING in SCHEMAS[kind].setting:
        df = df.assign(**{GRAD_CHECKPOINTING: df[GRAD_CHECKPOINTING].astype(object).fillna(False)
                          if GRAD_CHECKPOINTING in df.columns else False})
    return df


def load_results(path, kinds=("scaling", "kernels")) -> tuple[str, pd.DataFrame]:
    """(kind, rows) of the CSV at ``path``, checked and normalised: old column names renamed, ``status``
    lower-case, ``head`` and ``fits`` bool, numeric columns numeric (empty cells NaN). Raises ``InputError``
    (one line naming the problem) for a missing or empty file, an unknown or unwanted kind (``kinds``),
    missing columns, or no ``ok`` row."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{str(path)!r}: no such file" if not str(path).strip() else f"{path}: no such file")
    try:
        df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a readable CSV: {str(e).splitlines()[0]}") from None
    if df.empty:
        raise InputError(f"{path} has a header but no rows")
    df = with_current_names(df)
    kind = kind_of(df.columns)
    if kind is None:
        raise InputError(f"{path}: not a vimbench CSV (its header matches none of {', '.join(SCHEMAS)})")
    if kind not in kinds:
        raise InputError(f"{path} is a {kind} CSV; this needs a {' or '.join(kinds)} CSV")
    missing = [c for c in SCHEMAS[kind].required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: {kind} CSV lacks column(s) {', '.join(missing)}")
    df["status"] = df["status"].astype(str).str.strip().str.lower()
    if kind == "scaling" and "batch_requested" not in df.columns:
        df["batch_requested"] = df["batch"]
    df = with_regime(kind, df)
    for col in sorted(NUMERIC & set(df.columns)):
        df[col] = _as_number(df[col], col, path)
    if kind == "scaling":  # an empty batch_requested reads as the batch that ran, as a missing column does
        df["batch_requested"] = df["batch_requested"].fillna(df["batch"])
    for col in BOOLEAN:
        if col in df.columns:
            df[col] = _as_bool(df[col], col, path)
    if not (df["status"] == "ok").any():
        counts = ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
        raise InputError(f"{path}: no rows with status ok ({counts})")
    return kind, df


def _as_number(col: pd.Series, name: str, path) -> pd.Series:
    """``col`` as numbers, empty cells NaN; InputError naming the first cell that holds other text."""
    numbers = pd.to_numeric(col, errors="coerce")
    text = numbers.isna() & col.notna() & (col.astype(str).str.strip() != "")
    if text.any():
        row = text.idxmax()
        raise InputError(f"{path}: column {name} holds {str(col[row])[:40]!r} in row {row + 1}; expected a number")
    return numbers


def _as_bool(col: pd.Series, name: str, path) -> pd.Series:
    text = col.astype(str).str.strip().str.lower()
    table = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
    bad = sorted(set(text) - set(table))
    if bad:
        raise InputError(f"{path}: column {name} holds {bad[0]!r}; expected True or False")
    return text.map(table).astype(bool)


@dataclass(frozen=True)
class Setting:
    """The rows of one setting (the values of ``Schema.setting``) and its file-name slug."""
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


def regime_slug(key: dict) -> str:
    """The file-name part of a setting's mode and regime: "" for inference, eager, without autocast (the names
    of CSVs from before these columns stay as they were), else "-train" (with "-gc" for activation
    checkpointing) and/or "-compile_<mode>" and/or "-amp_<dtype>"."""
    return ("-train" if key.get(MODE, "infer") == "train" else "") + ("-gc" if key.get(GRAD_CHECKPOINTING) else "") + \
        "".join(f"-{col}_{file_part(key[col])}" for col in REGIME if key.get(col, "none") != "none")


def file_part(value) -> str:
    """A setting's value as part of a file name: only letters, digits and ``_ . + -`` kept ("cuda:0" ->
    "cuda0"); ``validate.plottable`` leaves out rows whose values are not plain names."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "", str(value))


def split_settings(kind: str, df: pd.DataFrame) -> list[Setting]:
    """The settings of a CSV, in a stable order; rows with no value in a key column are dropped."""
    keys = list(SCHEMAS[kind].setting)
    out = []
    for values, rows in with_regime(kind, df).dropna(subset=keys).groupby(keys, sort=True):
        key = dict(zip(keys, values))
        last = ("head" if key["head"] else "backbone") if kind == "scaling" else f"w{int(key['width'])}"
        batch = key.get("batch_requested", key.get("batch"))
        slug = f"{file_part(key['device'])}-{file_part(key['dtype'])}-b{int(batch) or 'max'}-{last}" + regime_slug(key)
        out.append(Setting(key, slug, rows.reset_index(drop=True)))
    return out
