"""Plug-in backends: registration through the API and through entry points, the example package, FLOPs from
the same formula, memory prediction through the plug-in's fake, and the correctness check refusing a wrong
scan with its worst error and shape."""
import pytest
import torch

import vimbench
from helpers import (EXAMPLE_PLUGIN, assert_close, fake_install, fresh_plugins, planted_wrong_scan,  # noqa: F401
                     scan_case)
from vimbench.config import FlopsConfig, MemoryConfig
from vimbench.count.flops import count_flops
from vimbench.count.memory import predict_memory
from vimbench.errors import BackendUnavailable
from vimbench.kernels import plugins
from vimbench.kernels.peers import MAMBAPY
from vimbench.kernels.attention import attention, attention_backends, attention_eager
from vimbench.kernels.selective_scan import (SCAN_BACKENDS, check_scan_backend, scan_backends, selective_scan,
                                            selective_scan_ref)
from vimbench.kernels.selective_scan.backends import REGISTRY
from vimbench.kernels.selective_scan.check import check_backend, check_named_backend


@pytest.fixture
def example(fresh_plugins, monkeypatch, tmp_path):
    """The example package (examples/scan_plugin) as pip would leave it: importable, with its entry point."""
    fake_install(tmp_path, "vimbench-scan-plugin", {"example": "vimbench_scan_plugin:register"})
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_entry_point_loads_lazily_and_the_backend_is_the_reference(example):
    assert "example" not in REGISTRY                               # nothing loaded at import
    assert "example" in scan_backends()
    plugin = REGISTRY["example"]
    assert plugin.package == "vimbench-scan-plugin" and plugin.devices == ("cpu", "cuda") and plugin.backward
    args, kw = scan_case(2, 6, 7, 4, 1)
    out, last = selective_scan(*args, **kw, return_last_state=True, backend="example")
    ref, ref_last = selective_scan_ref(*args, **kw, return_last_state=True)
    assert torch.equal(out, ref) and torch.equal(last, ref_last)
    assert check_named_backend("example")["check_ok"]


def test_example_predicts_memory_through_its_fake(example):
    got, ref = (predict_memory(MemoryConfig("vim_tiny", {"scan": s}, 32, 2)) for s in ("example", "ref"))
    assert got.impl == "example" and got.mem_pred_weights_gib == ref.mem_pred_weights_gib
    # activations: at least the model's (b, L, D) input and output; at most ref's plus one (b, E, L) float32
    # tensor: the example's wrapper frames (its fake's as its scan's) hold the backward direction's flipped
    # delta until the scan returns, where ref alone drops it at once (traced: exactly that much more)
    b, L, D, E = 2, 5, 192, 384
    assert 2 * b * L * D * 4 <= got.mem_pred_activations_gib * 2**30 <= \
        ref.mem_pred_activations_gib * 2**30 + b * E * L * 4


def test_broken_and_clashing_entry_points_are_one_line_each_and_the_rest_still_works(example, capsys):
    fake_install(example, "broken-plugin", {"fast": "no_such_module_here:register"})
    (example / "clash_plugin.py").write_text(
        "import vimbench\nfrom vimbench.kernels.selective_scan import selective_scan_ref\n"
        "def register():\n    vimbench.register_scan_backend('cpu', selective_scan_ref, devices='cpu')\n")
    fake_install(example, "clash-plugin", {"mine": "clash_plugin:register"})
    assert tuple(n for n in scan_backends() if n not in MAMBAPY) == (*SCAN_BACKENDS, "example")  # peers if installed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and len(plugins.problems) == 2
    broken = next(line for line in err if "broken-plugin" in line)
    assert "'fast'" in broken and "ModuleNotFoundError" in broken
    clash = next(line for line in err if "clash-plugin" in line)
    assert "'cpu' clashes with a built-in backend" in clash
    scan_backends()                                               # loaded once: no second report
    assert capsys.readouterr().err == ""
    assert selective_scan(*scan_case(1, 4, 3, 4, 0)[0], backend="cpu").shape == (1, 4, 3)


