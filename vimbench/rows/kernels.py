"""A kernels row: one ``KernelConfig`` (built by ``kernel_configs``), its counted cost (``count.ops``) and its
timing (``measure.ops.measure_op``, in its own worker), with rates and the floor its measured ceilings give.

Floor (``floor``): the largest lower bound on a row's time that its measured ceilings give: flops_total at the
matmul rate (not under amp: that rate is measured in dtype), bytes at the copy bandwidth, and for the ops that
run selective scans the exps they need (``op_exps``) at the exp rate; frac_floor = floor_ms / time_ms.
"""
from __future__ import annotations

import datetime

from vimbench.count.ops import OPS, model_geometry, op_cost, op_exps
from vimbench.measure.isolation import run_isolated
from vimbench.measure.ops import KernelConfig, measure_op
from vimbench.rows.schema import KERNELS

CONFIG_TIMEOUT_S = 1800


def kernel_configs(models: list[str], res_list: list[int], impls: dict, batch: int, dtype: str, device,
                   threads: int, timing: dict, regimes: list[tuple[str, str]] = (("none", "none"),),
                   modes: list[str] = ("infer",)) -> list[KernelConfig]:
    """Every (resolution, model, op, backend, mode, regime) configuration, in that order: each model runs the
    ops of its family (``OpSpec.family``) with each backend of the op's kind in ``impls`` ({"scan": [...],
    "attn": [...]}), in each of ``modes`` (infer, train) and each (compile, amp) of ``regimes``; ``timing``:
    the CPU timing (warmup, repeats, min_time)."""
    configs = []
    for res in res_list:
        for model in models:
            geometry = model_geometry(model, res, batch)
            family = "vim" if geometry.d_inner else "deit"
            configs += [KernelConfig(op=spec.name, impl=impl, model=model, res=res, batch=batch, dtype=dtype,
                                     mode=mode, compile=compile_mode, amp=amp, device=str(device), geometry=geometry,
                                     threads=threads, timing=timing)
                        for spec in OPS.values() if spec.family == family
                        for impl in impls[spec.backend] for mode in modes for compile_mode, amp in regimes]
    return configs


def key_columns(cfg: KernelConfig) -> dict:
    """The kernels CSV's key columns of ``cfg`` (``KERNELS.key``)."""
    return {k: getattr(cfg, k) for k in KERNELS.key}


def floor_bounds(row: dict) -> dict[str, float]:
    """Lower bounds in seconds on the time of a row, from the ceilings it holds: flops (flops_total /
    ceiling_gflops_s, not under amp: that rate is measured in dtype), bytes (bytes / ceiling_gbs) and exp
    (exps / ceiling_exp_s), each where its ceiling (and for exp, exps) is there."""
    bounds = {}
    if row.get("ceiling_gflops_s") and row["amp"] == "none":
        bounds["flops"] = row["flops_total"] / (row["ceiling_gflops_s"] * 1e9)
    if row.get("ceiling_gbs"):
        bounds["bytes"] = row["bytes"] / (row["ceiling_gbs"] * 1e9)
    if row.get("ceiling_exp_s") and row.get("exps"):
        bounds["exp"] = row["exps"] / row["ceiling_exp_s"]
    return bounds


def floor(row: dict) -> dict:
    """The floor of an ok row: floor_ms, the largest of its ``floor_bounds``, floor_kind naming it (flops,
    bytes or exp) and frac_floor = floor_ms / time_ms; {} without any ceiling."""
    bounds = floor_bounds(row)
    if not bounds:
        return {}
    kind = max(bounds, key=bounds.get)
    return {"floor_ms": bounds[kind] * 1e3, "floor_kind": kind, "frac_floor": bounds[kind] * 1e3 / row["time_ms"]}


def _rates(row: dict) -> dict:
    """Achieved GFLOP/s and GB/s of an ok row, their fractions of the measured ceilings, and its ``floor``."""
    seconds = row["time_ms"] * 1e-3
    out = {"gflops_s": row["flops_total"] / seconds / 1e9, "gbs": row["bytes"] / seconds / 1e9}
    if row.get("ceiling_gbs"):
        out["frac_peak_bw"] = out["gbs"] / row["ceiling_gbs"]
    if row.get("ceiling_gflops_s") and row["amp"] == "none":  # the matmul ceiling is measured in dtype
        out["frac_peak_flops"] = out["gflops_s"] / row["ceiling_gflops_s"]
    return out | floor(row)


def kernel_row(cfg: KernelConfig, fixed: dict) -> dict:
    """One row of a kernels CSV: ``measure_op`` in its own worker, plus sizes, FLOPs, bytes, exps, rates and
    ``fixed`` (environment, ceilings, command)."""
    g = cfg.geometry
    row = key_columns(cfg)
    row.update({k: getattr(g, k) or "" for k in ("width", "heads", "head_dim", "d_inner", "d_state")}, tokens=g.L,
               kernel=cfg.impl, **fixed, **op_cost(cfg.op, g, cfg.dtype, cfg.mode), exps=op_exps(cfg.op, g, cfg.mode),
               timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    row.update(run_isolated(measure_op, (cfg,), timeout=CONFIG_TIMEOUT_S))
    if row["status"] == "ok":
        row.update(_rates(row))
    return row
