"""The GPU check's results in one archive, and back into a checkout's results/ folder.

``write_environment`` records the card, driver, versions and clocks in ``environment.json``; ``write_archive``
packs an output folder into a .tar.gz whose one top folder is named ``<card slug>-<date>`` (the run's
start); ``unpack`` extracts such an archive to ``results/gpu/<card slug>-<date>/`` and adds a line for it
to ``results/README.md``. Nothing already there is overwritten.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import tarfile
from pathlib import Path

from vimbench.errors import InputError
from vimbench.measure.nvml import GpuReadings

SUFFIXES = (".tar.gz", ".tgz")
_TOP = re.compile(r"^[a-z0-9][a-z0-9-]*-\d{4}-\d{2}-\d{2}$")


def check_archive_path(path: str) -> Path:
    """The ``--archive`` PATH, checked before any work starts: a .tar.gz or .tgz name, in an existing
    folder, not an existing file (results are never overwritten). Raises ``InputError``."""
    p = Path(path)
    if not p.name.endswith(SUFFIXES):
        raise InputError(f"--archive {path}: the name must end in .tar.gz or .tgz")
    if p.exists():
        raise InputError(f"--archive {path} exists already; choose a new name (archives are never overwritten)")
    if not p.parent.is_dir():
        raise InputError(f"--archive {path}: folder {p.parent} does not exist")
    return p


def clocks(index: int = 0) -> dict:
    """Clocks (MHz) of CUDA device ``index`` now and at most, its temperature (C) and power (W), from guarded
    NVML readings (``measure.nvml.GpuReadings``): a reading that fails is None, and ``nvml_notes`` says why."""
    gpu = GpuReadings(index)
    nv, h = gpu.nv, gpu.handle
    if h is None:
        return {"nvml_notes": gpu.notes}
    out = {**gpu.telemetry(),
           "mem_clock_mhz": gpu.read("memory clock", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
           "sm_clock_max_mhz": gpu.read("max sm clock", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)),
           "mem_clock_max_mhz": gpu.read("max memory clock",
                                         lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM))}
    return {**out, "nvml_notes": gpu.notes} if gpu.notes else out


def write_environment(out: Path, env: dict, when: str) -> Path:
    """Adds to ``out/environment.json``: ``env`` (card, driver, versions; ``measure.env.environment``) and
    the clocks now under ``clocks_<when>`` (e.g. start, end)."""
    path = out / "environment.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(env)
    try:
        data[f"clocks_{when}"] = clocks()
    except Exception as e:  # an NVML error must not cost the results
        data[f"clocks_{when}"] = {"error": f"{type(e).__name__}: {e}"}
    path.write_text(json.dumps(data, indent=1))
    return path


def archive_name(card: str, day: datetime.date) -> str:
    """The archive's top folder and the unpacked folder's name: ``<card slug>-<YYYY-MM-DD>``."""
    from vimbench.measure.env import slug
    return f"{slug(card)}-{day.isoformat()}"


def write_archive(out: Path, path: Path, top: str) -> Path:
    """Packs every regular file under ``out`` into the .tar.gz ``path``, under the folder ``top``. Written to
    a temporary name first, then renamed, so ``path`` is never a half-written archive."""
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for f in sorted(p for p in out.rglob("*") if p.is_file() and not p.is_symlink()):
            tar.add(f, arcname=f"{top}/{f.relative_to(out).as_posix()}", recursive=False)
    os.replace(partial, path)
    return path


def _top_folder(tar: tarfile.TarFile, archive: str) -> str:
    tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
    if len(tops) != 1 or not _TOP.match(next(iter(tops))):
        raise InputError(f"--unpack {archive}: not a gpu-check archive (one top folder <card>-<date> expected, "
                         f"found {', '.join(sorted(tops)) or 'nothing'})")
    top = tops.pop()
    if f"{top}/summary.md" not in tar.getnames():
        raise InputError(f"--unpack {archive}: not a gpu-check archive (no {top}/summary.md)")
    return top


def index_line(folder: Path, rel: str) -> str:
    """The results/README.md table row of an unpacked gpu-check folder: machine from environment.json,
    the summary's verdict, the command that made it."""
    env_path = folder / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    machine = ", ".join(filter(None, [env.get("device_name", "GPU"),
                                      *(f"{k.removesuffix('_version')} {env[k]}" for k in
                                        ("driver_version", "torch_version", "triton_version") if env.get(k))]))
    card = env.get("device_name", "")
    verdict = (folder / "summary.md").read_text().splitlines()[0].removeprefix(f"# GPU check: {card}: ")
    report = f"; paper-preset [report]({rel}/report/report.md)" if (folder / "report" / "report.md").exists() else ""
    command = env.get("command", "vimbench gpu-check")
    return f"| [{rel}/]({rel}/) | {machine} | [summary]({rel}/summary.md): {verdict}{report} | `{command}` |"


def add_to_index(readme: Path, line: str) -> None:
    """Adds ``line`` as the first row of the first table in ``readme`` (newest first) and drops the
    placeholder row for gpu/ (``| gpu/ |``)."""
    lines = readme.read_text().splitlines()
    sep = next((i for i, ln in enumerate(lines) if re.match(r"^\|(-+\|)+$", ln.replace(" ", ""))), None)
    if sep is None:
        raise InputError(f"{readme}: no results table to add the unpacked folder to")
    lines.insert(sep + 1, line)
    readme.write_text("\n".join(ln for ln in lines if not ln.startswith("| gpu/ |")) + "\n")


def unpack(archive: str, results: Path = Path("results")) -> Path:
    """Extracts the gpu-check ``archive`` to ``results/gpu/<card>-<date>/`` and indexes it in
    ``results/README.md``. Raises ``InputError`` for a missing or foreign archive, a checkout without
    results/README.md, or a folder that exists already."""
    readme = results / "README.md"
    if not readme.is_file():
        raise InputError(f"--unpack: no {readme} here; run it from the root of a vimbench checkout")
    try:
        tar = tarfile.open(archive, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise InputError(f"--unpack {archive}: cannot read it as a tar archive ({e})") from None
    with tar:
        top = _top_folder(tar, archive)
        dest = results / "gpu" / top
        if dest.exists():
            raise InputError(f"--unpack: {dest} exists already; it is not overwritten")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest.parent, filter="data")
    add_to_index(readme, index_line(dest, f"gpu/{top}"))
    return dest
