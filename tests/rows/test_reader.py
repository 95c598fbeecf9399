"""The schema and the reader: every kind is recognised, old column names still load, settings split."""
import pandas as pd
import pytest
from helpers_csv import kernel_frame, scaling_frame

from vimbench.errors import InputError
from vimbench.rows.reader import load_results, split_settings
from vimbench.rows.schema import COLUMN_DOCS, RENAMED, SCHEMAS, kind_of


def test_every_column_is_documented_once_and_keys_are_columns():
    for schema in SCHEMAS.values():
        assert len(set(schema.columns)) == len(schema.columns), schema.kind
        assert set(schema.columns) <= set(COLUMN_DOCS), set(schema.columns) - set(COLUMN_DOCS)
        assert set(schema.key) | set(schema.required) | set(schema.setting) <= set(schema.columns), schema.kind
        assert kind_of(schema.columns) == schema.kind
    assert not set(RENAMED) & set(COLUMN_DOCS)  # an old name is never a current one


def test_csvs_with_the_old_column_names_still_load(tmp_path):
    old = scaling_frame().rename(columns={"time_ms": "latency_ms", "time_ms_p10": "latency_ms_p10",
                                          "time_ms_p90": "latency_ms_p90", "mem_pred_peak_gib": "mem_pred_gib"})
    old.to_csv(tmp_path / "s.csv", index=False)
    kind, df = load_results(tmp_path / "s.csv")
    assert kind == "scaling" and df["time_ms"].equals(scaling_frame()["time_ms"].astype(float))
    kernel_frame().rename(columns={"tokens": "L", "flops_total": "flops"}).to_csv(tmp_path / "k.csv", index=False)
    kind, df = load_results(tmp_path / "k.csv")
    assert kind == "kernels" and "tokens" in df and "L" not in df


def test_settings_split_on_the_schemas_setting_columns(tmp_path):
    df = pd.concat([scaling_frame(), scaling_frame().assign(dtype="bf16")])
    df.to_csv(tmp_path / "s.csv", index=False)
    kind, df = load_results(tmp_path / "s.csv")
    assert [s.key["dtype"] for s in split_settings(kind, df)] == ["bf16", "fp32"]


def test_a_boolean_column_with_garbage_is_one_error(tmp_path):
    scaling_frame().assign(head="maybe").to_csv(tmp_path / "s.csv", index=False)
    with pytest.raises(InputError, match="column head holds 'maybe'"):
        load_results(tmp_path / "s.csv")


def test_train_settings_with_checkpointing_are_their_own_and_old_csvs_read_without_it(tmp_path):
    old = scaling_frame()
    assert "grad_checkpointing" not in old and "mode" not in old
    infer = old.assign(batch_requested=old.batch)
    new = pd.concat([infer, infer.assign(mode="train", grad_checkpointing=False),
                     infer.assign(mode="train", grad_checkpointing=True),
                     infer.assign(batch_requested=0, mode="train")])
    for name, frame in (("old", old), ("new", new)):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    kind, df = load_results(tmp_path / "old.csv")
    assert not df.grad_checkpointing.any() and (df["mode"] == "infer").all()
    assert [s.slug for s in split_settings(kind, df)] == ["cuda0-fp32-b64-backbone"]
    kind, df = load_results(tmp_path / "new.csv")
    assert sorted(s.slug for s in split_settings(kind, df)) == [
        "cuda0-fp32-b64-backbone", "cuda0-fp32-b64-backbone-train", "cuda0-fp32-b64-backbone-train-gc",
        "cuda0-fp32-bmax-backbone-train"]
