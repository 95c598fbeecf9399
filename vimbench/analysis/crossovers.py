"""Exponents and crossovers of measured curves, as rows for tables: the kernel sweep's ops against each
other in tokens, and (through ``crossover_cell``) the report's Vim/DeiT pairs in resolution; and how far
each backend of a kernel sweep ran from its floor (``kernel_floors``)."""
from __future__ import annotations

import pandas as pd

from vimbench.analysis.fit import crossover, describe_fit, fit_sweep
from vimbench.rows.reader import Setting

PAIRS = (("scan_bidir", "attention"), ("scan", "attention"), ("mixer_vim", "block_deit"))
"""(Vim op, attention op) pairs of a kernel sweep whose crossovers are reported."""


def crossover_cell(a: pd.Series, b: pd.Series, lower_is_better: bool, unit: str) -> str:
    """Where curve ``a`` becomes better than curve ``b`` for good, over their common positive points
    (both indexed by x): "~ 702 px", "at or below ...", "none in range", or "no common points"; notes when
    the curves cross more than once."""
    common = [x for x in a.index.intersection(b.index) if a.at[x] > 0 and b.at[x] > 0]
    if not common:
        return "no common points"
    c = crossover(common, a.loc[common], b.loc[common], lower_is_better=lower_is_better)
    return c.describe(unit) + (f"; curves cross {c.sign_changes} times" if c.sign_changes > 1 else "")


def _kernel_curves(s: Setting) -> dict:
    """(op, impl) -> ok rows of a kernel sweep indexed by tokens, sorted."""
    ok = s.rows[s.rows["status"] == "ok"]
    return {key: g.drop_duplicates("tokens", keep="last").set_index("tokens").sort_index()
            for key, g in ok.groupby(["op", "impl"], sort=False)}


def _both(x, y) -> str:
    whole, upper = fit_sweep(x, y)
    return f"{describe_fit(whole)} | {describe_fit(upper)}"


def kernel_exponents(s: Setting) -> list[dict]:
    """Per (op, impl): fitted exponents in tokens of time and memory (whole sweep | upper half)."""
    return [{"op": op, "impl": impl, "kernel": "/".join(dict.fromkeys(c["kernel"].dropna().astype(str))),
             "n": len(c),
             "k_time": _both(c.index, c["time_ms"]), "k_mem": _both(c.index, c["mem_peak_gib"])}
            for (op, impl), c in _kernel_curves(s).items()]


def kernel_crossovers(s: Setting) -> list[dict]:
    """For each (Vim op, attention op) pair of ``PAIRS`` and each pair of their backends: the tokens from
    which the Vim op stays faster (and uses less memory); only common lengths are compared."""
    curves, out = _kernel_curves(s), []
    for vim_op, attn_op in PAIRS:
        for (op_a, impl_a), a in curves.items():
            for (op_b, impl_b), b in curves.items():
                if (op_a, op_b) == (vim_op, attn_op):
                    out.append({"vim": f"{op_a} [{impl_a}]", "attention": f"{op_b} [{impl_b}]",
                                "faster_from": crossover_cell(a["time_ms"], b["time_ms"], True, " tokens"),
                                "lighter_from": crossover_cell(a["mem_peak_gib"], b["mem_peak_gib"], True, " tokens")})
    return out


def matched_times(s: Setting) -> list[dict]:
    """For each (Vim op, attention op) pair of ``PAIRS``, each pair of their backends and each length both
    measured ok: vim, attention, tokens, vim_ms, attention_ms and ratio (vim_ms / attention_ms; below 1 the
    Vim op is faster). In a train setting the times are forward + backward."""
    curves, out = _kernel_curves(s), []
    for vim_op, attn_op in PAIRS:
        for (op_a, impl_a), a in curves.items():
            for (op_b, impl_b), b in curves.items():
                if (op_a, op_b) == (vim_op, attn_op):
                    out += [{"vim": f"{op_a} [{impl_a}]", "attention": f"{op_b} [{impl_b}]", "tokens": int(x),
                             "vim_ms": a.at[x, "time_ms"], "attention_ms": b.at[x, "time_ms"],
                             "ratio": a.at[x, "time_ms"] / b.at[x, "time_ms"]}
                            for x in a.index.intersection(b.index)]
    return out


def kernel_floors(s: Setting) -> list[dict]:
    """Per (op, impl) of a kernel sweep, at the longest sequence it ran ok with a floor (``rows.kernels.floor``):
    op, impl, tokens, time_ms, floor_ms, floor_kind (flops, bytes or exp) and x_floor = time_ms / floor_ms
    (1 = at the floor; the backends of one op at one length share a floor, so their x_floor compare as
    their times do). Empty for a CSV written before the floors were recorded."""
    if "floor_ms" not in s.rows.columns:
        return []
    out = []
    for (op, impl), c in _kernel_curves(s).items():
        c = c[c["floor_ms"] > 0]
        if len(c):
            x = c.index[-1]
            out.append({"op": op, "impl": impl, "tokens": int(x), "time_ms": c.at[x, "time_ms"],
                        "floor_ms": c.at[x, "floor_ms"], "floor_kind": c.at[x, "floor_kind"],
                        "x_floor": c.at[x, "time_ms"] / c.at[x, "floor_ms"]})
    return out
