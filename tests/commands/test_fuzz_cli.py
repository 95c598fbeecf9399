"""Every command survives every input: a property-based fuzz of the whole command line.

The commands and their options are enumerated from the Click group (``vimbench.commands.cli``), so a
command or option added later is fuzzed without touching this file. Each option gets values drawn for
its name or, failing that, its Click type: valid values, boundary values and garbage (resolution specs,
model/backend/card/device names, negative, zero and huge numbers, missing, unwritable and directory
paths, CSVs of another kind, empty strings, unicode). Each call runs in-process through ``main`` (the
console entry point) inside Click's ``CliRunner`` isolation, in a fresh folder, with the measuring
boundary stubbed (``STUBS``: workers, FLOP counts, memory prediction, kernel compiles, the benchmark
suite; also figures and reports) so nothing runs a model. Every call must:

  * exit 0 or 2, never with an unhandled exception;
  * on exit 2 print one line naming the option (or argument) it refuses;
  * leave every file that existed byte-for-byte unchanged when it fails, and only append when it succeeds;
  * write only rows that have every column of their schema (``rows/schema.py``), each with status ok
    (the stubs succeed, so an error row is a configuration the CLI should have refused) and every
    required value;
  * hand the measuring boundary only sane configurations (positive sizes, finite times).

``REGRESSIONS`` keeps every failure the fuzz found as an explicit case.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vimbench
from vimbench.gate import (deterministic as gate_exact, store as gate_store, suite as gate_suite,
                           thresholds as gate_thresholds)
from vimbench.commands import cli, main
from vimbench.count import flops as count_flops_module, memory as count_memory_module, ops as count_ops
from vimbench.count.kernel_compile import CompileRow
from vimbench.count.flops import FlopCount
from vimbench.count.memory import CARDS, MemoryPrediction
from vimbench.measure import isolation, launchers
from vimbench.errors import InputError
from vimbench.models.registry import check_options, create_model, impl_of
from vimbench.present import figures, report
from vimbench.rows import writer
from vimbench.rows.schema import SCHEMAS
from helpers_csv import kernel_frame, scaling_frame

COMMANDS = sorted(cli.commands)
EXAMPLES = {"models": 4}
"""Examples per command where the default (``DEFAULT_EXAMPLES``) would take too long: ``models`` builds
every registered model on the meta device (~3 s a call on a loaded 2-core machine)."""
DEFAULT_EXAMPLES = 40

# ----------------------------------------------------------------------------------------------------
# The measuring boundary, stubbed: what reaches it is recorded and checked
# ----------------------------------------------------------------------------------------------------

SEEN: list[dict] = []
"""Every configuration handed to the measuring boundary during one call."""


@functools.lru_cache(maxsize=None)
def _build(model: str, options: tuple) -> None:
    """What the real boundary requires of a configuration: the model builds with these options (on the
    meta device, at a small resolution; the registry's models only: they build in milliseconds or are
    cached, a timm model is built for real)."""
    with torch.device("meta"):
        create_model(model, img_size=64, **dict(options))


def _fake_count_flops(cfg):
    _build(cfg.model, tuple(sorted(check_options(cfg.model, cfg.options).items())))
    SEEN.append(dict(model=cfg.model, res=cfg.res, batch=cfg.batch))
    tokens, batch = (cfg.res // 16) ** 2 + 1, cfg.batch
    return FlopCount(flops_total=10 * tokens * batch, flops_scan=4 * tokens * batch, flops_attention=0,
                     flops_linear=6 * tokens * batch, flops_other=0, params=1000, tokens=tokens)


def _fake_predict_memory(cfg, capability=None, amp="none"):
    options = check_options(cfg.model, cfg.options)
    _build(cfg.model, tuple(sorted(options.items())))
    SEEN.append(dict(model=cfg.model, res=cfg.res, batch=cfg.batch))
    impl, batch = impl_of(options), cfg.batch
    return MemoryPrediction(impl=impl, kernel=impl, tokens=(cfg.res // 16) ** 2 + 1, params=1000,
                            mem_pred_weights_gib=0.01, mem_pred_activations_gib=0.02 * batch,
                            mem_pred_peak_gib=0.01 + 0.02 * batch, mem_pred_reserved_gib=0.02 + 0.02 * batch)


def _fake_model_geometry(model, res, batch):
    SEEN.append(dict(model=model, res=res, batch=batch))
    vim = model.startswith("vim")
    return count_ops.Geometry(model, res, batch, (res // 16) ** 2 + 1, 192, 384 if vim else 0, 16 if vim else 0,
                              0 if vim else 3, 0 if vim else 64)


def _fake_run_isolated(fn, args=(), timeout=None):
    """The worker's result without a worker: made-up measurements for the measuring functions, the
    function itself (in-process) for anything else."""
    first = args[0] if args else None  # a configuration: its fields (and impl), as the measuring functions read them
    cfg = first if isinstance(first, dict) else {}
    if dataclasses.is_dataclass(first):
        cfg = {**dataclasses.asdict(first), "impl": first.impl}
    SEEN.append(cfg)
    if fn.__name__ in ("measure_model", "measure_op"):
        out = dict(status="ok", impl=cfg["impl"], kernel=cfg["impl"], time_ms=2.0, time_ms_p10=1.9, time_ms_p90=2.2,
                   repeats=cfg.get("repeats", 3), mem_peak_gib=0.1, threads=1, load_avg_1m=0.5)
        if fn.__name__ == "measure_model":
            _build(cfg["model"], tuple(sorted(check_options(cfg["model"], cfg["options"]).items())))
            out["throughput_img_s"] = cfg["batch"] / 2e-3
        return out
    if fn.__name__ == "measure_ceilings":
        return dict(status="ok", ceiling_gbs=100.0, ceiling_gflops_s=1000.0)
    if fn.__name__ == "check_named_backend":
        grads = dict(forward_only="", grad_checked=1, grad_ok=True, grad_failure="", grad_worst=0.0)
        return dict(status="ok", checked=1, check_ok=True, check_failure="", check_worst=0.0,
                    **(grads if args[2:] and args[2] else {}))
    try:
        return {"status": "ok", **(fn(*args) or {})}
    except Exception as e:  # as the worker reports it
        return {"status": "error", "error": isolation.one_line(e)}


def _fake_op_cost(op, g, dtype, mode="infer"):
    return {"flops_total": 10 * g.L * g.batch, "bytes": 100 * g.L * g.batch}


def _fake_plot_results(kind, df, out_dir):
    """One empty figure file, in ``out_dir`` made as ``figures.save`` makes it."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"{kind}.png"
    path.write_bytes(b"")
    return [path]


