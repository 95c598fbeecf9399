"""The GPU check's work and its summary: correctness on the device, device facts, the scan's floor.

The steps, their priorities, time estimates and the budget are in ``gpucheck_steps.py``; the archive and
its unpacking in ``gpucheck_archive.py``. Everything is written under one output folder
(``results/gpu/<card>-<date>/`` by default):
    check.json   every scan backend present against the sequential reference on CUDA (``run_checks``)
    tests.json   the CUDA tests of the Triton scan, gpu-tests.txt their output (``run_tests``)
    facts.json   the card's exp2 rate and CUDA context size (``record_facts``)
    backward.json  the Triton scan's backward at the floor shape: gradients checked, times, floor
                 (``run_backward``)
    *.csv        the sweeps, report/ the paper-preset report, figures/ the kernel figures
    steps.jsonl  each step's estimate, actual seconds and status, one line per step and run
    summary.md   plain language first: the card, whether the kernels are correct, Vim-Ti/DeiT-Ti at 1248,
                 the Triton scan against its floor (both Triton designs, and which is faster), what did not run for lack of budget (``write_summary``)
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from vimbench.analysis.designs import describe, design_comparison
from vimbench.kernels.selective_scan.backends import TRITON_DESIGNS
from vimbench.measure.env import slug
from vimbench.measure.isolation import run_isolated
from vimbench.rows.reader import with_current_names

PERF_GOAL = 1.4  # the Triton scan's target: within 1.4x of its floor at the Vim-Ti 1248 shape, batch 64
FLOOR = dict(model="vim_tiny", res=1248, batch=64, dtype="fp32")
"""Where the goal is judged: the Triton scan at Vim-Ti's 1248 px shape (L = 6085), batch 64, fp32."""


def default_out(card: str, today: datetime.date | None = None) -> Path:
    """results/gpu/<card slug>-<YYYY-MM-DD>, e.g. results/gpu/nvidia-h100-80gb-hbm3-2026-11-25."""
    return Path("results") / "gpu" / f"{slug(card)}-{(today or datetime.date.today()).isoformat()}"


def with_resume(argv: list[str]) -> list[str]:
    """Adds --resume to a sweep whose --out CSV already has rows, so a part cut short continues."""
    if argv[0] in ("kernels", "scaling") and "--out" in argv:
        csv = Path(argv[argv.index("--out") + 1])
        if csv.exists() and csv.stat().st_size > 0:
            return [*argv, "--resume"]
    return argv


def run_checks(out: Path, backends: list[str], grads: bool = False) -> list[str]:
    """``check_named_backend`` of each of ``backends`` on CUDA, each in a worker; the results go to
    ``out/check.json`` ({backend: result}). With ``grads`` (before the backward step times anything) the
    gradients of each backend with a backward too (``check.check_backward``, against float64 autograd of the
    reference), into ``out/grad-check.json``. Returns the failures, one line per backend that failed."""
    from vimbench.kernels.selective_scan.check import check_named_backend
    results = {b: run_isolated(check_named_backend, (b, "cuda", grads)) for b in backends}
    (out / ("grad-check.json" if grads else "check.json")).write_text(json.dumps(results, indent=1))
    return [f"{b}: {why}" for b, r in results.items() if (why := _check_failure(r))]


def _check_failure(result: dict) -> str:
    """Why a worker's ``check_named_backend`` result failed ("" when it passed; a forward-only backend passes
    a gradient check, having nothing to check)."""
    if result["status"] != "ok" or not result["check_ok"]:
        return result.get("check_failure") or result.get("error")
    if not result.get("forward_only", True) and not result["grad_ok"]:
        return f"gradient check failed: {result['grad_failure']}"
    return ""


def run_tests(out: Path) -> list[str]:
    """pytest tests/kernels/test_scan_cuda.py; its output goes to ``out/gpu-tests.txt``, the passed/failed
    counts and exit code to ``out/tests.json``. Returns the failure (none when every test ran and passed)."""
    root = Path(__file__).resolve().parent.parent
    test_file = root / "tests" / "kernels" / "test_scan_cuda.py"
    if not test_file.is_file():
        return [f"CUDA tests: {test_file} not found; run gpu-check from a vimbench checkout (pip install -e)"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(test_file)],
                          cwd=root, capture_output=True, text=True)
    (out / "gpu-tests.txt").write_text(proc.stdout + proc.stderr)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    (out / "tests.json").write_text(json.dumps({"returncode": proc.returncode, **counts}))
    if proc.returncode or not counts.get("passed"):  # all skipped (no CUDA in pytest's process) is no pass
        return [f"CUDA tests: exit code {proc.returncode}, {counts} (gpu-tests.txt)"]
    return []


