"""A row of a scaling CSV: the measured forward or train step (``measure.model.measure_model`` in its own
worker), the configuration's FLOPs counted on the meta device (``count.flops``: a forward, or for train a
forward and backward), and its predicted GPU memory (``count.memory``: eager, not under autocast for train);
see ``rows/schema.py`` (SCALING) for the columns.

--max-batch (``ScalingConfig.batch`` 0, the row's ``batch_requested``): the batch is the largest that fits
(``largest_batch``: doubling from 1, then bisection between the last batch that fit and the first that did not),
each try a short run (``PROBE``: 1 warm-up, 1 timed call, and on CPU the memory call) in its own worker, so an
OOM is a result. On a GPU a try fits when it ran without running out of memory; on CPU when the resident memory
its call added (``mem_peak_gib``) stayed at or below ``mem_limit_gib`` (by default half the memory available
when the sweep started: memory grows at most linearly in the batch, so the try after one that fit stays within
what was available). The batch found is then measured as any other; ``batch_search`` says how it was found.
"""
from __future__ import annotations

import dataclasses
import datetime
from typing import Callable

from vimbench.config import ScalingConfig
from vimbench.count.flops import count_flops
from vimbench.count.memory import predict_memory
from vimbench.kernels.selective_scan.backends import runs_on_cuda
from vimbench.measure.isolation import run_isolated
from vimbench.measure.model import measure_model


CONFIG_TIMEOUT_S = 3600


def decay_batch(batch: int) -> int:
    """The next smaller batch to try after an OOM: 64 -> 48 -> 32 -> 24 -> 16 -> 12 -> 8 -> 6 -> 4 -> 3 -> 2 -> 1
    (halving, with a 3/4 step in between), 0 when there is nothing smaller."""
    if batch <= 1:
        return 0
    p = 1 << (batch.bit_length() - 1)  # largest power of two <= batch
    if batch > p:
        return p
    return p * 3 // 4 if p >= 4 else p // 2


MAX_BATCH = 1 << 16
"""--max-batch doubles no further than this (a try of 2^16 images that fits ends the search there)."""
MEM_LIMIT_FRACTION = 0.5
"""--max-batch on CPU without --mem-limit-gib: this fraction of MemAvailable when the sweep starts."""
PROBE = dict(warmup=1, repeats=1, min_time=0)
"""The timing of a --max-batch try: enough to allocate what a call needs (and on CPU to measure it)."""


def largest_batch(fits: Callable[[int], bool], cap: int = MAX_BATCH) -> tuple[int, int | None, int]:
    """The largest batch in 1..``cap`` for which ``fits(batch)`` holds, for a ``fits`` true up to some
    boundary and false beyond it: doubling from 1 until a batch does not fit (or ``cap`` is passed), then
    bisection between the last batch that fit and the first that did not. Returns (that batch, 0 when 1
    does not fit; the smallest batch found not to fit, None when the doubling passed ``cap``; the tries)."""
    fit, batch, tries = 0, 1, 0
    while batch <= cap:
        tries += 1
        if not fits(batch):
            break
        fit, batch = batch, batch * 2
    else:
        return fit, None, tries
    misfit = batch
    while misfit - fit > 1:
        mid = (fit + misfit) // 2
        tries += 1
        if fits(mid):
            fit = mid
        else:
            misfit = mid
    return fit, misfit, tries


class SearchFailed(RuntimeError):
    """A --max-batch try failed for another reason than memory; ``result`` is its worker's result."""

    def __init__(self, batch: int, result: dict):
        super().__init__(f"--max-batch: the try at batch {batch} failed: {result['error']}")
        self.result = result


def max_batch(cfg: ScalingConfig) -> dict:
    """The --max-batch search for ``cfg`` (see the module docstring): {"batch", "batch_search"}, or with no
    batch that fits {"status": "oom", "error", "batch_search"}, or {"status": "error", "error"} when a try
    failed for another reason (its error) or its memory could not be read."""
    limit = cfg.mem_limit_gib

    def fits(batch: int) -> bool:
        result = run_isolated(measure_model, (dataclasses.replace(cfg, **PROBE, batch=batch),),
                              timeout=CONFIG_TIMEOUT_S)
        if result["status"] == "oom":
            return False
        if result["status"] != "ok":
            raise SearchFailed(batch, result)
        if limit is None:  # a GPU: it ran, so it fit
            return True
        if result.get("mem_peak_gib") is None:
            raise SearchFailed(batch, {"error": "its resident memory could not be read (needs Linux /proc)"})
        return result["mem_peak_gib"] <= limit

    try:
        batch, misfit, tries = largest_batch(fits)
    except SearchFailed as e:
        return {"status": "error", "error": str(e)}
    bound = f"; bound: {limit:.3g} GiB added resident memory" if limit is not None else ""
    if batch == 0:
        return {"status": "oom", "error": "--max-batch: batch 1 does not fit",
                "batch_search": f"doubling+bisection: 1 does not fit ({tries} try){bound}"}
    beyond = f"{misfit} does not" if misfit is not None else f"stopped at the cap {MAX_BATCH}"
    return {"batch": batch, "batch_search": f"doubling+bisection: {batch} fits, {beyond} ({tries} tries){bound}"}


def scaling_row(cfg: ScalingConfig, fixed: dict, backoff: bool) -> dict:
    """One row of a scaling CSV: ``measure_model`` in its own worker (on OOM retried at ``decay_batch``
    sizes when ``backoff``), the configuration's FLOPs, its predicted GPU memory, and ``fixed`` (the
    environment and command). ``batch`` is the batch requested (0: --max-batch, ``max_batch``)."""
    columns = cfg.columns()
    row = {k: columns[k] for k in ("model", "family", "impl", "res", "batch_requested", "dtype", "mode",
                                   "grad_checkpointing", "compile", "amp", "device", "head", "warmup", "mem_limit_gib")}
    row.update(fixed, kernel=cfg.impl)
    batch = cfg.batch
    if batch == 0:
        found = max_batch(cfg)
        batch = found.pop("batch", None)
        row.update(found)
        if batch is None:
            return {**row, "timestamp": datetime.datetime.now().isoformat(timespec="seconds")}
    while True:
        run_cfg = dataclasses.replace(cfg, batch=batch)
        result = run_isolated(measure_model, (run_cfg,), timeout=CONFIG_TIMEOUT_S)
        if result["status"] != "oom" or not backoff or decay_batch(batch) == 0:
            break
        batch = decay_batch(batch)
    row.update(batch=batch, timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    row.update(result)
    try:  # counted on the meta device; a failed count must not cost the measured row (nor the sweep)
        row.update(count_flops(run_cfg)._asdict())
    except Exception as e:
        row["error"] = "; ".join(filter(None, [row.get("error"), f"flops failed: {type(e).__name__}: {e}"]))
    if cfg.family == "vim" and not runs_on_cuda(cfg.impl):
        return row  # a CPU-only scan backend (cpp): no GPU run to predict, mem_pred_peak_gib stays empty
    if cfg.compile != "none":  # the prediction replays eager execution; inductor's fused kernels allocate less
        return row
    if cfg.mode == "train" and cfg.amp != "none":  # a train step under autocast is not modelled
        return row
    try:  # the GPU memory this configuration is predicted to need, on any device (vimbench.count.memory)
        row["mem_pred_peak_gib"] = predict_memory(run_cfg, amp=cfg.amp).mem_pred_peak_gib
    except Exception as e:  # a failed prediction must not cost the measured row
        row["error"] = "; ".join(filter(None, [row.get("error"), f"mem_pred failed: {type(e).__name__}: {e}"]))
    return row