def _fake_write_report(df, source, out_dir, memory=None, left_out=()):
    """report.md naming the sources, in ``out_dir`` made as ``write_report`` makes it."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "report.md"
    path.write_text(source)
    return path


def _fake_compile_report(archs):
    return [CompileRow("scan", "fake", arch, 32, 0, 1024, "ok") for arch in archs]


def _fake_run_suite(device, select, log=print, tests=None, **selection):
    """Every benchmark of this machine's baseline (``-k`` as a substring) at exactly its baseline ratio."""
    path = gate_store.timing_baseline_path(device)
    benchmarks = (gate_store.load_baseline(path, "timing")["benchmarks"] if path.exists()
                  else {"test_scan": {"ratio": 1}})
    ratios = {n: {"ratios": dict.fromkeys(gate_thresholds.REFERENCES, b["ratio"]), "seconds": 1e-3, "rounds": 5}
              for n, b in benchmarks.items() if not select or select in n}
    if not ratios:
        raise InputError(f"no benchmark matches -k {select!r}")
    return ratios, {}


def _fake_run_pair(base, device, select, order, log=print, tests=None, **selection):
    """``_fake_run_suite``'s ratios as both sides' two segments."""
    ratios, _ = _fake_run_suite(device, select, log, tests)
    return {"base": [ratios, ratios], "current": [ratios, ratios]}


