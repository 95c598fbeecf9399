"""Correctness before speed: the scan backends checked against the reference, in workers with a time limit,
before anything is timed. One place for every caller: ``vimbench kernels`` (its ``preamble`` job, with the
device's ceilings), ``gate``, ``check-backend``, ``scaling`` (train) and ``gpu-check`` (``check_in_worker``)."""
from __future__ import annotations

from vimbench.kernels.plugins import time_limit, worker_failure
from vimbench.kernels.selective_scan.backends import describe
from vimbench.kernels.selective_scan.check import check_named_backend
from vimbench.measure.ceilings import measure_ceilings
from vimbench.measure.isolation import run_isolated


def check_in_worker(impl: str, device, grads: bool = False) -> dict:
    """``check.check_named_backend`` of scan backend ``impl`` on ``device`` (with ``grads`` its gradients too)
    in a worker bounded by ``plugins.time_limit("check")``: its result with status ok, or status oom | error
    and the worker's error when it raised, died or ran past the limit (``run_isolated``)."""
    return run_isolated(check_named_backend, (impl, str(device), grads), timeout=time_limit("check"))


def run_check(impl: str, device, grads: bool = False) -> dict:
    """``check_in_worker``'s result without its status. A worker that raised (``SystemExit`` and
    ``KeyboardInterrupt`` too), died (an abort, a segfault) or ran past the limit (then killed) gives
    check_ok False and a check_failure naming the backend, its package and what happened, in one line."""
    result = check_in_worker(impl, device, grads)
    if result.pop("status") == "ok":
        return result
    return {"checked": 0, "check_ok": False, "check_worst": float("nan"),
            "check_failure": f"{describe(impl)}: {worker_failure('check', result['error'])}"}


def check_scans(scans: list[str], device, log, grads: bool = False) -> dict[str, str]:
    """Each scan backend in ``scans`` but the reference checked against it on ``device`` (``run_check``: in a
    worker, with a time limit) before any timing. Returns {backend: why} for those that failed (the first
    failing case: its shape, dtype and worst error), which then get no timing; ``log`` gets one line per
    backend that passed.
    With ``grads`` (before train timing) the gradients too (``check.check_backward``): a backend also fails
    when it is forward-only (why: ``backends.forward_only``'s line) or its gradients are wrong (why starts
    "gradient check failed"); a forward failure's why starts "correctness check failed" either way, so the
    backends unfit for inference are those."""
    failed = {}
    for impl in scans:
        if impl == "ref":
            continue
        result = run_check(impl, device, grads)
        if not result["check_ok"]:
            failed[impl] = f"correctness check failed: {result['check_failure']}"
        elif grads and result["forward_only"]:
            failed[impl] = result["forward_only"]
        elif grads and not result["grad_ok"]:
            failed[impl] = f"gradient check failed: {result['grad_failure']}"
        else:
            log(f"{impl}: correct on {result['checked']} cases against the reference"
                + (f", its gradients on {result['grad_checked']}" if grads else ""))
    return failed


def preamble(cfg: dict) -> dict:
    """What a kernels sweep needs before any timing, run once where its configurations run (a launcher's
    ``run_job``): the correctness of each scan backend in ``cfg["scans"]`` (``check_scans``) and the device's
    ceilings (``measure_ceilings``), each in its own worker. ``cfg``: scans, device, dtype, threads, timing, and
    grads (a sweep with train rows: the gradients are checked too, ``check_scans(grads=True)``).
    Returns plain data: passed (one line per backend that passed), failed ({backend: why}), ceilings
    ({ceiling_gbs, ceiling_gflops_s}; {} when measuring them failed) and warning ("" or why they are missing)."""
    passed = []
    failed = check_scans(cfg["scans"], cfg["device"], passed.append, grads=cfg.get("grads", False))
    ceilings = run_isolated(measure_ceilings, (cfg,))
    if ceilings.pop("status") != "ok":
        return {"passed": passed, "failed": failed, "ceilings": {},
                "warning": f"measuring the device ceilings failed ({ceilings['error']}); frac_peak_* and "
                           f"the floors left empty"}
    missing = ceilings.pop("exp_missing", "")
    warning = f"no exp rate ({missing}): the scan rows' floors leave out their exps" if missing else ""
    return {"passed": passed, "failed": failed, "ceilings": ceilings, "warning": warning}


def preamble_result(row: dict, scans: list[str]) -> dict:
    """``preamble``'s result from the row its job returned. A job that ended without one (an error row:
    failed, pre-empted, timed out) checked nothing: every scan backend in ``scans`` but ref then counts as
    failed (no timing without a passed check) and the ceilings as missing."""
    if row.get("status") != "error":
        return row
    why = f"the preamble job failed ({row['error']})"
    return {"passed": [], "failed": {s: f"correctness not checked: {why}" for s in scans if s != "ref"},
            "ceilings": {}, "warning": f"{why}; frac_peak_* and the floors left empty"}