def test_api_refuses_taken_and_malformed_names(fresh_plugins):
    for name, msg in (("cpu", "clashes with a built-in"), ("auto", "clashes with a built-in"),
                      ("my-scan", "letters, digits and _"), ("", "letters, digits and _")):
        with pytest.raises(ValueError, match=msg):
            vimbench.register_scan_backend(name, selective_scan_ref, devices="cpu")
    with pytest.raises(ValueError, match="devices"):
        vimbench.register_scan_backend("mine", selective_scan_ref, devices=())
    vimbench.register_scan_backend("mine", selective_scan_ref, devices="cpu")
    with pytest.raises(ValueError, match="clashes with package '\\(direct call\\)'"):
        vimbench.register_scan_backend("mine", selective_scan_ref, devices="cuda")
    with pytest.raises(BackendUnavailable, match="runs on cpu, not cuda"):
        check_scan_backend("mine", "cuda")


def test_flops_come_from_the_same_formula(fresh_plugins):
    vimbench.register_scan_backend("mine", selective_scan_ref, devices="cpu")
    mine, ref = (count_flops(FlopsConfig("vim_tiny", {"scan": s}, 64)) for s in ("mine", "ref"))
    assert mine == ref


def test_memory_prediction_uses_the_fake_or_says_it_is_unavailable(fresh_plugins):
    vimbench.register_scan_backend("nofake", selective_scan_ref, devices="cuda")
    with pytest.raises(BackendUnavailable, match="memory prediction unavailable: scan backend 'nofake'"):
        predict_memory(MemoryConfig("vim_tiny", {"scan": "nofake"}, 32))
    vimbench.register_scan_backend("withfake", selective_scan_ref, devices="cuda", fake=selective_scan_ref)
    pred = predict_memory(MemoryConfig("vim_tiny", {"scan": "withfake"}, 32))
    assert pred.impl == "withfake" and pred.mem_pred_peak_gib > pred.mem_pred_weights_gib > 0


def test_check_refuses_a_planted_wrong_result_with_its_worst_error_and_shape():
    result = check_backend(planted_wrong_scan)
    assert not result.ok and result.cases == 4                   # the four L = 1 cases passed
    assert result.failure.startswith("odd-L (2, 6, 7, 4, 1) float32 extras: out differs")
    assert result.worst == pytest.approx(0.1, abs=1e-5)


def test_attention_plugin_is_usable_and_refuses_taken_names(fresh_plugins):
    vimbench.register_attention_backend("mine", attention_eager, devices="cpu", description="eager again")
    assert attention_backends()[-1] == "mine"
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    assert_close("plug-in attention", attention_eager(q, k, v), attention(q, k, v, "mine"))
    with pytest.raises(ValueError, match="clashes with a built-in"):
        vimbench.register_attention_backend("sdpa", attention_eager, devices="cpu")
    assert vimbench.create_model("deit_tiny", img_size=32, attn="mine").blocks[0].attn.backend == "mine"


def test_models_entry_point_adds_a_model_and_a_clash_is_one_line(fresh_plugins, monkeypatch, tmp_path, capsys):
    (tmp_path / "model_plugin.py").write_text(
        "from vimbench.models.registry import register_model\n"
        "from vimbench.models.vim import VisionMamba\n"
        "def register():\n"
        "    register_model('vim_two_layers', 'vim', 'Vim-Ti with 2 layers')(\n"
        "        lambda img_size, scan='auto': VisionMamba(img_size, embed_dim=192, depth=2, scan=scan))\n"
        "def clash():\n"
        "    register_model('vim_tiny', 'vim', 'another vim_tiny')(lambda img_size, scan='auto': None)\n")
    fake_install(tmp_path, "model-plugin", {"two": "model_plugin:register", "again": "model_plugin:clash"},
                 group="vimbench.models")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "vim_two_layers" in vimbench.list_models()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'again' of package 'model-plugin'" in err[0] and "'vim_tiny' clashes" in err[0]
    net = vimbench.create_model("vim_two_layers", img_size=32, scan="ref")
    assert len(net.layers) == 2 and net.family == "vim"
    assert vimbench.model_entry("vim_tiny").description.startswith("Vim-Tiny")     # the built-in kept
