"""Backend probes never kill a command: any exception a probe raises makes the backend unavailable, with
its reason, and the command that asked reports it on one line (exit 2) instead of a traceback."""
import pytest
import torch
import torch.nn.functional as F

from vimbench.commands import main
from vimbench.errors import BackendUnavailable
from vimbench.kernels.attention import check_attention_backend
from vimbench.kernels.selective_scan import compiled_cpu, resolve_scan_backend
from vimbench.kernels.selective_scan import backends


def cudnn_frontend_error(*args, **kwargs):
    raise RuntimeError("cuDNN Frontend error: [cudnn_frontend] Error: No execution plans support the graph.")


def test_attention_probe_turns_any_error_into_unavailable(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", cudnn_frontend_error)
    with pytest.raises(BackendUnavailable, match="'efficient' failed its probe .*cuDNN Frontend error"):
        check_attention_backend("efficient", "cpu", torch.float32, 64)


def test_a_failing_attention_probe_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(F, "scaled_dot_product_attention", cudnn_frontend_error)
    argv = ["kernels", "--models", "deit_tiny", "--attn", "efficient", "--res", "32", "--device", "cpu",
            "--out", str(tmp_path / "k.csv")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "failed its probe" in err
    assert not (tmp_path / "k.csv").exists()


def test_a_scan_probe_that_raises_makes_the_backend_unavailable(monkeypatch):
    def broken_build():
        raise OSError("[Errno 28] No space left on device")
    monkeypatch.setattr(compiled_cpu, "build", broken_build)
    assert compiled_cpu.available() == (False, "[Errno 28] No space left on device")
    with pytest.raises(BackendUnavailable, match="No space left"):
        resolve_scan_backend("cpp", "cpu")
    assert resolve_scan_backend("auto", "cpu") == "cpu"  # auto: the next backend, recorded by name


def test_a_broken_package_counts_as_absent(monkeypatch):
    def find_spec(name):
        raise AttributeError("module 'mamba_ssm' has no attribute '__spec__'")
    monkeypatch.setattr(backends.importlib.util, "find_spec", find_spec)
    backends._importable.cache_clear()
    try:
        with pytest.raises(BackendUnavailable, match="mamba_ssm package"):
            resolve_scan_backend("mamba_ssm", "cpu")
    finally:
        backends._importable.cache_clear()
