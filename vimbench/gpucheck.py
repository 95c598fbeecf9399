"""The GPU check: what every session with a lent GPU runs, in parts of a few minutes each.

Parts (``PARTS``), each writing under one output folder (``results/gpu/<card>-<date>/`` by default):
    tests    the CUDA tests of the Triton scan against the reference (tests/kernels/test_scan_cuda.py)
    kernels  ``vimbench kernels`` at the Vim-Ti/S/B and DeiT-Ti widths, res 224..1248 (5 points), batch 1
             (fp32) and batch 64 (fp32 and bf16), scans triton and cpu (+ mamba_ssm when importable, ref at
             224 only; batch 64 both Triton designs), attention backends that run; the device's copy/matmul
             ceilings and exp2 rate
    scaling  ``vimbench scaling --preset paper`` with the triton scan, the cpu scan at small resolutions for
             comparison, and ``vimbench report`` (claim check, predicted vs measured memory)
    summary  ``summary.md``: the card and versions, the tests' result, which Triton scan design is faster at
             Vim-Ti 1248, batch 64 and by how much, each Triton scan's time against its floor
             max(bytes / copy bandwidth, exp2 count / exp2 rate), the CUDA context size
Steps are data (``plan``): a list of (name, argv) run through ``vimbench.commands.main``; CSVs are
resumed, so a part cut short can simply be run again.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from vimbench.analysis.designs import describe, design_comparison
from vimbench.kernels.selective_scan.backends import TRITON_DESIGNS
from vimbench.measure.env import slug
from vimbench.rows.reader import with_current_names

PARTS = ("tests", "kernels", "scaling", "summary")
RES = "224,512,738,1024,1248"
PERF_GOAL = 1.4  # the Triton scan's target: within 1.4x of its floor at the Vim-Ti 1248 shape, batch 64


def default_out(card: str, today: datetime.date | None = None) -> Path:
    """results/gpu/<card slug>-<YYYY-MM-DD>, e.g. results/gpu/nvidia-h100-80gb-hbm3-2026-11-25."""
    return Path("results") / "gpu" / f"{slug(card)}-{(today or datetime.date.today()).isoformat()}"


def _scans() -> str:
    return "triton,cpu" + (",mamba_ssm" if importlib.util.find_spec("mamba_ssm") else "")


def plan(part: str, out: Path) -> list[tuple[str, list[str]]]:
    """The vimbench command lines of ``part`` (kernels and scaling), writing under ``out``."""
    if part == "kernels":
        def kernels(name, csv, *args):
            return name, ["kernels", "--plot", *args, "--out", str(out / csv)]
        return [kernels("kernels b1 fp32", "kernels-b1-fp32.csv", "--models", "vim_tiny,vim_small,vim_base,deit_tiny",
                        "--scan", _scans(), "--attn", "eager,sdpa,efficient,cudnn", "--res", RES, "--batch", "1",
                        "--dtype", "fp32"),
                kernels("kernels ref 224", "kernels-ref.csv", "--models", "vim_tiny", "--scan", "ref", "--res", "224",
                        "--batch", "1"),
                *(kernels(f"kernels b64 {dtype}", f"kernels-b64-{dtype}.csv", "--models", "vim_tiny,deit_tiny",
                          "--scan", "triton,triton_pipelined",  # both Triton designs, compared in the summary
                          "--attn", "eager,sdpa,efficient,cudnn" + (",flash" if dtype != "fp32" else ""),
                          "--res", RES, "--batch", "64", "--dtype", dtype)
                  for dtype in ("fp32", "bf16"))]
    if part == "scaling":
        paper_csv, cpu_csv = out / "scaling-paper.csv", out / "scaling-cpu-scan.csv"
        return [("scaling paper", ["scaling", "--preset", "paper", "--scan", "triton", "--out", str(paper_csv)]),
                ("scaling cpu scan", ["scaling", "--models", "vim_tiny", "--scan", "cpu", "--res", "224,512",
                                      "--batch", "64", "--out", str(cpu_csv)]),
                ("report", ["report", str(paper_csv), "--out-dir", str(out / "report")])]
    raise ValueError(f"part {part!r} has no command plan")


def with_resume(argv: list[str]) -> list[str]:
    """Adds --resume to a sweep whose --out CSV already has rows, so a part cut short continues."""
    if argv[0] in ("kernels", "scaling") and "--out" in argv:
        csv = Path(argv[argv.index("--out") + 1])
        if csv.exists() and csv.stat().st_size > 0:
            return [*argv, "--resume"]
    return argv


def run_tests(out: Path) -> dict:
    """pytest tests/kernels/test_scan_cuda.py; its output goes to ``out/gpu-tests.txt``. Returns passed/failed
    counts."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
                           str(root / "tests" / "kernels" / "test_scan_cuda.py")],
                          cwd=root, capture_output=True, text=True)
    (out / "gpu-tests.txt").write_text(proc.stdout + proc.stderr)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout)}
    return {"returncode": proc.returncode, **counts}


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


