"""Regimes side by side: does compiling both contenders (Vim and DeiT under torch.compile) change the verdict?

A scaling CSV holds one setting per regime (``schema.REGIME``: compile, amp). Each compiled setting is paired
with the eager setting that matches it in everything else (device, dtype, batch, head, amp). For each pair,
and each (Vim backend, DeiT backend) of the same model size:

    crossover   where Vim becomes faster (throughput per image) and stays faster, in each regime, over the
                resolutions both regimes measured; the crossover *moved* when it lies between a different
                pair of measured resolutions (or became "below range" / "none in range")
    ratio       Vim/DeiT throughput at the largest such resolution, in each regime: the verdict there is
                which side of 1 it lies on, and compiling *changes the verdict* when it flips side
Per model and backend, ``speedups`` gives the compiled/eager throughput ratio at the first and last common
resolution, with the compile time and graph breaks of the compiled runs there.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from vimbench.analysis.fit import Crossover, crossover
from vimbench.rows.reader import Setting


def compile_pairs(settings: list[Setting]) -> list[tuple[Setting, Setting]]:
    """(eager, compiled) pairs of settings that differ only in ``compile``, compiled ones in the order given."""
    def rest(s):
        return tuple((k, v) for k, v in s.key.items() if k != "compile")
    eager = {rest(s): s for s in settings if s.key.get("compile", "none") == "none"}
    return [(eager[rest(s)], s) for s in settings if s.key.get("compile", "none") != "none" and rest(s) in eager]


def _throughput(s: Setting, model: str, impl: str) -> pd.Series:
    r = s.rows[(s.rows["model"] == model) & (s.rows["impl"] == impl) & (s.rows["status"] == "ok")]
    return r.drop_duplicates("res", keep="last").set_index("res")["throughput_img_s"].sort_index()


def _bracket(c: Crossover, res: list) -> int:
    """Which interval of the measured resolutions a crossover lies in: -1 below range, len(res) none in
    range, else the index of the measured resolution just below it."""
    if c.kind == "below range":
        return -1
    if c.kind == "none in range":
        return len(res)
    return int(np.searchsorted(res, c.x, side="right")) - 1


def _describe(c: Crossover, res: list) -> str:
    if c.kind != "crossing":
        return c.describe(" px")
    j = _bracket(c, res)
    return f"~ {c.x:.0f} px (between {res[j]:g} and {res[j + 1]:g})"


def verdict_rows(eager: Setting, compiled: Setting) -> list[dict]:
    """For each Vim model and DeiT model of the same size, each backend of each, measured in both regimes:
    vim, deit, faster_eager, faster_compiled (crossovers), ratio_eager, ratio_compiled (Vim/DeiT throughput
    at ``top_res``, the largest resolution all four curves share) and ``answer``, one sentence."""
    out = []
    mode = compiled.key["compile"]
    models = set(eager.rows["model"]) & set(compiled.rows["model"])
    for vim_model in sorted(m for m in models if str(m).startswith("vim_")):
        deit_model = "deit_" + vim_model[len("vim_"):]
        if deit_model not in models:
            continue
        for v_impl in sorted(set(eager.rows[eager.rows["model"] == vim_model]["impl"])):
            for d_impl in sorted(set(eager.rows[eager.rows["model"] == deit_model]["impl"])):
                curves = [_throughput(s, m, i) for s in (eager, compiled) for m, i in ((vim_model, v_impl),
                                                                                     (deit_model, d_impl))]
                res = sorted(set.intersection(*(set(c.index) for c in curves)))
                if not res:
                    continue
                (ve, de, vc, dc) = (c.loc[res] for c in curves)
                cross_e = crossover(res, ve, de, lower_is_better=False)
                cross_c = crossover(res, vc, dc, lower_is_better=False)
                ratio_e, ratio_c = ve.iloc[-1] / de.iloc[-1], vc.iloc[-1] / dc.iloc[-1]
                row = dict(vim=f"{vim_model} ({v_impl})", deit=f"{deit_model} ({d_impl})", top_res=res[-1],
                           faster_eager=_describe(cross_e, res), faster_compiled=_describe(cross_c, res),
                           ratio_eager=ratio_e, ratio_compiled=ratio_c)
                row["answer"] = _answer(row, mode, _bracket(cross_e, res) != _bracket(cross_c, res))
                out.append(row)
    return out


def _answer(row: dict, mode: str, moved: bool) -> str:
    faster = lambda ratio: "faster" if ratio > 1 else "slower"  # noqa: E731
    flipped = (row["ratio_eager"] > 1) != (row["ratio_compiled"] > 1)
    at = (f"{row['vim']} / {row['deit']} throughput at {row['top_res']:g} px is {row['ratio_eager']:.2f} eager "
          f"(Vim {faster(row['ratio_eager'])}) and {row['ratio_compiled']:.2f} compiled "
          f"(Vim {faster(row['ratio_compiled'])})")
    if flipped:
        return f"Yes: compiling both ({mode}) changes the verdict: {at}."
    if moved:
        return (f"The verdict holds but the crossover moved: Vim becomes faster from {row['faster_eager']} eager "
                f"and from {row['faster_compiled']} compiled ({mode}); {at}.")
    return (f"No: compiling both ({mode}) leaves the verdict and the crossover where they were "
            f"(eager {row['faster_eager']}, compiled {row['faster_compiled']}); {at}.")


def speedups(eager: Setting, compiled: Setting) -> list[dict]:
    """Per (model, impl) measured in both regimes, at its first and last common resolution: res, speedup
    (compiled / eager throughput), compile_s and graph_breaks of the compiled run."""
    out = []
    ok = compiled.rows[compiled.rows["status"] == "ok"]
    for (model, impl), g in sorted(ok.groupby(["model", "impl"])):
        e, c = _throughput(eager, model, impl), _throughput(compiled, model, impl)
        res = sorted(set(e.index) & set(c.index))
        for r in dict.fromkeys([res[0], res[-1]] if res else []):
            run = g[g["res"] == r].iloc[-1]
            out.append(dict(model=model, impl=impl, res=r, speedup=c[r] / e[r], compile_s=run.get("compile_s"),
                            graph_breaks=run.get("graph_breaks")))
    return out