def _fake_deterministic_snapshot():
    """The baseline's own numbers (kernels under its first Triton release, where it keeps them per release)."""
    base = gate_store.load_baseline(gate_store.deterministic_baseline_path(), "deterministic")
    triton = next(iter(base.get("kernels_by_triton", {})), "")
    return {"flops": base["flops"], "kernels": base.get("kernels") or base["kernels_by_triton"][triton],
            "triton": triton}


def _fake_submitit_run(self, run_one, todo, jobs_dir):
    """submitit jobs without submitit: each configuration's row computed in this process (where the other
    stubs apply), placed as a job's row is."""
    for i, cfg in enumerate(todo):
        yield cfg, {**launchers.placed(run_one(cfg), cfg, self.name, 1), "job_id": str(i)}


REAL_RUN_SUITE = gate_suite.run_suite
STUBS = {isolation.run_isolated: _fake_run_isolated, count_flops_module.count_flops: _fake_count_flops,
         count_memory_module.predict_memory: _fake_predict_memory, count_ops.model_geometry: _fake_model_geometry,
         count_ops.op_cost: _fake_op_cost,
         vimbench.count.kernel_compile.compile_report: _fake_compile_report, gate_suite.run_suite: _fake_run_suite,
         gate_suite.run_pair: _fake_run_pair,
         gate_exact.deterministic_snapshot: _fake_deterministic_snapshot, figures.plot_results: _fake_plot_results,
         report.write_report: _fake_write_report}
"""Real function -> fake. Every reference to the real function in a loaded vimbench module is replaced,
so a command module added later that imports one of them gets the fake too."""


@pytest.fixture
def stub_measuring(monkeypatch, tmp_path):
    for module in [m for name, m in sys.modules.items() if name.startswith("vimbench") and m is not None]:
        for attr, value in list(vars(module).items()):
            if callable(value) and value in STUBS:
                monkeypatch.setattr(module, attr, STUBS[value])
    monkeypatch.setattr(launchers.Submitit, "run", _fake_submitit_run)
    monkeypatch.setattr(gate_suite, "cotenant", contextlib.nullcontext)
    monkeypatch.setattr(writer.os, "fsync", lambda fd: None)  # durability is not under test; fsync is slow
    # baselines are written next to the benchmark suite by default: work on copies
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    for p in gate_store.BASELINE_DIR.glob("*.json"):
        (baselines / p.name).write_bytes(p.read_bytes())
    monkeypatch.setattr(gate_store, "BASELINE_DIR", baselines)


# ----------------------------------------------------------------------------------------------------
# A folder of files per call
# ----------------------------------------------------------------------------------------------------

def _schema_csv(kind: str) -> str:
    frames = {"scaling": scaling_frame(), "kernels": kernel_frame()}
    schema = SCHEMAS[kind]
    if kind in frames:
        df = frames[kind].reindex(columns=schema.columns)
        return df.head(6).to_csv(index=False)
    row = {c: "" for c in schema.columns}
    row.update(model="vim_tiny", family="vim", impl="cpp", res=224, tokens=197, batch=1, head=False, status="ok",
               dtype="fp32", mem_pred_peak_gib=0.1, mem_pred_reserved_gib=0.2, card="h100-80gb", fits=True,
               **{c: 1 for c in schema.columns if c.startswith("flops_")})
    return ",".join(schema.columns) + "\n" + ",".join(str(row[c]) for c in schema.columns) + "\n"


FILES = {f"{kind}.csv": _schema_csv(kind) for kind in SCHEMAS}
FILES.update({"other.csv": "a,b\n1,2\n", "empty.csv": "", "header_only.csv": ",".join(SCHEMAS["flops"].columns) + "\n",
              "garbage.csv": "\x00\xff\ufffd,\n\"unterminated\n", "blocked": "a file, not a folder\n",
              "baseline.json": "{\"kind\": \"other\"}\n"})
