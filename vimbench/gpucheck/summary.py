"""The GPU check's summary.md, from what the steps left in the output folder (see ``vimbench.gpucheck``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from vimbench.analysis.designs import describe, design_comparison
from vimbench.errors import InputError
from vimbench.gpucheck.checks import FLOOR, cuda_tests
from vimbench.kernels.selective_scan.backends import TRITON_DESIGNS
from vimbench.present.tables import markdown_table
from vimbench.rows.kernels import floor_bounds
from vimbench.rows.reader import load_results

PERF_GOAL = 1.4  # the Triton scan's target: within 1.4x of its floor at the Vim-Ti 1248 shape, batch 64


def scan_floors(kernels: pd.DataFrame, exp2_per_s: float) -> pd.DataFrame:
    """Triton scan rows of a kernels CSV with their floors, the bounds of ``rows.kernels.floor_bounds`` with the
    card's exp2 rate as the exp rate and no matmul bound: mem_floor_ms = bytes / ceiling_gbs, exp_floor_ms =
    exps (the row's: one exp2 per (b, e, t, n) and direction, twice in train mode) / exp2_per_s, floor_ms = the
    larger; ratio = time / floor. Columns: op, impl, model, res, tokens, batch, dtype, time_ms, mem_floor_ms,
    exp_floor_ms, floor_ms, ratio."""
    rows = kernels[kernels["impl"].isin(TRITON_DESIGNS) & kernels["op"].isin(["scan", "scan_bidir"])
                   & (kernels["status"] == "ok")].copy()
    bounds = [floor_bounds({**r, "ceiling_gflops_s": None, "ceiling_exp_s": exp2_per_s})
              for r in rows.to_dict("records")]
    rows["mem_floor_ms"] = [b.get("bytes", math.nan) * 1e3 for b in bounds]
    rows["exp_floor_ms"] = [b.get("exp", math.nan) * 1e3 for b in bounds]
    rows["floor_ms"] = rows[["mem_floor_ms", "exp_floor_ms"]].max(axis=1)
    rows["ratio"] = rows["time_ms"] / rows["floor_ms"]
    return rows[["op", "impl", "model", "res", "tokens", "batch", "dtype", "time_ms", "mem_floor_ms", "exp_floor_ms",
                 "floor_ms", "ratio"]].reset_index(drop=True)


def _md_table(df: pd.DataFrame) -> list[str]:
    cols = list(df.columns)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return markdown_table(cols, ([fmt(v) for v in row] for row in df.itertuples(index=False)))


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def latest_steps(out: Path) -> list[dict]:
    """The step records of the latest run in ``out/steps.jsonl`` (``run.run_steps``), in order."""
    path = out / "steps.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    last = records[-1]["run"] if records else None
    return [r for r in records if r["run"] == last]


def correctness(out: Path) -> tuple[str, str]:
    """(verdict, detail) of the kernels' correctness from ``out/check.json`` and ``out/tests.json``:
    verdict "correct" (both ran and passed), "INCORRECT" (either failed) or "not checked" (either is missing)."""
    check, tests = _json(out / "check.json"), _json(out / "tests.json")
    parts, failed = [], False
    if check is not None:
        for backend, r in check.items():
            ok = r["status"] == "ok" and r["check_ok"]
            failed |= not ok
            parts.append(f"{backend} correct on {r['checked']} cases" if ok else
                         f"{backend} FAILED ({r.get('check_failure') or r.get('error')})")
    if tests is not None:
        failed |= tests["returncode"] != 0
        parts.append(f"CUDA tests of the Triton scan: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} "
                     f"failed, {tests.get('error', 0)} errors")
    verdict = "INCORRECT" if failed else "correct" if check is not None and tests is not None else "not checked"
    no_tests = "the CUDA tests" + ("" if cuda_tests() else
                                   " (a vimbench checkout's tests/; this ran from an installed package)")
    missing = [name for name, x in (("the backend checks", check), (no_tests, tests)) if x is None]
    return verdict, "; ".join(parts + [f"{m} did not run" for m in missing])


def paper_1248(out: Path) -> str:
    """Vim-Ti and DeiT-Ti (eager and fused) at 1248 px from ``out/scaling-paper.csv``, in words."""
    path = out / "scaling-paper.csv"
    if not path.exists():
        return "not measured"
    try:
        _, df = load_results(path, kinds=("scaling",))
    except InputError as e:  # e.g. no ok row at all
        return f"not measured: {e}"
    df = df[(df["res"] == 1248) & (df["status"] == "ok")]
    cell = {}
    for model, impl, label in (("vim_tiny", None, "Vim-Ti"), ("deit_tiny", "eager", "DeiT-Ti eager"),
                               ("deit_tiny", "sdpa", "DeiT-Ti fused (sdpa)")):
        rows = df[(df["model"] == model) & ((df["impl"] == impl) if impl else True)]
        if len(rows):
            r = rows.iloc[0]
            name = f"{label} ({r['impl']})" if impl is None else label
            cell[label] = (r["throughput_img_s"], f"{name} {r['throughput_img_s']:.4g} img/s, "
                                                  f"{r['mem_peak_gib']:.3g} GiB")
    if not cell:
        return "no ok row at 1248 px"
    text = "; ".join(t for _, t in cell.values())
    if "Vim-Ti" in cell:
        text += "".join(f"; Vim-Ti runs {cell['Vim-Ti'][0] / v:.2f}x the images/s of {k}"
                        for k, (v, _) in cell.items() if k != "Vim-Ti")
    return text


def _kernels(out: Path) -> pd.DataFrame | None:
    """Every kernels CSV in ``out`` that the reader accepts (``load_results``: one without an ok row is left
    out), as one table; None when there is none."""
    tables = []
    for csv in sorted(out.glob("kernels-*.csv")):
        try:
            tables.append(load_results(csv, kinds=("kernels",))[1])
        except InputError:
            continue
    return pd.concat(tables, ignore_index=True) if tables else None


def floor_line(floors: pd.DataFrame | None) -> str:
    """The Triton scan at the Vim-Ti 1248 shape, batch 64, fp32, against its floor (``scan_floors``), in words."""
    if floors is None:
        return "not measured"
    at = floors[(floors["model"] == FLOOR["model"]) & (floors["res"] == FLOOR["res"])
                & (floors["batch"] == FLOOR["batch"]) & (floors["dtype"] == FLOOR["dtype"])]
    if not len(at):
        return "not measured at {model} {res} px, batch {batch}, {dtype}".format(**FLOOR)
    return "; ".join(f"{r.op} ({r.impl}) {r.time_ms:.3g} ms = {r.ratio:.2f}x its floor "
                     f"({'meets' if r.ratio <= PERF_GOAL else 'misses'} the goal <= {PERF_GOAL}x)"
                     for r in at.itertuples()) + " ({model} {res} px, batch {batch}, {dtype})".format(**FLOOR)


def write_summary(out: Path) -> Path:
    """``out/summary.md`` from what the steps left in ``out``. Its first line gives the card and whether the
    kernels are correct (when they are not, no timing is shown; when they were not checked, the timings are
    called untrusted); the
    next lines say in plain words: the card, correctness, Vim-Ti/DeiT-Ti at 1248 in the paper's setting,
    the Triton scan against its floor, what did not run for lack of budget; then each step's estimate and
    actual seconds; then the details. Every part that has not run is named as such."""
    facts, env = _json(out / "facts.json") or {}, _json(out / "environment.json") or {}
    tests = _json(out / "tests.json")
    card = env.get("device_name") or facts.get("card", "card unknown")
    verdict, detail = correctness(out)
    steps, trusted = latest_steps(out), verdict != "INCORRECT"
    kernels = _kernels(out) if trusted else None  # correctness gates speed: no timing of failed kernels
    floors = scan_floors(kernels, facts["exp2_per_s"]) if kernels is not None and facts else None
    withheld = "withheld: the kernels failed their correctness checks"
    timed = any(out.glob("*.csv"))
    head = {"correct": "kernels correct",
            "INCORRECT": "KERNELS INCORRECT: no timing is taken or shown after a failed correctness check",
            "not checked": "kernel correctness not checked" + (": the timings below are untrusted" if timed else "")}
    interrupted = [f"{s['name']} ({s['status']})" for s in steps
                   if s["status"] == "interrupted" or s["status"].startswith("cut short")]
    no_budget = [f"{s['name']} (estimate {s['estimate_s']:.0f} s)" for s in steps if s["status"] == "no budget"]
    versions = ", ".join(f"{label} {env[k]}" for k, label in (("driver_version", "driver"), ("cuda_version", "CUDA"),
                                                              ("torch_version", "torch"), ("triton_version", "triton"))
                         if env.get(k))
    lines = [f"# GPU check: {card}: {head[verdict]}", "",
             f"- **Card:** {card}" + (f" ({versions})" if versions else ""),
             f"- **Kernels correct?** {verdict}: {detail}",
             f"- **Vim-Ti vs DeiT-Ti at 1248 px, the paper's setting** (fp32, batch 64, backbone): "
             f"{paper_1248(out) if trusted else withheld}",
             f"- **Triton scan against its floor:** {floor_line(floors) if trusted else withheld}",
             f"- **Not run for lack of budget:** {', '.join(no_budget) or 'nothing'}"
             + (f"; stopped during: {', '.join(interrupted)}" if interrupted else ""), "",
             f"Folder `{out.name}`, written by `vimbench gpu-check`; environment.json has the card, driver, "
             "versions and clocks, and every CSV row its conditions.", ""]
    lines += ["## Steps (highest priority first)", ""]
    lines += _md_table(pd.DataFrame([{k: s[k] for k in ("name", "status", "estimate_s", "actual_s", "what")}
                                     for s in steps])) if steps else ["no step record (steps.jsonl)"]
    lines += ["", "## Tests (tests/kernels/test_scan_cuda.py)", ""]
    lines += [f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('error', 0)} errors "
              f"(exit code {tests['returncode']}); output in gpu-tests.txt." if tests else "not run", ""]
    lines += ["## Device facts", ""]
    if facts:
        ctx = facts.get("cuda_context_gib")
        lines += [f"- exp2 rate: {facts['exp2_per_s'] / 1e12:.2f} T exp2/s (kernels/exp_rate.py)",
                  f"- CUDA context: {'unknown (no NVML)' if ctx is None else f'{ctx:.2f} GiB'} "
                  "(NVML used memory after CUDA initialisation minus before)", ""]
    else:
        lines += ["not measured", ""]
    if trusted:  # correctness gates speed
        lines += ["## Triton scan designs at vim_tiny L=6085, batch 64", ""]
        designs = design_comparison(kernels) if kernels is not None else []
        lines += [f"- {describe(r)}" for r in designs] or ["not run"]
        lines += [""]
    lines += ["## Triton scan against its floor", ""]
    if floors is not None:
        lines += _md_table(floors) + ["", f"floor = max(bytes / measured copy bandwidth, exp2 count / measured "
                                          f"exp2 rate); goal: ratio <= {PERF_GOAL} at vim_tiny L=6085, batch 64."]
    else:
        lines += ["not run" if trusted else withheld]
    lines += ["", "## Scaling, claim check and predicted vs measured memory", ""]
    lines += [withheld if not trusted else "see [report/report.md](report/report.md)"
              if (out / "report" / "report.md").exists() else "not run"]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
