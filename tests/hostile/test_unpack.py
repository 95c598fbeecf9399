"""`vimbench gpu-check --unpack` on hostile archives: crafted cases and generated member lists.

The rule each case asserts: the archive is refused with one line on stderr and exit 2, no traceback, and
the whole folder the command ran in (results/, an earlier unpacked folder, files beside results/) is
byte-for-byte what it was: nothing written outside the new folder, nothing left behind, no result already
there lost. An archive that is accepted lands only in ``results/gpu/<card>-<date>/`` as plain files and
folders, and adds exactly one row to results/README.md's table.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import signal
import stat
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vimbench.gpucheck import archive as gpucheck_archive
from vimbench.commands import main

TOP = "nvidia-h200-2026-12-01"
EARLIER = "nvidia-h100-80gb-hbm3-2026-11-25"
README = ("# Committed results\n\n| folder | machine | what | command |\n|---|---|---|---|\n"
          f"| [gpu/{EARLIER}/](gpu/{EARLIER}/) | NVIDIA H100 | [summary](gpu/{EARLIER}/summary.md): ok | `x` |\n"
          "\nText after.\n")
ENV = {"device_name": "NVIDIA H200", "driver_version": "560.35", "torch_version": "2.6.0",
       "command": "vimbench gpu-check --budget 420"}
SUMMARY = b"# GPU check: NVIDIA H200: kernels correct\n"


def member(name, data=b"", kind=tarfile.REGTYPE, linkname="", size=None):
    """One archive member: (TarInfo, data). ``size`` overrides the declared size (a lie about the data)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if size is None else size
    return info, data


def good(env=ENV, summary=SUMMARY):
    return [member(TOP, kind=tarfile.DIRTYPE), member(f"{TOP}/summary.md", summary),
            member(f"{TOP}/environment.json", env if isinstance(env, bytes) else json.dumps(env).encode())]


def archive_bytes(members, compress=True) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if info.size != len(data):  # a header that lies about its data: write the header alone
                tar.fileobj.write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data)
                tar.offset += tarfile.BLOCKSIZE + len(data)
                continue
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return gzip.compress(raw.getvalue(), mtime=0) if compress else raw.getvalue()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout with results/README.md, an earlier unpacked folder and a file beside results/."""
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "results" / "gpu" / EARLIER
    earlier.mkdir(parents=True)
    (earlier / "summary.md").write_text("# GPU check: NVIDIA H100: kernels correct\n")
    (tmp_path / "results" / "README.md").write_text(README)
    (tmp_path / "beside.txt").write_text("not results")
    (tmp_path / "incoming").mkdir()
    return tmp_path


def incoming(root: Path, data: bytes, name="gpu.tar.gz") -> Path:
    """An archive written where ``snapshot`` does not look."""
    path = root / "incoming" / name
    path.write_bytes(data)
    return path


def snapshot(root: Path) -> dict:
    """Every path under ``root`` but incoming/ (links not followed): its bytes, link target or type."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames.remove("incoming")
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = p.lstat().st_mode
            out[str(p.relative_to(root))] = (p.read_bytes() if stat.S_ISREG(mode) else
                                             os.readlink(p) if stat.S_ISLNK(mode) else stat.S_IFMT(mode))
    return out


class Hung(Exception):
    pass


def _hung(signum, frame):
    raise Hung()


