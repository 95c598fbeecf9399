"""The GPU check's results in one archive, and back into a checkout's results/ folder.

``write_environment`` records the card, driver, versions and clocks in ``environment.json``; ``write_archive``
packs an output folder into a .tar.gz whose one top folder is named ``<card slug>-<date>`` (the run's
start); ``unpack`` extracts such an archive to ``results/gpu/<card slug>-<date>/`` and adds a line for it
to ``results/README.md``. The archive is untrusted: ``unpack`` writes only inside a new folder, only files
and folders, within size and member limits, and a failure leaves nothing behind; nothing already there is
overwritten.
"""
from __future__ import annotations

import bz2
import contextlib
import datetime
import gzip
import json
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zlib
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


MAX_MEMBERS = 10_000
"""``unpack`` refuses an archive with more members: a gpu-check run writes a few hundred files."""
MAX_BYTES = 2 * 2**30
"""``unpack`` refuses an archive whose files add up to more bytes (uncompressed): a run writes well under 1 GiB."""
_ODD = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")  # control characters and line breaks
_COMPRESSIONS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_LINKS = (("issym", "a symbolic link"), ("islnk", "a hard link"), ("ischr", "a character device"),
          ("isblk", "a block device"), ("isfifo", "a FIFO"))


def _kind(member: tarfile.TarInfo) -> str:
    return next((words for test, words in _LINKS if getattr(member, test)()), "not a file or folder")


class _Members:
    """The checks of each member of an archive as it streams by: one top folder named ``<card>-<date>``
    that is not under ``gpu`` yet, names confined to it (no absolute path, no empty, ``.`` or ``..`` part,
    no control character), regular files and folders only, no name twice, no file used as a folder, at most
    ``MAX_MEMBERS`` members and ``MAX_BYTES`` of files. Each failure raises ``InputError``."""

    def __init__(self, archive: str, gpu: Path):
        self.archive, self.gpu = archive, gpu
        self.top, self.count, self.bytes = None, 0, 0
        self.files, self.folders = set(), set()

    def refuse(self, why: str):
        raise InputError(f"--unpack {self.archive}: {why}; nothing unpacked")

    def check(self, m: tarfile.TarInfo) -> tuple[str, ...]:
        """The path of member ``m`` below the top folder, as parts (empty for the top folder itself)."""
        self.count += 1
        if self.count > MAX_MEMBERS:
            self.refuse(f"more than {MAX_MEMBERS} members")
        name = m.name.rstrip("/") if m.isdir() else m.name
        parts = tuple(name.split("/"))
        if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or _ODD.search(name):
            self.refuse(f"member {name!r} would land outside its folder or has an odd name")
        if not (m.isreg() or m.isdir()):
            self.refuse(f"member {name!r} is {_kind(m)}; only files and folders are unpacked")
        if self.top is None:
            self._first(parts[0])
        elif parts[0] != self.top:
            self.refuse(f"not a gpu-check archive (one top folder expected, found {self.top} and {parts[0]})")
        rel = parts[1:]
        if not rel and not m.isdir():
            self.refuse(f"{name} is a file; a gpu-check archive's top is a folder")
        if rel in self.files or (rel in self.folders and not m.isdir()) \
                or any(rel[:i] in self.files for i in range(1, len(rel))):
            self.refuse(f"member {name!r} appears twice, or as a file and a folder")
        if m.isreg():
            self.bytes += m.size
            if self.bytes > MAX_BYTES:
                self.refuse(f"its files add up to more than {MAX_BYTES:,} bytes")
            self.files.add(rel)
        self.folders.update(rel[:i] for i in range(1, len(rel) + m.isdir()))
        return rel

    def _first(self, top: str) -> None:
        if not _TOP.match(top):
            self.refuse(f"not a gpu-check archive (one top folder <card>-<date> expected, found {top})")
        if os.path.lexists(self.gpu / top):
            raise InputError(f"--unpack: {self.gpu / top} exists already; it is not overwritten")
        self.top = top