DIRS = ["adir"]


def _make_workspace(root: Path) -> dict[Path, bytes]:
    for name, text in FILES.items():
        (root / name).write_text(text, encoding="utf-8", errors="surrogateescape")
    for name in DIRS:
        (root / name).mkdir()
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# Values per option
# ----------------------------------------------------------------------------------------------------

garbage = st.one_of(st.sampled_from(["", " ", "-", "--", ",", "..", "nan", "None", "ü", "日本", "💥", "\t",
                                     "a b"]),
                    st.text(st.characters(blacklist_characters="\x00"), max_size=8))  # argv holds no NUL


def kinds(valid: list[str], wild: list[str]) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """(valid values, boundary values and garbage)."""
    return st.sampled_from(valid), st.one_of(st.sampled_from(wild), garbage)


def comma_lists(valid: list[str], invalid: list[str]) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """(comma lists of valid names, comma lists with invalid names and garbage)."""
    lists = st.lists(st.sampled_from(valid + invalid), min_size=1, max_size=3).map(",".join)
    return st.lists(st.sampled_from(valid), min_size=1, max_size=2).map(",".join), st.one_of(lists, garbage)


OUTPUTS = kinds(["new.csv", "new/deeper/x.csv", "résultats/ü.csv"],
                [*FILES, *DIRS, "blocked/x.csv", "adir/", "/proc/vimbench-nope/x.csv", ".", "x.txt"])
INPUTS = kinds(["scaling.csv", "kernels.csv", "memory.csv"],
               [*FILES, *DIRS, "missing.csv", "blocked/x.csv", "/proc/vimbench-nope/x.csv", "."])
BY_TYPE = {
    click.types.IntParamType: kinds(["1", "2", "4"], ["0", "-1", "-5", "16", str(2 ** 31), str(10 ** 30), "1.5",
                                                       "1e3", "x"]),
    click.types.FloatParamType: kinds(["0", "0.01"], ["-1", "nan", "inf", "-inf", "1e308", "1e-300", "x"]),
}
BY_NAME = {
    "res": kinds(["32", "224"], ["16", "15", "0", "-5", "65536", "65537", str(2 ** 31), str(10 ** 30), "x"]),
    "res_spec": kinds(["32", "32,48", "64..128:64"],
                      ["16", "15", "0", "-5", "96..32", "32..96:0", "32..", "32..10000000000000:1", "1" + "0" * 30,
                       "65536", "65537", "32,,48", "３２", " 32 ", "32.5"]),
    "models_spec": comma_lists(["vim_tiny", "deit_tiny", "timm:resnet18", "timm:vit_tiny_patch16_224"],
                               ["timm:nosuchmodel", "timm:", "timm:resnet", "vim_huge", "VIM_TINY", " ", "ü"]),
    "attn_spec": comma_lists(["eager", "sdpa", "math"], ["flash", "efficient", "cudnn", "fast", "EAGER", ""]),
    "scan_spec": comma_lists(["auto", "ref", "cpu"], ["cpp", "triton", "mamba_ssm", "fast", "AUTO", ""]),
    "mode_spec": comma_lists(["infer", "train"], ["INFER", "fly", " ", ""]),
    "mem_limit_gib": kinds(["1", "64"], ["0", "-1", "nan", "inf", "-inf", "x"]),
    "device_spec": kinds(["auto", "cpu"], ["cuda", "cuda:0", "cuda:7", "cpu:0", "meta", "tpu", "mps", "cuda:-1",
                                           "cuda:" + "9" * 25, "gpu"]),
    "card": kinds(list(CARDS), ["h100", "H100-80GB"]),
    "partition": kinds(["gpu"], ["", " "]),
    "sbatch": kinds(["account=abc", "qos=high"], ["qos", "=abc", ""]),
    "select": kinds(["scan", "attention"], ["nosuchbench", "not scan", "(", "and", "scan or attention"]),
}
"""(valid, wild) values for an option by its parameter name (the Click ``name``); others by type
(``values_for``)."""


