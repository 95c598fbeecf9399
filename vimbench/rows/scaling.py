"""A row of a scaling CSV: the measured forward (``measure.model.measure_model`` in its own worker), the
configuration's FLOPs counted on the meta device (``count.flops``), and its predicted GPU memory
(``count.memory``); see ``rows/schema.py`` (SCALING) for the columns."""
from __future__ import annotations

import datetime

from vimbench.count.flops import count_flops
from vimbench.count.memory import predict_memory
from vimbench.kernels.selective_scan.backends import runs_on_cuda
from vimbench.measure.isolation import run_isolated
from vimbench.measure.model import measure_model


def config_flops(cfg: dict) -> dict:
    """FLOPs, params and tokens of a configuration (counted on the meta device, no worker needed)."""
    return count_flops(cfg["model"], cfg["res"], cfg["batch"], cfg["head"], **cfg["options"])


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


def scaling_row(cfg: dict, fixed: dict, backoff: bool) -> dict:
    """One row of a scaling CSV: ``measure_model`` in its own worker (on OOM retried at ``decay_batch``
    sizes when ``backoff``), the configuration's FLOPs, its predicted GPU memory, and ``fixed`` (the
    environment and command). ``cfg``: as ``measure_model`` takes it, with ``batch_requested`` for the
    batch, plus family and impl."""
    batch = cfg["batch_requested"]
    while True:
        run_cfg = {**cfg, "batch": batch}
        result = run_isolated(measure_model, (run_cfg,), timeout=CONFIG_TIMEOUT_S)
        if result["status"] != "oom" or not backoff or decay_batch(batch) == 0:
            break
        batch = decay_batch(batch)
    row = {k: cfg[k] for k in ("model", "family", "impl", "res", "batch_requested", "dtype", "mode", "compile", "amp",
                               "device", "head", "warmup")}
    row.update(fixed, batch=batch, kernel=cfg["impl"], timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    row.update(result)
    try:  # counted on the meta device; a failed count must not cost the measured row (nor the sweep)
        row.update(config_flops(run_cfg))
    except Exception as e:
        row["error"] = "; ".join(filter(None, [row.get("error"), f"flops failed: {type(e).__name__}: {e}"]))
    if cfg["family"] == "vim" and not runs_on_cuda(cfg["impl"]):
        return row  # a CPU-only scan backend (cpp): no GPU run to predict, mem_pred_peak_gib stays empty
    if cfg["compile"] != "none":  # the prediction replays eager execution; inductor's fused kernels allocate less
        return row
    try:  # the GPU memory this configuration is predicted to need, on any device (vimbench.count.memory)
        row["mem_pred_peak_gib"] = predict_memory(cfg["model"], cfg["res"], batch, cfg["dtype"], cfg["head"],
                                                  amp=cfg["amp"], **cfg["options"])["mem_pred_peak_gib"]
    except Exception as e:  # a failed prediction must not cost the measured row
        row["error"] = "; ".join(filter(None, [row.get("error"), f"mem_pred failed: {type(e).__name__}: {e}"]))
    return row
