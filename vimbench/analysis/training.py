"""Training against inference: what a train step costs each model relative to its inference forward.

A scaling CSV holds one setting per mode (``schema.MODE``): train rows are their own series, fitted and
crossed over on their own (never with inference rows). Each train setting is paired with the inference
setting that matches it in everything else but ``grad_checkpointing`` (device, dtype, batch, head, compile,
amp). For each pair, each (model, backend) and each resolution measured ok in both:

    throughput ratio  train / infer images per second (a train step's forward + backward + optimizer step
                      against one forward; below 1)
    memory ratio      train / infer peak memory (``mem_peak_gib``), rows at the setting's batch only

Published context (VMamba's README, ImageNet-1k at 224 px, one A100): Swin-T keeps about 0.8 of its
inference throughput when training, VMamba-T about 0.34 (``PUBLISHED_TRAIN_INFER``).
"""
from __future__ import annotations

import pandas as pd

from vimbench.rows.reader import Setting

PUBLISHED_TRAIN_INFER = {"Swin-T": 0.8, "VMamba-T": 0.34}
"""Train/infer throughput ratios from VMamba's README table (MzeroMiko/VMamba; cited in issue #23)."""


def train_pairs(settings: list[Setting]) -> list[tuple[Setting, Setting]]:
    """(infer, train) pairs of settings that differ only in ``mode`` (and ``grad_checkpointing``, which only
    train rows have), train ones in the order given."""
    def rest(s):
        return tuple((k, v) for k, v in s.key.items() if k not in ("mode", "grad_checkpointing"))
    infer = {rest(s): s for s in settings if s.key.get("mode", "infer") == "infer"}
    return [(infer[rest(s)], s) for s in settings if s.key.get("mode", "infer") == "train" and rest(s) in infer]


def _ok(s: Setting, model: str, impl: str, at_batch: bool) -> pd.DataFrame:
    """Ok rows of (model, impl) indexed by res (those that ran at the setting's batch if ``at_batch``)."""
    r = s.rows[(s.rows["model"] == model) & (s.rows["impl"] == impl) & (s.rows["status"] == "ok")]
    if at_batch:
        r = r[r["batch"] == s.batch]
    return r.drop_duplicates("res", keep="last").set_index("res").sort_index()


def train_infer_ratios(infer: Setting, train: Setting) -> list[dict]:
    """Per (model, impl) measured in both settings and each resolution both measured ok: model, impl, res,
    throughput_ratio (train/infer img/s) and memory_ratio (train/infer peak memory at the setting's batch;
    None where either side ran at a smaller batch after an OOM or has no memory reading)."""
    pairs = set(zip(infer.rows["model"], infer.rows["impl"])) & set(zip(train.rows["model"], train.rows["impl"]))
    out = []
    for model, impl in sorted(pairs, key=lambda p: (not str(p[0]).startswith("vim"), p)):
        i, t = _ok(infer, model, impl, False), _ok(train, model, impl, False)
        i_mem, t_mem = _ok(infer, model, impl, True)["mem_peak_gib"], _ok(train, model, impl, True)["mem_peak_gib"]
        for res in sorted(set(i.index) & set(t.index)):
            mem = t_mem.get(res, float("nan")) / i_mem.get(res, float("nan"))
            out.append(dict(model=model, impl=impl, res=res,
                            throughput_ratio=t.loc[res, "throughput_img_s"] / i.loc[res, "throughput_img_s"],
                            memory_ratio=None if pd.isna(mem) else mem))
    return out
