"""Synthetic result CSVs for the plot and report tests: known power laws, one OOM and one error row."""
from __future__ import annotations

import pandas as pd

RES = (224, 384, 512, 640, 738, 1024, 1248)
ENV = dict(device_name="NVIDIA H100 80GB HBM3", driver_version="560.35", cuda_version="12.6", torch_version="2.6.0",
           triton_version="3.2.0", timm_version="1.0.15", vimbench_version="0.1.0", git_commit="abc1234",
           cpu_model="Xeon", threads=16, tf32=False, cudnn_benchmark=False, sm_clock_mhz=1980, temperature_c=40,
           power_w=300, timestamp="2026-11-25T10:00:00", command="vimbench scaling --models vim_tiny,deit_tiny")


def _row(model, family, impl, res, status="ok", latency=None, mem=None, batch=64, device="cuda:0", error=""):
    tokens = (res // 16) ** 2 + 1
    attn = 4 * batch * 12 * 3 * tokens ** 2 * 64 if family == "deit" else 0
    scan = 2 * 24 * 9 * batch * tokens * 384 * 16 if family == "vim" else 0
    linear = 2 * batch * tokens * 12 * 12 * 192 ** 2
    row = dict(model=model, family=family, impl=impl, kernel=impl, res=res, tokens=tokens, batch=batch,
               dtype="fp32", device=device, head=False, status=status, error=error,
               flops_total=attn + scan + linear, flops_scan=scan, flops_attention=attn, flops_linear=linear,
               flops_other=0, params=7_000_000, **ENV)
    if status == "ok":
        row.update(time_ms=latency, time_ms_p10=latency * 0.97, time_ms_p90=latency * 1.04,
                   throughput_img_s=batch * 1e3 / latency, repeats=20, mem_peak_gib=mem, mem_reserved_gib=mem * 1.1,
                   mem_nvml_gib=mem * 1.2, mem_pred_peak_gib=mem)
    if device == "cpu":
        row.update(device_name="cpu", mem_nvml_gib=None)
    return row


def scaling_frame(device="cuda:0", speed=None, memory=None) -> pd.DataFrame:
    """vim_tiny (triton): latency and memory linear in tokens; deit_tiny eager: linear + quadratic, OOM
    at 1248; deit_tiny sdpa: quadratic latency, linear memory, an error row at 224. ``speed``/``memory``:
    {res: Vim/DeiT ratio} overrides for vim_tiny against both DeiT rows at that res (throughput ratio;
    memory ratio applied to mem_peak, mem_reserved and mem_nvml alike)."""
    rows = []
    for res in RES:
        L = (res // 16) ** 2 + 1
        deit_eager = dict(latency=0.02 * L + 4e-6 * L ** 2, mem=0.002 * L + 1.5e-6 * L ** 2)
        deit_sdpa = dict(latency=0.02 * L + 2e-6 * L ** 2, mem=0.002 * L)
        vim = dict(latency=0.05 * L, mem=0.0015 * L)
        if speed and res in speed:  # latency ratio = 1 / throughput ratio
            vim["latency"] = deit_eager["latency"] / speed[res]
            deit_sdpa["latency"] = deit_eager["latency"]
        if memory and res in memory:
            vim["mem"] = deit_eager["mem"] * memory[res]
            deit_sdpa["mem"] = deit_eager["mem"]
        rows.append(_row("vim_tiny", "vim", "triton", res, device=device, **vim))
        if res == 1248:
            rows.append(_row("deit_tiny", "deit", "eager", res, status="oom", device=device,
                             error="CUDA out of memory"))
        else:
            rows.append(_row("deit_tiny", "deit", "eager", res, device=device, **deit_eager))
        if res == 224:
            rows.append(_row("deit_tiny", "deit", "sdpa", res, status="error", device=device,
                             error="RuntimeError: boom"))
        else:
            rows.append(_row("deit_tiny", "deit", "sdpa", res, device=device, **deit_sdpa))
    return pd.DataFrame(rows)


def kernel_frame() -> pd.DataFrame:
    """scan (linear time) and attention (quadratic time, OOM at the largest L)."""
    rows = []
    for L in (256, 1024, 4096, 16384):
        for op, impl, t, status in (("scan", "triton", 1e-4 * L, "ok"),
                                    ("attention", "eager", 1e-7 * L ** 2, "oom" if L == 16384 else "ok")):
            rows.append(dict(op=op, impl=impl, tokens=L, width=384, batch=8, dtype="fp32", device="cuda:0",
                             status=status,
                             time_ms=t if status == "ok" else None, time_ms_p10=t * 0.95 if status == "ok" else None,
                             time_ms_p90=t * 1.1 if status == "ok" else None,
                             mem_peak_gib=(1e-5 * L if op == "scan" else 1e-8 * L ** 2) if status == "ok" else None,
                             flops_total=10 * L, bytes=100 * L, device_name="NVIDIA H100 80GB HBM3"))
    return pd.DataFrame(rows)
