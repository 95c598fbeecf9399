"""config.py and rows/flops.py, rows/memory.py: a configuration's columns, its pickling into workers, and the
rows each kind builds from a configuration and its results (FLOPs on the meta device, memory on fake tensors)."""
from __future__ import annotations

import pickle

from vimbench.config import FlopsConfig, MemoryConfig, ScalingConfig
from vimbench.count.memory import CONTEXT_GIB, CARDS
from vimbench.rows import flops as flops_rows
from vimbench.rows.flops import flops_row
from vimbench.rows.memory import memory_row


def test_columns_derive_family_and_impl_and_name_the_requested_batch():
    cfg = ScalingConfig("deit_tiny", {"attn": "eager"}, res=32, batch=0, mem_limit_gib=1.5)
    cols = cfg.columns()
    assert (cols["family"], cols["impl"], cols["batch_requested"], cols["mem_limit_gib"]) == ("deit", "eager", 0, 1.5)
    assert "batch" not in cols and "options" not in cols
    assert FlopsConfig("vim_tiny", {"scan": "ref"}).columns()["impl"] == "ref"
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # what run_isolated and submitit jobs need


def test_flops_row_holds_the_configuration_and_its_counts():
    cfg = FlopsConfig("deit_tiny", {"attn": "eager"}, res=32, batch=2)
    row = flops_row(cfg, {"command": "c"})
    D, L, P = 192, 5, 4       # 32 px: 2 x 2 patches of 16 px, plus cls
    linear = 2 * 2 * P * (3 * 16 * 16) * D + 12 * 2 * 2 * L * (D * 3 * D + D * D + 2 * D * 4 * D)
    assert (row["status"], row["model"], row["impl"], row["res"], row["batch"], row["tokens"]) == \
        ("ok", "deit_tiny", "eager", 32, 2, L)
    assert row["flops_linear"] == linear and row["flops_total"] == linear + 12 * 4 * 2 * L * L * D
    assert row["command"] == "c" and "options" not in row


def test_a_count_that_fails_is_an_error_row_with_the_configuration(monkeypatch):
    def broken(cfg):
        raise ValueError("no formula")
    monkeypatch.setattr(flops_rows, "count_flops", broken)
    row = flops_row(FlopsConfig("deit_tiny", res=32), {})
    assert row["status"] == "error" and row["error"] == "ValueError: no formula" and row["res"] == 32


def test_memory_row_adds_the_context_the_card_and_the_paper_value():
    seen = []

    def paper(*args):
        seen.append(args)
        return 1.25
    cfg = MemoryConfig("deit_tiny", {"attn": "eager"}, res=32, card="v100-32gb")
    row = memory_row(cfg, {}, paper)
    assert row["status"] == "ok" and row["card"] == "v100-32gb" and row["card_gib"] == CARDS["v100-32gb"]
    assert row["mem_pred_used_gib"] == row["mem_pred_reserved_gib"] + CONTEXT_GIB and row["fits"] is True
    assert row["paper_gib"] == 1.25 and seen == [("deit_tiny", 32, 1, "fp32", False, "eager")]
    train = memory_row(MemoryConfig("deit_tiny", {"attn": "eager"}, res=32, mode="train"), {}, paper)
    assert train["paper_gib"] == "" and len(seen) == 1   # the paper measured no training