def run_unpack(path, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``--unpack path``; fails the case on an exception or after 60 s (a hang)."""
    old = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(60)
    try:
        code = main(["gpu-check", "--unpack", str(path)])
    except BaseException as e:  # noqa: BLE001 (the rule: never a traceback; report it as a failed case)
        pytest.fail(f"--unpack raised {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, capsys.readouterr().err


def assert_refused(root, before, path, capsys, message):
    code, err = run_unpack(path, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("vimbench gpu-check: error:"), err
    assert message in err, err
    assert snapshot(root) == before


CRAFTED = {
    "dotdot-into-earlier": (good() + [member(f"{TOP}/../{EARLIER}/summary.md", b"overwritten")], "outside"),
    "dotdot-to-readme": (good() + [member(f"{TOP}/../../README.md", b"| injected |")], "outside"),
    "absolute": (good() + [member("/tmp/vimbench-hostile-absolute", b"x")], "outside"),
    "dot-part": ([member(f"{TOP}/./summary.md", SUMMARY)], "outside"),
    "empty-part": (good() + [member(f"{TOP}//x", b"x")], "outside"),
    "newline-in-name": (good() + [member(f"{TOP}/a\nb", b"x")], "odd name"),
    "symlink-member": (good() + [member(f"{TOP}/up", kind=tarfile.SYMTYPE, linkname="../..")], "symbolic link"),
    "symlinked-top": ([member(TOP, kind=tarfile.SYMTYPE, linkname=EARLIER), member(f"{TOP}/summary.md", b"x")],
                      "symbolic link"),
    "hardlink": (good() + [member(f"{TOP}/hl", kind=tarfile.LNKTYPE, linkname="results/README.md")],
                 "hard link"),
    "char-device": (good() + [member(f"{TOP}/null", kind=tarfile.CHRTYPE)], "character device"),
    "block-device": (good() + [member(f"{TOP}/sda", kind=tarfile.BLKTYPE)], "block device"),
    "fifo": (good() + [member(f"{TOP}/pipe", kind=tarfile.FIFOTYPE)], "FIFO"),
    "two-tops": (good() + [member(f"{EARLIER}/summary.md", b"x")], "one top folder"),
    "foreign-top": ([member("Evil Name/summary.md", SUMMARY)], "not a gpu-check archive"),
    "top-is-a-file": ([member(TOP, b"x")], "is a file"),
    "no-summary": (good()[2:], "no " + TOP + "/summary.md"),
    "summary-is-a-folder": ([member(f"{TOP}/summary.md", kind=tarfile.DIRTYPE)], "summary.md"),
    "duplicate": (good() + [member(f"{TOP}/summary.md", b"again")], "appears twice"),
    "file-as-folder": (good() + [member(f"{TOP}/summary.md/x", b"x")], "appears twice"),
    "empty-archive": ([], "empty"),
    "env-not-json": (good(env=b"{not json"), "not valid JSON"),
    "env-not-object": (good(env=b"[1, 2]"), "not a JSON object"),
    "env-not-utf8": (good(env=b"\xff\xfe{}"), "not valid JSON"),
    "env-field-not-text": (good(env={**ENV, "device_name": {"a": 1}}), "device_name is not text"),
    "newline-in-device-name": (good(env={**ENV, "device_name": "H200 |\n| [x](y) | z | w | `v` |"}),
                               "line break"),
    "newline-in-command": (good(env={**ENV, "command": "x`\n| row |"}), "line break"),
    "cr-in-driver": (good(env={**ENV, "driver_version": "560\r| row |"}), "line break"),
    "summary-not-utf8": (good(summary=b"\xff\xfe# GPU"), "not UTF-8"),
    "escape-in-summary": (good(summary=b"# GPU check: NVIDIA H200: ok\x1b[2J| row |\n"), "control character"),
    "declared-size-beyond-data": (good() + [member(f"{TOP}/big.csv", b"x" * 10, size=10_000)],
                                  "cannot read it as a tar archive"),
}
"""name -> (members, a phrase the one-line refusal must contain)."""


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_archive_refused_and_nothing_touched(name, checkout, capsys):
    members, message = CRAFTED[name]
    before = snapshot(checkout)
    assert_refused(checkout, before, incoming(checkout, archive_bytes(members)), capsys, message)
    assert not Path("/tmp/vimbench-hostile-absolute").exists()


def _corrupt(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "flipped":
        mid = len(data) // 2
        return data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 16]) + data[mid + 16:]
    return b"\x1f\x8b" + b"not gzip at all" * 4  # "not-gzip": a gzip magic, then garbage


@pytest.mark.parametrize("how", ["truncated", "flipped", "not-gzip"])
def test_broken_compression_refused(how, checkout, capsys):
    big = good() + [member(f"{TOP}/kernels.csv", bytes(range(256)) * 400)]  # incompressible enough to span blocks
    before = snapshot(checkout)
    path = incoming(checkout, _corrupt(archive_bytes(big), how))
    assert_refused(checkout, before, path, capsys, "cannot read it as a tar archive")


def test_limits_on_members_and_bytes(checkout, capsys, monkeypatch):
    monkeypatch.setattr(gpucheck_archive, "MAX_MEMBERS", 5)
    monkeypatch.setattr(gpucheck_archive, "MAX_BYTES", 1000)
    before = snapshot(checkout)
    many = incoming(checkout, archive_bytes(good() + [member(f"{TOP}/f{i}", b"x") for i in range(3)]), "many.tgz")
    large = incoming(checkout, archive_bytes(good() + [member(f"{TOP}/big", b"y" * 1001)]), "large.tgz")
    assert_refused(checkout, before, many, capsys, "more than 5 members")
    assert_refused(checkout, before, large, capsys, "more than 1,000 bytes")


@pytest.mark.parametrize("where", ["existing-folder", "dangling-symlink", "readme-without-table", "archive-is-fifo",
                                   "archive-is-folder"])
def test_checkout_states_refused(where, checkout, capsys):
    path = incoming(checkout, archive_bytes(good()))
    message = {"existing-folder": "exists already", "dangling-symlink": "exists already",
               "readme-without-table": "no results table", "archive-is-fifo": "no such file",
               "archive-is-folder": "no such file"}[where]
    if where == "existing-folder":
        (checkout / "results" / "gpu" / TOP).mkdir()
        (checkout / "results" / "gpu" / TOP / "mine.csv").write_text("kept")
    elif where == "dangling-symlink":
        (checkout / "results" / "gpu" / TOP).symlink_to(checkout / "elsewhere")
    elif where == "readme-without-table":
        (checkout / "results" / "README.md").write_text("no table here\n")
    elif where in ("archive-is-fifo", "archive-is-folder"):
        path.unlink()
        os.mkfifo(path) if where == "archive-is-fifo" else path.mkdir()
    assert_refused(checkout, snapshot(checkout), path, capsys, message)


def test_pipe_in_values_escaped_one_row_added(checkout, capsys):
    """A device name, versions and command with `|` (and backticks) stay in their cells: one row added, as
    many unescaped cell separators as the header has."""
    env = {**ENV, "device_name": "H200 | fake | cells", "torch_version": "2.6|x", "command": "a | b"}
    path = incoming(checkout, archive_bytes(good(env=env, summary=b"# GPU check: H200 | fake | cells: ok | yes\n")))
    code, err = run_unpack(path, capsys)
    assert code == 0, err
    readme = (checkout / "results" / "README.md").read_text().splitlines()
    assert len(readme) == len(README.splitlines()) + 1
    row = readme[4]
    assert row.replace("\\|", "").count("|") == readme[2].count("|") == 5
    assert "H200 \\| fake \\| cells" in row and "`a \\| b`" in row and "ok \\| yes" in row


def test_no_extractall_so_any_python_from_3_10_works(checkout, capsys, monkeypatch):
    """Python 3.10.0-3.10.11 and 3.11.0-3.11.3 have no ``extractall(filter=...)``: unpack uses neither it
    nor ``extract``, and a good archive lands whole, as plain files."""
    def missing(*args, **kwargs):
        raise TypeError("extractall() got an unexpected keyword argument 'filter'")
    monkeypatch.setattr(tarfile.TarFile, "extractall", missing)
    monkeypatch.setattr(tarfile.TarFile, "extract", missing)
    path = incoming(checkout, archive_bytes(good() + [member(f"{TOP}/report", kind=tarfile.DIRTYPE),
                                                      member(f"{TOP}/report/report.md", b"# report\n")]))
    code, err = run_unpack(path, capsys)
    assert code == 0, err
    dest = checkout / "results" / "gpu" / TOP
    assert (dest / "report" / "report.md").read_bytes() == b"# report\n"
    assert json.loads((dest / "environment.json").read_text()) == ENV
    assert sorted(p.name for p in (checkout / "results" / "gpu").iterdir()) == sorted([EARLIER, TOP])


NAMES = st.sampled_from([TOP, f"{TOP}/summary.md", f"{TOP}/environment.json", f"{TOP}/a", f"{TOP}/a/b",
                         f"{TOP}/..", f"{TOP}/../{EARLIER}/summary.md", f"{TOP}/../../README.md", "/abs",
                         f"{EARLIER}/summary.md", f"{TOP}/.", f"{TOP}/a/../../x", "x", ""])
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
                         tarfile.CHRTYPE])
MEMBERS = st.lists(st.tuples(NAMES, KINDS, st.sampled_from([b"", SUMMARY, b"{}", b"[", b"\xff"]),
                             st.sampled_from(["", "..", "/", f"../{EARLIER}", "results/README.md"])),
                   min_size=1, max_size=6)


@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(MEMBERS, st.sampled_from(["whole", "truncated"]))
def test_generated_archives_land_only_in_their_folder(checkout, capsys, members, how):
    """Any list of members (escapes, links, devices, odd names, duplicates, bad JSON), whole or truncated:
    either one line and exit 2 with everything as it was, or exit 0 with the new folder holding only plain
    files and folders and one row more in results/README.md, everything else as it was."""
    before = snapshot(checkout)
    data = archive_bytes([member(n, d if k == tarfile.REGTYPE else b"", k, link) for n, k, d, link in members])
    code, err = run_unpack(incoming(checkout, data[: len(data) // 2] if how == "truncated" else data), capsys)
    after = snapshot(checkout)
    dest = Path("results/gpu") / TOP
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("vimbench gpu-check: error:"), err
        assert after == before
        return
    assert code == 0, err
    new = {k: v for k, v in after.items() if k not in before or k == "results/README.md"}
    assert all(k.startswith(f"{dest}") or k == "results/README.md" for k in new), sorted(new)
    assert all(isinstance(v, bytes) or v == stat.S_IFDIR for v in new.values())
    assert {k: v for k, v in after.items() if k not in new} == {k: v for k, v in before.items()
                                                              if k != "results/README.md"}
    assert len(after["results/README.md"].splitlines()) == len(before["results/README.md"].splitlines()) + 1
    for p in sorted((checkout / dest).rglob("*"), reverse=True):  # undo, for the next example
        p.unlink() if p.is_file() else p.rmdir()
    (checkout / dest).rmdir()
    (checkout / "results" / "README.md").write_bytes(before["results/README.md"])