def values_for(param: click.Parameter) -> tuple[st.SearchStrategy[str], st.SearchStrategy[str]]:
    """(valid, wild) values for ``param``: by name, else by Click type; paths, and strings of unknown
    meaning, get paths (arguments: input CSVs; options: outputs)."""
    if param.name in BY_NAME:
        return BY_NAME[param.name]
    if isinstance(param.type, click.Choice):
        choices = [str(c) for c in param.type.choices]
        return kinds(choices, [c.upper() for c in choices] + ["nope"])
    if type(param.type) in BY_TYPE:
        return BY_TYPE[type(param.type)]
    return INPUTS if isinstance(param, click.Argument) else OUTPUTS


@st.composite
def command_lines(draw, name: str) -> list[str]:
    """argv for command ``name``: a random subset of its options (``--opt=value``, or ``-kvalue``) and its
    arguments (after ``--``, so that a value starting with a dash stays a value). Half the lines have
    only valid values; in the others each value is wild (boundary or garbage) with probability 1/3. So
    successful and refused calls are both common, whatever the number of options."""
    command = cli.commands[name]
    argv, args = [name], []
    clean = draw(st.booleans())

    def value(param):
        valid, wild = values_for(param)
        return draw(valid if clean else st.one_of(valid, valid, wild))

    for param in command.params:
        if isinstance(param, click.Argument):
            n = draw(st.integers(1 if param.required else 0, 1 if param.nargs == 1 else 3))
            args += [value(param) for _ in range(n)]
        elif draw(st.booleans()):
            opt = draw(st.sampled_from(param.opts + (param.secondary_opts if param.is_flag else [])))
            if param.is_flag:
                argv.append(opt)
            else:
                argv.append(f"{opt}={value(param)}" if opt.startswith("--") else f"{opt}{value(param)}")
    return argv + (["--", *args] if args else [])


def names_in(argv: list[str]) -> list[str]:
    """What an error about ``argv`` may call the input it refuses: the command (for what no option
    controls), the option strings given, the command's argument names, and the arguments given (quoted
    when blank)."""
    command = cli.commands[argv[0]]
    split = argv.index("--") if "--" in argv else len(argv)
    options = [a.split("=", 1)[0] if a.startswith("--") else a[:2] for a in argv[1:split] if a.startswith("-")]
    arguments = [n for p in command.params if isinstance(p, click.Argument) for n in (p.human_readable_name,
                                                                                       p.name.upper())]
    values = [" ".join(v.split()) or repr(v) for v in argv[split + 1:]]  # as the one-line error prints them
    return [argv[0], *options, *arguments, *values]


# ----------------------------------------------------------------------------------------------------
# The invariants
# ----------------------------------------------------------------------------------------------------

def _sane(cfg: dict) -> list[str]:
    """What is wrong with a configuration handed to the measuring boundary."""
    bad = []
    # batch_requested 0: --max-batch (the batch is searched for)
    for key, low in (("res", 16), ("batch", 1), ("batch_requested", 0), ("repeats", 1), ("warmup", 0),
                     ("threads", 0), ("min_time", 0)):
        value = cfg.get(key, cfg.get("timing", {}).get(key))
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
            bad.append(f"{key}={value!r}")
    return bad


