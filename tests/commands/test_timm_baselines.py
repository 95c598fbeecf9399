"""`timm:<name>` baselines: a CNN (resnet18) and a hybrid (mambaout_femto) get rows in flops, memory and
scaling with impl "timm"; --attn applies only to models that take it; an unknown name gets close matches."""
import pandas as pd
import pytest
import timm

from vimbench.commands import main
from vimbench.errors import InputError
from vimbench.kernels.attention import ATTENTION_BACKENDS
from vimbench.measure.core import GIB
from vimbench.models.registry import OWN_IMPL, create_model, impl_of, model_entry, model_variants

HYBRID = "timm:mambaout_femto" if "mambaout_femto" in timm.list_models() else None
MODELS = ["timm:resnet18", *([HYBRID] if HYBRID else [])]
RESNET18_GMACS = 1.814  # torchvision's published figure for resnet18 at 224 px (its "GFLOPS" are multiply-adds)


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_attn_applies_only_to_models_that_take_it():
    vit = model_entry("timm:vit_tiny_patch16_224").options
    assert list(vit) == ["attn"] and vit["attn"]() == ATTENTION_BACKENDS
    for name in MODELS:
        assert model_entry(name).options == {}
    assert model_variants(["timm:resnet18", "deit_tiny"], ["eager", "sdpa"], ["auto"]) == [
        ("timm:resnet18", {}), ("deit_tiny", {"attn": "eager"}), ("deit_tiny", {"attn": "sdpa"})]
    assert impl_of({}) == OWN_IMPL == "timm"
    with pytest.raises(InputError, match="takes no option 'attn'"):
        create_model("timm:resnet18", attn="eager")


@pytest.mark.parametrize("name,matches", [("timm:resnt18", "close matches: timm:resnet18,"),
                                          ("timm:mambaout_femt", "close matches: timm:mambaout_femto"),
                                          ("timm:", "needs a model name")])
def test_unknown_timm_name_gets_close_matches(name, matches, capsys):
    code, _, err = run(["flops", "--models", name, "--res", "64"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("vimbench flops: error: --models: ") and matches in err


def test_flops_of_timm_models(tmp_path, capsys):
    out = tmp_path / "f.csv"
    code, _, _ = run(["flops", "--models", ",".join(MODELS + ["deit_tiny"]), "--attn", "eager,sdpa", "--res", "224",
                      "--head", "--out", str(out)], capsys)
    assert code == 0
    df = pd.read_csv(out)
    assert list(zip(df.model, df.impl)) == [*((m, "timm") for m in MODELS), ("deit_tiny", "eager"),
                                            ("deit_tiny", "sdpa")]
    assert (df.status == "ok").all() and df.tokens[df.family == "timm"].isna().all()
    resnet = df[df.model == "timm:resnet18"].iloc[0]
    assert resnet.flops_linear == pytest.approx(2 * RESNET18_GMACS * 1e9, rel=0.01)  # convs and the fc: 2 per MAC
    assert resnet.flops_attention == resnet.flops_scan == 0 and resnet.params == 11_689_512
    if HYBRID:
        assert df[df.model == HYBRID].iloc[0].flops_total > 0


def test_memory_of_timm_models(tmp_path, capsys):
    out = tmp_path / "m.csv"
    code, _, _ = run(["memory", "--models", ",".join(MODELS), "--res", "64", "--batch", "2", "--out", str(out)],
                     capsys)
    assert code == 0
    df = pd.read_csv(out)
    assert list(df.model) == MODELS and (df.status == "ok").all()
    assert (df.impl == "timm").all() and (df.kernel == "timm").all()
    resnet = df.iloc[0]
    assert resnet.mem_pred_weights_gib == pytest.approx(11_689_512 * 4 / GIB, rel=0.01)  # fp32 weights
    assert (df.mem_pred_peak_gib > df.mem_pred_weights_gib).all()


def test_scaling_of_timm_models(tmp_path, capsys):
    out = tmp_path / "s.csv"
    code, _, _ = run(["scaling", "--models", ",".join(MODELS), "--res", "32", "--device", "cpu", "--repeats", "1",
                      "--warmup", "0", "--min-time", "0", "--out", str(out)], capsys)
    assert code == 0
    df = pd.read_csv(out)
    assert list(df.model) == MODELS and (df.status == "ok").all(), df.error.tolist()
    assert (df.impl == "timm").all() and (df.kernel == "timm").all()
    assert (df.throughput_img_s > 0).all() and df.params.iloc[0] == 11_689_512