def scan_floors(kernels: pd.DataFrame, exp2_per_s: float) -> pd.DataFrame:
    """Triton scan rows of a kernels CSV with their floors: memory time = bytes / ceiling_gbs, exp time =
    exp2 count / exp2_per_s (one exp2 per (b, e, t, n) and direction), floor = the larger; ratio = time /
    floor. Columns: op, model, L, batch, dtype, time_ms, mem_floor_ms, exp_floor_ms, floor_ms, ratio."""
    rows = kernels[kernels["impl"].isin(TRITON_DESIGNS) & kernels["op"].isin(["scan", "scan_bidir"])
                   & (kernels["status"] == "ok")].copy()
    directions = rows["op"].map({"scan": 1, "scan_bidir": 2})
    rows["mem_floor_ms"] = rows["bytes"] / (rows["ceiling_gbs"] * 1e9) * 1e3
    exps = directions * rows["batch"] * rows["d_inner"] * rows["tokens"] * rows["d_state"]
    rows["exp_floor_ms"] = exps / exp2_per_s * 1e3
    rows["floor_ms"] = rows[["mem_floor_ms", "exp_floor_ms"]].max(axis=1)
    rows["ratio"] = rows["time_ms"] / rows["floor_ms"]
    return rows[["op", "impl", "model", "tokens", "batch", "dtype", "time_ms", "mem_floor_ms", "exp_floor_ms",
                 "floor_ms", "ratio"]].reset_index(drop=True)


def _md_table(df: pd.DataFrame) -> list[str]:
    cols = list(df.columns)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
           ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]


def write_summary(out: Path) -> Path:
    """``out/summary.md`` from what the parts left in ``out`` (facts.json, tests.json, kernels-*.csv,
    report/): every part that has not run is named as such."""
    facts = json.loads((out / "facts.json").read_text()) if (out / "facts.json").exists() else {}
    tests = json.loads((out / "tests.json").read_text()) if (out / "tests.json").exists() else None
    lines = [f"# GPU check: {facts.get('card', 'card unknown')}", "",
             f"Folder `{out}`, written by `vimbench gpu-check`. Versions and clocks: in every CSV row.", ""]
    lines += ["## Tests (tests/kernels/test_scan_cuda.py)", ""]
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
    csvs = sorted(out.glob("kernels-*.csv"))
    kernels = pd.concat([with_current_names(pd.read_csv(c)) for c in csvs], ignore_index=True) if csvs else None
    lines += ["## Triton scan designs at vim_tiny L=6085, batch 64", ""]
    designs = design_comparison(kernels) if kernels is not None else []
    lines += [f"- {describe(r)}" for r in designs] or ["not run"]
    lines += ["", "## Triton scan against its floor", ""]
    if csvs and facts:
        floors = scan_floors(kernels, facts["exp2_per_s"])
        lines += _md_table(floors) + ["", f"floor = max(bytes / measured copy bandwidth, exp2 count / measured "
                                          f"exp2 rate); goal: ratio <= {PERF_GOAL} at vim_tiny L=6085, batch 64."]
    else:
        lines += ["not run"]
    lines += ["", "## Scaling, claim check and predicted vs measured memory", ""]
    lines += ["see [report/report.md](report/report.md)" if (out / "report" / "report.md").exists() else "not run"]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path