def _check_rows(path: Path, old: bytes | None) -> None:
    """Asserts that the rows ``path`` gained (all, if it is new; ``old``: its bytes before) have every
    column, and, in a schema's CSV, status ok and every required value."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    schema = next((s for s in SCHEMAS.values() if s.columns == header), None)
    new = body[len(list(csv.reader(old.decode(errors="replace").splitlines()))) - 1:] if old else body
    for row in new:
        assert len(row) == len(header), f"{path.name}: a row with {len(row)} of {len(header)} columns"
        if schema is not None:
            values = dict(zip(header, row))
            # the boundary is stubbed to succeed: an error row is a configuration the CLI should have refused
            assert values["status"] == "ok", f"{path.name}: a row with status {values['status']}: {values['error']}"
            cnn = values.get("family") == "timm"  # a timm CNN has no token sequence: tokens empty
            empty = [c for c in schema.required if not values[c] and not (c == "tokens" and cnn)]
            assert not empty, f"{path.name}: an ok row without {empty}"


def run_cli(argv: list[str]) -> tuple[int, str, str, BaseException | None]:
    """(exit code, stdout, stderr, unhandled exception) of ``main(argv)`` under CliRunner's isolation."""
    SEEN.clear()
    error = None
    with CliRunner().isolation() as streams:
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except Exception as e:  # what the suite looks for
            code, error = None, e
    return code, streams[0].getvalue().decode(errors="replace"), streams[1].getvalue().decode(errors="replace"), error