def _extract(archive: str, into: Path, members: _Members) -> str:
    """Streams ``archive`` once, checking each member (``_Members``) before writing it under ``into``, a new
    empty folder (no link is ever made in it, so nothing written there can land elsewhere), and reads it to
    its end, where a corrupt gzip or xz stream fails its checksum. Member by member, without
    tarfile's ``extractall``: its ``filter`` argument is missing before Python 3.10.12 / 3.11.4. Returns the
    archive's top folder name."""
    try:
        with _decompressed(archive) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for m in tar:
                rel = members.check(m)
                target = into.joinpath(*rel)
                if m.isdir():
                    _write(target.mkdir, archive, rel, parents=True, exist_ok=True)
                    continue
                _write(target.parent.mkdir, archive, rel, parents=True, exist_ok=True)
                fd = _write(os.open, archive, rel, target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out, tar.extractfile(m) as data:
                    while chunk := data.read(1 << 20):
                        _write(out.write, archive, rel, chunk)
            trailing = 0  # read to the end: a gzip or xz stream's checksum is verified only there
            while chunk := raw.read(1 << 20):
                trailing += len(chunk)
                if trailing > MAX_BYTES:
                    members.refuse(f"more than {MAX_BYTES:,} bytes after the end of the archive")
    except _READ_ERRORS as e:
        raise InputError(f"--unpack {archive}: cannot read it as a tar archive "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'}); "
                         "nothing unpacked") from None
    if members.top is None:
        members.refuse("not a gpu-check archive (it is empty)")
    if not (into / "summary.md").is_file():
        members.refuse(f"not a gpu-check archive (no {members.top}/summary.md)")
    return members.top


def _decompressed(archive: str):
    """``archive`` opened for reading, decompressed as its first bytes say (gzip, bzip2, xz, else none)."""
    with open(archive, "rb") as f:
        magic = f.read(6)
    return next((fn for m, fn in _COMPRESSIONS if magic.startswith(m)), open)(archive, "rb")


def _write(fn, archive, rel, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except OSError as e:
        raise InputError(f"--unpack {archive}: cannot write {'/'.join(rel)} ({e.strerror or e}); "
                         "nothing unpacked") from None


def _cell(value, what: str) -> str:
    """``value`` as text for one cell of a Markdown table row: ``|`` escaped. InputError for a control
    character or line break (it would end the row and start others)."""
    text = str(value)
    if _ODD.search(text):
        raise InputError(f"{what} holds a control character or line break ({text[:60]!r})")
    return text.replace("|", "\\|")


def _environment(folder: Path, rel: str) -> dict:
    """``folder/environment.json`` as a dict ({} when absent); InputError when it is not a JSON object whose
    index fields are text or numbers."""
    path = folder / "environment.json"
    if not path.exists():
        return {}
    try:
        env = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{rel}/environment.json is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(env, dict):
        raise InputError(f"{rel}/environment.json is not a JSON object")
    for key in ("device_name", "driver_version", "torch_version", "triton_version", "command"):
        if key in env and not (env[key] is None or isinstance(env[key], (str, int, float))):
            raise InputError(f"{rel}/environment.json: {key} is not text")
    return env


def index_line(folder: Path, rel: str) -> str:
    """The results/README.md table row of an unpacked gpu-check folder: machine from environment.json,
    the summary's verdict, the command that made it. Each value is one cell (``|`` escaped); InputError
    for a malformed environment.json or summary.md, or a value with a line break."""
    env = _environment(folder, rel)
    card = str(env.get("device_name") or "GPU")
    machine = ", ".join([card, *(f"{k.removesuffix('_version')} {env[k]}" for k in
                                 ("driver_version", "torch_version", "triton_version") if env.get(k))])
    try:
        first = ((folder / "summary.md").read_text(encoding="utf-8").splitlines() or [""])[0]
    except UnicodeDecodeError:
        raise InputError(f"{rel}/summary.md is not UTF-8 text") from None
    verdict = first.removeprefix(f"# GPU check: {env.get('device_name', '')}: ")
    report = f"; paper-preset [report]({rel}/report/report.md)" if (folder / "report" / "report.md").exists() else ""
    command = _cell(env.get("command") or "vimbench gpu-check", f"{rel}/environment.json: command")
    return (f"| [{rel}/]({rel}/) | {_cell(machine, f'{rel}/environment.json: the machine')} | "
            f"[summary]({rel}/summary.md): {_cell(verdict, f'{rel}/summary.md: its first line')}{report} | "
            f"`{command}` |")


def with_index_line(readme_text: str, line: str, readme: Path) -> str:
    """``readme_text`` with ``line`` as the first row of its first table (newest first), without the
    placeholder row for gpu/ (``| gpu/ |``). InputError when it has no table."""
    lines = readme_text.splitlines()
    sep = next((i for i, ln in enumerate(lines) if re.match(r"^\|(-+\|)+$", ln.replace(" ", ""))), None)
    if sep is None:
        raise InputError(f"{readme}: no results table to add the unpacked folder to")
    lines.insert(sep + 1, line)
    return "\n".join(ln for ln in lines if not ln.startswith("| gpu/ |")) + "\n"


def unpack(archive: str, results: Path = Path("results")) -> Path:
    """Extracts the gpu-check ``archive`` to ``results/gpu/<card>-<date>/`` and indexes it in
    ``results/README.md``. The archive streams into a new hidden folder under results/gpu/ (checks:
    ``_Members``), which is renamed to ``<card>-<date>`` only when complete and indexable; on any failure
    it is removed, and nothing else under results/ is touched. Raises ``InputError`` (one line) for a
    missing, foreign, malformed or hostile archive, a checkout without results/README.md or its table, or
    a folder that exists already."""
    readme = results / "README.md"
    if not readme.is_file():
        raise InputError(f"--unpack: no {readme} here; run it from the root of a vimbench checkout")
    with_index_line(readme.read_text(), "", readme)  # a README without a table fails before any work
    if not Path(archive).is_file():
        raise InputError(f"--unpack {archive}: cannot read it as a tar archive (no such file)")
    gpu = results / "gpu"
    made_gpu = not os.path.lexists(gpu)
    gpu.mkdir(exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=gpu))
    try:
        top = _extract(archive, partial, _Members(archive, gpu))
        try:
            line = index_line(partial, f"gpu/{top}")
        except InputError as e:
            raise InputError(f"--unpack {archive}: {e}; nothing unpacked") from None
        text = with_index_line(readme.read_text(), line, readme)
        dest = gpu / top
        if os.path.lexists(dest):
            raise InputError(f"--unpack: {dest} exists already; it is not overwritten")
        os.rename(partial, dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if made_gpu:
            with contextlib.suppress(OSError):
                gpu.rmdir()
        raise
    try:
        new = readme.with_name(f".{readme.name}.partial")
        new.write_text(text)
        os.replace(new, readme)
    except OSError as e:
        shutil.rmtree(dest)
        raise InputError(f"--unpack: cannot update {readme} ({e.strerror or e}); nothing unpacked") from None
    return dest