def device_facts(device: str = "cuda") -> dict:
    """The card's exp2 rate (exp2/s) and the CUDA context size (GiB, NVML used memory after initialising
    CUDA minus before). Run it in a fresh process (``run_isolated``) so the context is this one's alone."""
    import torch

    from vimbench.measure.nvml import GpuReadings
    from vimbench.kernels.exp_rate import measure_exp2_rate
    gpu = GpuReadings(torch.device(device).index or 0)  # guarded, found by PCI bus id
    before = gpu.used_bytes()
    torch.zeros(1, device=device)
    torch.cuda.synchronize()
    after = gpu.used_bytes() if before is not None else None
    context = None if after is None else (after - before) / 2 ** 30
    return {"card": torch.cuda.get_device_name(device), "exp2_per_s": measure_exp2_rate(device),
            "cuda_context_gib": context}


def record_facts(out: Path) -> list[str]:
    """``device_facts`` in a fresh worker, written to ``out/facts.json`` unless it is there already.
    Returns the failure, if any."""
    if (out / "facts.json").exists():
        return []
    facts = run_isolated(device_facts, ())
    if facts.pop("status") != "ok":
        return [f"device facts: {facts['error']}"]
    (out / "facts.json").write_text(json.dumps(facts))
    return []


BACKWARD_GOALS = dict(forward=2.5, mamba_ssm=1.5)
"""The Triton backward's targets at the ``FLOOR`` shape: within 2.5x of the same design's forward time and within
1.5x of mamba_ssm's backward."""


def backward_at_floor(dtype: str, mamba: bool) -> dict:
    """Run in a worker on CUDA: the Triton scan's backward at the ``FLOOR`` shape (vim_tiny's mixer at 1248 px,
    batch 64; one direction with D, z, delta_bias and softplus; activations in ``dtype``, fp32 or bf16), in
    both designs. Each design's gradients against the chunked ``cpu`` backend's backward on the same card, and
    against mamba_ssm's when ``mamba``, by the gradient check's rule (``check.GRAD_TOLERANCES`` of each
    reference gradient's largest magnitude); then times in ms (``triton.testing.do_bench``, median) of each
    design's forward and backward and of mamba_ssm's backward, and the backward's floor in ms: the larger of
    bytes / copy rate (u, delta, z, dout, B, C read, du, ddelta, dz written, once each; the copy rate of a
    1 GiB device copy) and exp2 count / exp2 rate (one exp2 per (b, e, t, n): the states recomputed once).
    Returns {"shape", "floor_ms", "<design>": {"fwd_ms", "bwd_ms", "bwd_over_fwd", "bwd_over_floor",
    "grad_failures"}, "mamba_ssm_bwd_ms" (when ``mamba``)}."""
    import torch
    from triton.testing import do_bench

    from vimbench.kernels.exp_rate import measure_exp2_rate
    from vimbench.kernels.selective_scan.backends import BACKWARDS
    from vimbench.kernels.selective_scan.check import GRAD_ATOL, GRAD_TOLERANCES, scan_case
    from vimbench.kernels.selective_scan.triton_kernel import selective_scan_triton
    from vimbench.measure.ops import model_geometry
    g = model_geometry(FLOOR["model"], FLOOR["res"], FLOOR["batch"])
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    (u, delta, A, B, C), kw = scan_case(g.batch, g.d_inner, g.L, g.d_state, 0, dtype=torch_dtype, device="cuda")
    inputs = (u, delta, A, B, C, kw["D"], kw["z"], kw["delta_bias"], True)
    dout = torch.randn_like(u)
    references = {"cpu": BACKWARDS["cpu"](*inputs, dout)}
    result = {"shape": dict(b=g.batch, E=g.d_inner, L=g.L, N=g.d_state, dtype=dtype)}
    if mamba:
        references["mamba_ssm"] = BACKWARDS["mamba_ssm"](*inputs, dout)
        result["mamba_ssm_bwd_ms"] = do_bench(lambda: BACKWARDS["mamba_ssm"](*inputs, dout), quantiles=None,
                                              return_mode="median")
    src = torch.empty(2 ** 28, device="cuda")
    copy_ms = do_bench(lambda: torch.empty_like(src).copy_(src), quantiles=None, return_mode="median")
    moved = sum(t.numel() * t.element_size() for t in (u, delta, kw["z"], dout, B, C, u, delta, kw["z"]))
    exps = g.batch * g.d_inner * g.L * g.d_state
    result["floor_ms"] = max(moved / (2 * src.numel() * 4 / copy_ms), exps / measure_exp2_rate("cuda") * 1e3)
    del src
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for design in TRITON_DESIGNS:
        got = BACKWARDS[design](*inputs, dout)
        failures = [f"d{n} differs from {ref}'s by {(x.double() - w.double()).abs().max().item():.3g}"
                    for ref, want in references.items() for n, x, w in zip(names, got, want)
                    if not (x.double() - w.double()).abs().max().item()
                    <= GRAD_TOLERANCES[torch_dtype] * w.double().abs().max().item() + GRAD_ATOL]
        fwd_ms = do_bench(lambda: selective_scan_triton(*inputs, design=design), quantiles=None, return_mode="median")
        bwd_ms = do_bench(lambda: BACKWARDS[design](*inputs, dout), quantiles=None, return_mode="median")
        result[design] = dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, bwd_over_fwd=bwd_ms / fwd_ms,
                              bwd_over_floor=bwd_ms / result["floor_ms"], grad_failures=failures)
        if mamba:
            result[design]["bwd_over_mamba_ssm"] = bwd_ms / result["mamba_ssm_bwd_ms"]
    return result


