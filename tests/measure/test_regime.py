"""torch.compile and autocast around the measured callable: compiled equals eager, graph breaks are counted
(0 for Vim with every CPU scan backend and for DeiT with eager and sdpa attention), and a compile failure
becomes an error row while the sweep goes on.

Compiling is slow on a small CPU, so the models are Vim-Ti's and DeiT-Ti's widths at depth 2, 32 px, batch 1,
each compiled once (module-scope cache)."""
import pandas as pd
import pytest
import timm
import torch
from helpers import assert_close

from vimbench.baselines.deit import set_attention_backend
from vimbench.config import ScalingConfig
from vimbench.kernels.selective_scan import resolve_scan_backend
from vimbench.measure.isolation import one_line
from vimbench.measure.regime import autocast, compiled
from vimbench.models.vim import VisionMamba
from vimbench.rows import scaling as scaling_rows
from vimbench.rows.schema import SCALING
from vimbench.rows.sweep import run_sweep
from vimbench.rows.writer import CsvLog

RES = 32
CPU_SCANS = ["ref", "cpu"] + (["cpp"] if resolve_scan_backend("auto", "cpu") == "cpp" else [])
CASES = [("vim", scan) for scan in CPU_SCANS] + [("deit", "eager"), ("deit", "sdpa")]


def build(family: str, impl: str) -> torch.nn.Module:
    if family == "vim":
        return VisionMamba(RES, 16, 16, 192, depth=2, scan=impl).eval()
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=RES, depth=2)
    set_attention_backend(model, impl)
    return model.eval()


_CACHE = {}


@pytest.fixture(scope="module")
def compiled_case():
    """(eager output, compiled output, compile info) of each case, compiled on first use."""
    def get(case):
        if case not in _CACHE:
            model, x = build(*case), torch.randn(1, 3, RES, RES)
            outputs = []

            def call(fn):
                with torch.inference_mode():
                    outputs.append(fn(x))

            call(model.forward_features)
            fn, info = compiled(model.forward_features, "default", call)
            call(fn)  # a second call: runs the compiled code, no recompilation
            _CACHE[case] = (outputs[0], outputs[-1], info)
        return _CACHE[case]
    return get


@pytest.mark.parametrize("case", CASES, ids=[f"{f}-{i}" for f, i in CASES])
def test_compiled_equals_eager_in_whole_graphs(case, compiled_case):
    eager, out, info = compiled_case(case)
    assert_close(f"{case} compiled", eager, out, torch.float32)
    assert info["graph_breaks"] == 0 and info["compile_s"] > 0


def test_graph_breaks_are_counted():
    def fn(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    x = torch.randn(4)
    fn_c, info = compiled(fn, "default", lambda f: f(x))
    assert info["graph_breaks"] == 1 and torch.equal(fn_c(x), (x + 1) * 2)
    assert compiled(fn, "none", lambda f: f(x)) == (fn, {})


def test_autocast_runs_matmuls_in_half_precision_with_fp32_weights():
    layer, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with autocast(torch.device("cpu"), "bf16"):
        assert layer(x).dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    with autocast(torch.device("cpu"), "none"):
        assert layer(x).dtype == torch.float32


def _in_process(fn, args=(), timeout=None):
    """run_isolated without the worker: an exception becomes the same status/error dict."""
    try:
        return {"status": "ok", **fn(*args)}
    except Exception as e:
        return {"status": "error", "error": one_line(e)}


def test_compile_failure_is_an_error_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import torch._inductor.compile_fx as inductor

    def broken(*args, **kwargs):
        raise RuntimeError("injected inductor failure")

    monkeypatch.setattr(inductor, "compile_fx", broken)
    monkeypatch.setattr(scaling_rows, "run_isolated", _in_process)
    base = dict(model="deit_tiny", options={"attn": "eager"}, res=RES, batch=1, device="cpu", warmup=0, repeats=1,
                min_time=0)
    log = CsvLog(tmp_path / "s.csv", SCALING)
    rows = run_sweep([ScalingConfig(**base, compile="default"), ScalingConfig(**base, compile="none")], log,
                     lambda cfg: scaling_rows.scaling_row(cfg, {}, backoff=False), lambda cfg: cfg.compile)
    df = pd.read_csv(tmp_path / "s.csv")
    assert list(df.compile) == ["default", "none"] and list(df.status) == ["error", "ok"]
    assert df.error[0] == ("CompileFailed: torch.compile (mode default) failed: inductor raised RuntimeError: "
                           "injected inductor failure")
    assert pd.isna(df.mem_pred_peak_gib[0]) and df.mem_pred_peak_gib[1] > 0  # no eager prediction for compiled rows
    assert rows[1]["throughput_img_s"] > 0 and "compile_s" not in rows[1]