def check_call(argv: list[str]) -> tuple[int, str]:
    """Runs ``argv`` in a fresh folder of files and asserts the invariants (module docstring); returns
    (exit code, stderr)."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        before = _make_workspace(root)
        os.chdir(root)
        try:
            code, out, err, error = run_cli(argv)
        finally:
            os.chdir(cwd)
        assert error is None, f"{argv}: unhandled {type(error).__name__}: {error}"
        assert code in (0, 2), f"{argv}: exit {code}\n{err[-2000:]}"
        for path, data in before.items():
            now = path.read_bytes()
            assert now == data if code else now.startswith(data), f"{argv}: {path.name} changed"
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1, f"{argv}: {len(lines)} lines of error:\n{err[-2000:]}"
            message, names = lines[0].split(" error: ", 1)[-1], names_in(argv)
            assert any(n in message for n in names), f"{argv}: the error names none of {names}: {message}"
        else:
            bad = [b for cfg in SEEN for b in _sane(cfg)]
            assert not bad, f"{argv}: the measuring boundary got {bad}"
            for path in root.rglob("*.csv"):  # gate --update may write its JSON baseline to any name
                if path.is_file() and path.read_bytes() != before.get(path) and not path.read_bytes().startswith(b"{"):
                    _check_rows(path, before.get(path))
    return code, err


FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.data_too_large])


@pytest.mark.parametrize("name", COMMANDS)
def test_every_input(name, stub_measuring):
    @settings(max_examples=EXAMPLES.get(name, DEFAULT_EXAMPLES), **FUZZ_SETTINGS)
    @given(command_lines(name))
    def one(argv):
        check_call(argv)

    one()


REGRESSIONS = [
    # errors that did not say which option they were about
    (["flops", "--res=abc"], "--res: cannot read resolution 'abc'"),
    (["kernels", "--res=15"], "--res: resolution 15 is smaller than the patch size 16"),
    (["flops", "--models="], "--models: no models given"),
    (["memory", "--models=ü"], "--models: unknown model 'ü'"),
    (["kernels", "--models=timm:nosuchmodel"], "--models: unknown timm model 'nosuchmodel'"),
    (["flops", "--attn=sdpa,EAGER"], "--attn: unknown attention backend 'EAGER'"),
    (["memory", "--scan=cpu,AUTO"], "--scan: unknown scan backend 'AUTO'"),
    (["flops", "--attn=,"], "deit_tiny needs at least one attention backend (--attn)"),
    (["scaling", "--scan= "], "vim_tiny needs at least one scan backend (--scan)"),
    (["gate", "--baseline=memory.csv"], "--baseline memory.csv: cannot read it"),
    (["plot", "--", ""], "'': no such file"),
    (["report", "--", "\t"], "'\\t': no such file"),
    (["plot", "--", "blocked/x.csv"], "blocked/x.csv: no such file"),  # blamed --out-dir, not given
    # tracebacks
    (["gate", "--deterministic", "--update", "--baseline="], "--baseline '.' is a directory"),
    (["report", "--", "", ""], "'': no such file"),
    (["models", "--res=-5"], "--res: resolution -5 is smaller than the patch size 16"),
    (["models", "--res=2147483648"], "--res: resolution 2147483648 is larger than 65536"),
    (["gate", "--baseline=garbage.csv"], "--baseline garbage.csv: cannot read it"),
    # an existing file overwritten
    (["gate", "--update", "--baseline=scaling.csv"], "--baseline scaling.csv: cannot read it"),
    (["kernels", "--out=scaling.csv", "--resume"], "cannot --resume scaling.csv: its columns differ"),
    (["kernels", "--out=kernels.csv", "--resume", "--res=224"], None),  # an empty kernel column: traceback
    (["gate", "--deterministic", "--update", "--baseline=baseline.json"], "is not a deterministic baseline"),
    # found by reading the strategies: a sweep that never ends, or never starts
    (["scaling", "--res=32..10000000000000:1"], "names more than 1000 resolutions"),
    (["scaling", "--min-time=inf"], "--min-time must be a finite number, got inf"),
    (["kernels", "--min-time=nan"], "--min-time must be a finite number, got nan"),
    (["plot", "--out-dir=/proc/vimbench-nope/x", "--", "scaling.csv"],
     "--out-dir /proc/vimbench-nope/x: cannot create"),
    # timm: models that take no attn= got it pushed onto them (error rows); unknown names had no hint
    (["flops", "--models=timm:resnet18"], None),
    (["memory", "--models=timm:resnet18,deit_tiny", "--attn=eager"], None),
    (["scaling", "--models=timm:resnet18", "--device=cpu"], None),
    (["flops", "--models=timm:resnt18"], "--models: unknown timm model 'resnt18'; close matches: timm:resnet18"),
]
"""Every failure the fuzz found, as an explicit case: argv and what its one-line error says (None: exit 0)."""


@pytest.mark.parametrize("argv,message", REGRESSIONS, ids=[" ".join(a)[:60] for a, _ in REGRESSIONS])
def test_regression(argv, message, stub_measuring):
    code, err = check_call(argv)
    assert (code, message is None or message in err) == (0 if message is None else 2, True), err


@pytest.mark.parametrize("k, exit, output, message", [
    ("nosuchbench", 5, "no tests ran", "no benchmark matches -k 'nosuchbench'"),
    ("and", 4, "ERROR: Wrong expression passed to '-k': (and): at column 2: expected not OR left parenthesis",
     "-k 'and' is not a pytest -k expression: Wrong expression passed to '-k'")])
def test_gate_k_that_selects_nothing_or_is_not_an_expression_says_so(k, exit, output, message, stub_measuring,
                                                                     monkeypatch):
    """The real ``run_suite``, with pytest answering as it does for such a -k: "no tests ran" (exit 5), or a
    usage error (exit 4)."""
    monkeypatch.setattr(gate_suite, "run_suite", REAL_RUN_SUITE)
    monkeypatch.setattr(gate_suite.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, exit, "",
                                                                                                     output))
    baseline = next(gate_store.BASELINE_DIR.glob("cpu-*.json"))  # any CPU's: this one's may not be recorded
    code, err = check_call(["gate", "--device=cpu", f"-k{k}", f"--baseline={baseline}"])
    assert code == 2 and message in err


@pytest.mark.parametrize("name", ["scaling", "kernels"])
def test_submitit_launcher_under_the_stubs(name, stub_measuring):
    """The path random lines rarely take whole (--launcher local with no Slurm-only option): the jobs, the
    kernels preamble's among them, run in this process under the stubs; the invariants hold."""
    code, err = check_call([name, "--launcher=local", "--workers=2", "--device=cpu", "--res=32"])
    assert code == 0, err