def run_backward(out: Path, present: list[str]) -> list[str]:
    """First the gradients of every ``present`` scan backend on the awkward shapes (``run_checks`` with
    ``grads``): when one fails, its failure and nothing timed. Then ``backward_at_floor`` for fp32 and bf16,
    each in a worker (mamba_ssm's backward when it is ``present``); the results go to ``out/backward.json``
    ({dtype: result}). Returns the failures: a gradient check, a worker that failed, a gradient beyond tolerance
    at that shape (timings of a design whose gradients failed there are still recorded, for diagnosis)."""
    failures = run_checks(out, present, grads=True)
    if failures:
        return [*failures, "backward: not timed (a scan backend failed its gradient check)"]
    results = {dtype: run_isolated(backward_at_floor, (dtype, "mamba_ssm" in present)) for dtype in ("fp32", "bf16")}
    (out / "backward.json").write_text(json.dumps(results, indent=1))
    for dtype, r in results.items():
        if r["status"] != "ok":
            failures.append(f"backward {dtype}: {r.get('error')}")
            continue
        failures += [f"backward {dtype} {design}: {f}" for design in TRITON_DESIGNS for f in r[design]["grad_failures"]]
    return failures


def scan_floors(kernels: pd.DataFrame, exp2_per_s: float) -> pd.DataFrame:
    """Triton scan rows of a kernels CSV with their floors: memory time = bytes / ceiling_gbs, exp time =
    exp2 count / exp2_per_s (one exp2 per (b, e, t, n) and direction), floor = the larger; ratio = time /
    floor. Columns: op, impl, model, res, tokens, batch, dtype, time_ms, mem_floor_ms, exp_floor_ms, floor_ms, ratio."""
    rows = kernels[kernels["impl"].isin(TRITON_DESIGNS) & kernels["op"].isin(["scan", "scan_bidir"])
                   & (kernels["status"] == "ok")].copy()
    directions = rows["op"].map({"scan": 1, "scan_bidir": 2})
    rows["mem_floor_ms"] = rows["bytes"] / (rows["ceiling_gbs"] * 1e9) * 1e3
    exps = directions * rows["batch"] * rows["d_inner"] * rows["tokens"] * rows["d_state"]
    rows["exp_floor_ms"] = exps / exp2_per_s * 1e3
    rows["floor_ms"] = rows[["mem_floor_ms", "exp_floor_ms"]].max(axis=1)
    rows["ratio"] = rows["time_ms"] / rows["floor_ms"]
    return rows[["op", "impl", "model", "res", "tokens", "batch", "dtype", "time_ms", "mem_floor_ms", "exp_floor_ms",
                 "floor_ms", "ratio"]].reset_index(drop=True)


def _md_table(df: pd.DataFrame) -> list[str]:
    cols = list(df.columns)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
           ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def latest_steps(out: Path) -> list[dict]:
    """The step records of the latest run in ``out/steps.jsonl`` (``gpucheck_steps.run_steps``), in order."""
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
    missing = [name for name, x in (("the backend checks", check), ("the CUDA tests", tests)) if x is None]
    return verdict, "; ".join(parts + [f"{m} did not run" for m in missing])


def paper_1248(out: Path) -> str:
    """Vim-Ti and DeiT-Ti (eager and fused) at 1248 px from ``out/scaling-paper.csv``, in words."""
    path = out / "scaling-paper.csv"
    if not path.exists():
        return "not measured"
    df = with_current_names(pd.read_csv(path))
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
    """Every kernels CSV in ``out`` as one table; None when there is none."""
    csvs = sorted(out.glob("kernels-*.csv"))
    return pd.concat([with_current_names(pd.read_csv(c)) for c in csvs], ignore_index=True) if csvs else None


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
