"""Where baselines live and how they are read and written; the machine a timing baseline holds for.

The project's own baselines (the whole suite's, per machine, and the deterministic one) are files of a vimbench
checkout, ``benchmarks/baselines/``; installed from a wheel there is no such folder (``BASELINE_DIR`` is None)
and a baseline is named with ``--baseline``, or is the scan gate's file in the current folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vimbench.errors import InputError
from vimbench.layout import checkout_root
from vimbench.measure.env import cpu_model, slug

REPO_ROOT = checkout_root()
"""The vimbench checkout this package runs from (``vimbench.layout.checkout_root``); None installed from a wheel."""
BASELINE_DIR = None if REPO_ROOT is None else REPO_ROOT / "benchmarks" / "baselines"


def baseline_dir() -> Path:
    """``BASELINE_DIR``; InputError outside a checkout."""
    if BASELINE_DIR is None:
        raise InputError("no stored baselines outside a vimbench checkout (benchmarks/baselines/): name the file "
                         "with --baseline, or gate one scan backend with --scan NAME")
    return BASELINE_DIR


def deterministic_baseline_path() -> Path:
    return baseline_dir() / "deterministic.json"


def device_class(device: str) -> str:
    """The machine a timing baseline holds for, as a file-name slug of what decides the speed: on CPU the
    model, the ATen capability the kernels dispatch to, the core count and the torch version
    ('cpu-intel-r-xeon-r-processor-avx512-2c-torch2-14-1'); on CUDA the GPU's name, compute capability and
    the torch version ('nvidia-h100-80gb-hbm3-sm90-torch2-14-1'). The model alone is not enough: "AMD EPYC"
    names both AVX-512 and AVX2-only machines, and on a 2-core AVX2 EPYC the unchanged tree failed 4
    benchmarks of a baseline recorded on another EPYC; the same suite ran 28-90% slower on an Intel Xeon
    than on the AMD EPYC."""
    torch_version = torch.__version__.split("+")[0]
    if device == "cpu":
        return slug(f"cpu {cpu_model()} {torch.backends.cpu.get_cpu_capability()} {os.cpu_count()}c "
                    f"torch{torch_version}")
    if not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device here")
    major, minor = torch.cuda.get_device_capability()
    return slug(f"{torch.cuda.get_device_name()} sm{major}{minor} torch{torch_version}")


def timing_baseline_path(device: str) -> Path:
    return baseline_dir() / f"{device_class(device)}.json"


def load_baseline(path: Path, kind: str) -> dict:
    """The baseline at ``path``; InputError if it is absent, unreadable or of another kind."""
    if not path.exists():
        raise InputError(f"no baseline at {path}: record one with `vimbench gate"
                         f"{' --deterministic' if kind == 'deterministic' else ''} --update`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise InputError(f"--baseline {path}: cannot read it: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"--baseline {path} is not a {kind} baseline (kind {found!r})")
    return data


def save_baseline(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
