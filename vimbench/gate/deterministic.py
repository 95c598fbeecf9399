"""The deterministic gate: FLOP counts and compiled Triton kernel resources against a baseline, exactly."""
from __future__ import annotations

import datetime

import torch

from vimbench.gate.calibration import suite_environment

FLOP_SHAPES = ((224, 1), (1248, 1))
"""(resolution, batch) at which the deterministic gate counts each model's forward_features FLOPs."""
FLOP_FIELDS = ("flops_total", "flops_scan", "flops_attention", "flops_linear", "flops_other")
KERNEL_FIELDS = ("registers", "spill_bytes", "shared_bytes", "status")

def triton_key(version: str) -> str:
    """The Triton release a kernel baseline holds for: major.minor of ``version`` ("3.6.0" -> "3.6")."""
    return ".".join(version.split("+")[0].split(".")[:2])


def deterministic_snapshot() -> dict:
    """{'flops': {'<model> res=<r> batch=<b>': {FLOP_FIELDS}}, 'kernels': {'<kernel> | <config> | <arch>':
    {KERNEL_FIELDS}}, 'triton': ``triton_key`` of the installed Triton}: FLOPs of forward_features with each
    model's default options, counted on meta."""
    from vimbench.config import FlopsConfig
    from vimbench.count.flops import count_flops
    from vimbench.count.kernel_compile import ARCHS, compile_report
    from vimbench.models.registry import list_models
    flops = {}
    for model in list_models():
        for res, batch in FLOP_SHAPES:
            counts = count_flops(FlopsConfig(model, res=res, batch=batch))._asdict()
            flops[f"{model} res={res} batch={batch}"] = {k: counts[k] for k in FLOP_FIELDS}
    kernels = {f"{r.kernel} | {r.config} | {r.arch}": {k: getattr(r, k) for k in KERNEL_FIELDS}
               for r in compile_report(ARCHS)}
    import triton
    return {"flops": flops, "kernels": kernels, "triton": triton_key(triton.__version__)}


def make_deterministic_baseline(snapshot: dict, previous: dict | None = None) -> dict:
    """The baseline file for ``snapshot``: its FLOPs, and its kernel numbers under its Triton release beside
    those of other releases kept from ``previous`` (the file it replaces, if any)."""
    recorded = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    kernels = {**(previous or {}).get("kernels_by_triton", {}), snapshot["triton"]: snapshot["kernels"]}
    return {"kind": "deterministic", "recorded": recorded, "environment": suite_environment(torch.device("cpu")),
            "flops": snapshot["flops"], "kernels_by_triton": dict(sorted(kernels.items()))}


def compare_deterministic(baseline: dict, snapshot: dict) -> list[dict]:
    """Every difference: rows {'section', 'item', 'field', 'baseline', 'now', 'change'}; [] when equal.
    An item present on one side only is one row with field '(item)'. Kernels are compared with the
    baseline's numbers for the snapshot's Triton release, and not at all when it has none
    (``missing_triton_baseline``)."""
    rows = []
    by_triton = baseline.get("kernels_by_triton", {})
    for section in ("flops", "kernels"):
        if section == "kernels" and snapshot["triton"] not in by_triton:
            continue
        base = baseline.get("flops", {}) if section == "flops" else by_triton[snapshot["triton"]]
        now = snapshot[section]
        for item in sorted(set(base) | set(now)):
            if item not in now or item not in base:
                rows.append({"section": section, "item": item, "field": "(item)",
                             "baseline": "present" if item in base else "absent",
                             "now": "present" if item in now else "absent", "change": ""})
                continue
            for field in sorted(set(base[item]) | set(now[item])):
                b, n = base[item].get(field), now[item].get(field)
                if b != n:
                    change = f"{n / b - 1:+.2%}" if isinstance(b, int) and isinstance(n, int) and b else ""
                    rows.append({"section": section, "item": item, "field": field, "baseline": b, "now": n,
                                 "change": change})
    return rows


def missing_triton_baseline(baseline: dict, snapshot: dict) -> str | None:
    """One line when the baseline has no kernel numbers for the snapshot's Triton release, else None."""
    have = sorted(baseline.get("kernels_by_triton", {}))
    if snapshot["triton"] in have:
        return None
    return (f"no kernel baseline for Triton {snapshot['triton']} (the baseline has: {', '.join(have) or 'none'}): "
            f"kernel resources not compared; record them with `vimbench gate --deterministic --update`")
