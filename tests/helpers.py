"""Test helpers: one closeness check against the project's tolerance table (``check.TOLERANCES``), the
scan input builder (``check.scan_case``), a gradient closeness check (``assert_grads_close``), a thread count for a block (``num_threads``), NaN-poisoned
allocations, and for plug-ins: a planted wrong scan, isolated registries (``fresh_plugins``) and an
installed-looking distribution without pip (``fake_install``); a Slurm login node without a cluster
(``fake_slurm``)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from vimbench.kernels.selective_scan.check import TOLERANCES, scan_case  # noqa: F401 (re-exported)

TOL = TOLERANCES


def assert_close(name, ref, out, dtype=None):
    """Fails on NaN/inf, a shape mismatch, or an error beyond ``TOL[dtype]`` (dtype defaults to out's);
    the message gives the max absolute and relative error."""
    tol = TOL[dtype or out.dtype]
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    ref, out = ref.double(), out.double()
    err = (ref - out).abs()
    rel = (err / ref.abs().clamp_min(1e-6)).max().item()
    assert torch.allclose(out, ref, **tol), \
        f"{name}: max abs err {err.max().item():.3g}, max rel err {rel:.3g}, tol {tol}"


GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def assert_grads_close(want, got, dtype):
    """Each gradient within ``check.GRAD_TOLERANCES`` of its float64 reference (relative to the reference's
    largest magnitude, the gradient check's rule), in its input's dtype; None where the reference is None."""
    from vimbench.kernels.selective_scan.check import GRAD_ATOL, GRAD_TOLERANCES
    for name, w, g in zip(GRAD_NAMES, want, got):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and torch.isfinite(g).all(), name
        err, scale = (g.double() - w).abs().max().item(), w.abs().max().item()
        assert err <= GRAD_TOLERANCES[dtype] * scale + GRAD_ATOL, f"d{name}: error {err:.3g}, max {scale:.3g}"


@contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def poison_empty(monkeypatch) -> None:
    """Make torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled floating tensors, so an
    output element a kernel never writes cannot pass a comparison."""
    def poisoned(fn):
        def wrapper(*args, **kwargs):
            t = fn(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return wrapper
    # torch.device(...) as a context manager caches the set of factory functions it redirects on first
    # use: fill that cache with the real functions first, or later device contexts would miss them
    torch.utils._device._device_constructors()
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        monkeypatch.setattr(owner, name, poisoned(getattr(owner, name)))


def planted_wrong_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The reference scan with 0.1 added to every output of an odd length L > 1: passes L = 1, fails odd L
    (check.CASES 'odd-L') by exactly 0.1."""
    from vimbench.kernels.selective_scan import selective_scan_ref
    out, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    if u.shape[-1] % 2 == 1 and u.shape[-1] > 1:
        out = out + 0.1
    return (out, last) if return_last_state else out


def register_planted_wrong_scan() -> None:
    """Registers ``planted_wrong_scan`` as the CPU scan backend "wrong": an entry point's function, for other
    processes (submitit jobs, their workers) to find it as an installed plug-in (``fake_install`` with
    {"wrong": "helpers:register_planted_wrong_scan"}, and this folder on their PYTHONPATH)."""
    import vimbench
    vimbench.register_scan_backend("wrong", planted_wrong_scan, devices="cpu")


def register_forward_only_scan() -> str:
    """Registers the reference scan as "fwdonly", a plug-in with a fake and no backward, on every device (as a
    forward-only GPU backend would be); returns its name."""
    import vimbench
    from vimbench.kernels.selective_scan import selective_scan_ref
    vimbench.register_scan_backend("fwdonly", selective_scan_ref, devices=("cpu", "cuda"), fake=selective_scan_ref)
    return "fwdonly"


@pytest.fixture
def fresh_plugins(monkeypatch):
    """A test with its own plug-in registries: entry points load afresh in it, and every backend or model it
    registers is gone after it."""
    from vimbench.kernels import attention, plugins
    from vimbench.kernels.selective_scan import backends
    from vimbench.models import registry
    saved = [(d, dict(d)) for d in (backends.REGISTRY, attention.ATTENTION_PLUGINS, registry._REGISTRY)]
    for name in backends.scan_plugins():  # entry points already loaded in this process (the peers) load again
        backends.REGISTRY.pop(name)
    attention.ATTENTION_PLUGINS.clear()
    monkeypatch.setattr(plugins, "_loaded", set())
    monkeypatch.setattr(plugins, "_tried", set())
    monkeypatch.setattr(plugins, "problems", [])
    monkeypatch.setenv(plugins.SKIPPED_ENV, "")  # recorded, so that what the test's commands skip is undone
    monkeypatch.delenv(plugins.SKIPPED_ENV)
    yield
    for d, old in saved:
        d.clear()
        d.update(old)


EXAMPLE_PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "scan_plugin"


def fake_install(site: Path, dist: str, entry_points: dict[str, str], group: str = "vimbench.scan_backends") -> None:
    """What ``pip install`` leaves for importlib.metadata, without pip: ``site``/<dist>-0.1.dist-info with the
    distribution's METADATA and ``entry_points`` ({name: "module:function"}) in ``group``. ``site`` must be
    on sys.path (or PYTHONPATH) for the entry points to be seen."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))


needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(),
                                  reason="checks what happens on a host without a CUDA GPU; this host has one")
"""For tests of the refusals a host without a GPU gives (on a GPU host those calls would start real work)."""


SBATCH = """#!/bin/sh
n=$(ls "{scripts}" | wc -l)
cp "$1" "{scripts}/$n.sh"
echo "Submitted batch job 4242"
"""
SACCT = """#!/bin/sh
printf 'JobID|State|NodeList\\n4242_0|PREEMPTED|n1\\n4242_1|FAILED|n2\\n4242|TIMEOUT|n3\\n'
"""


def slurm_commands(root: Path) -> tuple[Path, Path]:
    """(a folder holding ``fake_slurm``'s sbatch, srun and sacct, the folder sbatch keeps its scripts in), both
    made under ``root``."""
    bin_dir, scripts = root / "bin", root / "submitted"
    bin_dir.mkdir()
    scripts.mkdir()
    for name, text in {"sbatch": SBATCH.format(scripts=scripts), "srun": "#!/bin/sh\n", "sacct": SACCT}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, scripts


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A Slurm login node without a cluster: sbatch (keeps each script it is given as <n>.sh in the folder
    returned, n counting from 0; every submission is job 4242), srun, and sacct (array task 0 pre-empted,
    task 1 failed; the single job 4242 timed out) on PATH."""
    bin_dir, scripts = slurm_commands(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return scripts


def submitted(scripts: Path) -> list[str]:
    """The sbatch scripts ``fake_slurm`` was given, in the order they were submitted."""
    return [p.read_text() for p in sorted(scripts.glob("*.sh"), key=lambda p: int(p.stem))]
