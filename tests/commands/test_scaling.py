"""`vimbench scaling`: worker isolation, the CSV schema, resume, presets and bad input."""
import signal
import time

import pandas as pd
import pytest

from helpers import fresh_plugins, needs_no_gpu  # noqa: F401
from vimbench.commands import main
from vimbench.kernels.selective_scan import resolve_scan_backend
from vimbench.rows.scaling import decay_batch
from vimbench.rows.schema import SCALING, Schema
from vimbench.rows.writer import CsvLog
from vimbench.config import FlopsConfig, MemoryConfig
from vimbench.count.flops import count_flops
from vimbench.measure.isolation import run_isolated
from vimbench.count.memory import predict_memory
from vimbench.rows.sweep import run_sweep

AUTO = resolve_scan_backend("auto", "cpu")  # cpp where it builds, else the chunked cpu scan
FAST = ["--repeats", "1", "--warmup", "0", "--min-time", "0", "--device", "cpu"]


def test_isolated_worker_reports_raise_kill_and_timeout():
    assert run_isolated(dict, ({"x": 1},)) == {"status": "ok", "x": 1}
    raised = run_isolated(int, ("abc",))
    assert raised["status"] == "error" and raised["error"].startswith("ValueError: invalid literal")
    killed = run_isolated(signal.raise_signal, (signal.SIGSEGV,))
    assert killed == {"status": "error", "error": "worker killed by SIGSEGV"}
    assert run_isolated(bytearray, (1 << 62,))["status"] == "oom"  # MemoryError
    t0 = time.time()
    hung = run_isolated(time.sleep, (30,), timeout=1)
    assert hung["status"] == "error" and "timed out" in hung["error"] and time.time() - t0 < 15


def test_sweep_survives_failing_configurations(tmp_path):
    schema = Schema("test", ["name", "status", "error", "x"], key=["name"], required=(), marker=(), setting=())
    log = CsvLog(tmp_path / "r.csv", schema)
    jobs = {"ok": (dict, ({"x": 7},)), "raises": (int, ("abc",)), "killed": (signal.raise_signal, (signal.SIGKILL,)),
            "after": (dict, ({"x": 8},))}
    run_sweep([{"name": n} for n in jobs], log,
              lambda c: {"name": c["name"], **run_isolated(*jobs[c["name"]])}, lambda c: c["name"])
    df = pd.read_csv(tmp_path / "r.csv")
    assert list(df.name) == ["ok", "raises", "killed", "after"]
    assert list(df.status) == ["ok", "error", "oom", "ok"] and list(df.x.fillna(0)) == [7, 0, 0, 8]
    assert "SIGKILL" in df.error[2]


def test_decay_batch_sequence():
    seq, b = [], 64
    while b:
        seq.append(b)
        b = decay_batch(b)
    assert seq == [64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1]


@pytest.fixture(scope="module")
def sweep_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "s.csv"
    assert main(["scaling", "--models", "vim_tiny,deit_tiny", "--attn", "eager", "--res", "32,48",
                 "--out", str(out), *FAST]) == 0
    return out


def test_csv_schema_and_values(sweep_csv):
    df = pd.read_csv(sweep_csv)
    assert list(df.columns) == SCALING.columns
    assert len(df) == 4 and (df.status == "ok").all()
    assert set(zip(df.model, df.impl)) == {("vim_tiny", AUTO), ("deit_tiny", "eager")}
    assert (abs(df.throughput_img_s - df.batch / (df.time_ms / 1e3)) < 1e-6 * df.throughput_img_s).all()
    assert (df.time_ms_p10 <= df.time_ms).all() and (df.time_ms <= df.time_ms_p90).all()
    assert (df.device == "cpu").all() and (df.dtype == "fp32").all() and (df.batch == 1).all()
    row = df[(df.model == "deit_tiny") & (df.res == 48)].iloc[0]
    flops = count_flops(FlopsConfig("deit_tiny", res=48))
    assert row.tokens == 10 and row.flops_total == flops.flops_total and row.params == flops.params
    assert row.torch_version and row.timm_version and row.command.startswith("vimbench scaling --models")
    assert df.mem_peak_gib.notna().all() and df.mem_nvml_gib.isna().all()
    # every row carries the predicted GPU peak of the same configuration
    predicted = predict_memory(MemoryConfig("deit_tiny", {"attn": "eager"}, 48))
    assert row.mem_pred_peak_gib == pytest.approx(predicted.mem_pred_peak_gib)
    gpu_scan = df.impl != "cpp"  # the GPU-memory prediction needs a backend that runs on a GPU
    assert df.mem_pred_peak_gib[gpu_scan].notna().all()
    # a CPU-only scan has no GPU run to predict: an empty cell, not an error
    assert df.mem_pred_peak_gib[~gpu_scan].isna().all() and df.error[~gpu_scan].isna().all()


@pytest.mark.slow
def test_local_launcher_gives_the_rows_of_a_plain_run(sweep_csv, tmp_path):
    out = tmp_path / "local.csv"
    assert main(["scaling", "--models", "vim_tiny,deit_tiny", "--attn", "eager", "--res", "32,48", "--out", str(out),
                 "--launcher", "local", "--workers", "2", *FAST]) == 0
    plain, local = pd.read_csv(sweep_csv), pd.read_csv(out)
    assert list(local.columns) == SCALING.columns and (local.status == "ok").all()
    key = lambda df: sorted(map(tuple, df[SCALING.key].astype(str).values))  # noqa: E731
    assert key(local) == key(plain) and len(local) == 4
    assert (local.launcher == "local").all() and (local.workers == 2).all() and local.job_id.is_unique
    assert (plain.launcher == "plain").all() and (plain.workers == 1).all() and plain.job_id.isna().all()


def test_resume_appends_only_missing_and_keeps_rows(sweep_csv, tmp_path):
    before = sweep_csv.read_text()
    assert main(["scaling", "--models", "vim_tiny", "--res", "32,48,64", "--out", str(sweep_csv), "--resume",
                 *FAST]) == 0
    after = sweep_csv.read_text()
    assert after.startswith(before)
    df = pd.read_csv(sweep_csv)
    assert len(df) == 5 and df.res.iloc[-1] == 64


def test_existing_csv_is_never_overwritten(sweep_csv, capsys):
    before = sweep_csv.read_text()
    assert main(["scaling", "--res", "32", "--out", str(sweep_csv), *FAST]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert sweep_csv.read_text() == before


def test_resume_refuses_other_columns(tmp_path, capsys):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert main(["scaling", "--res", "32", "--out", str(other), "--resume", *FAST]) == 2
    assert "columns differ" in capsys.readouterr().err and other.read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("args,msg", [
    (["--res", "0"], "smaller than the patch size"), (["--res", "1248..224"], "runs backwards"),
    (["--res", "abc"], "cannot read"), (["--models", "vit_huge"], "unknown model"),
    (["--attn", "fast"], "unknown attention backend"), (["--scan", "fast"], "unknown scan backend"),
    # CPU refusals are asked for on --device cpu: under the default auto, a GPU host would run them
    (["--scan", "triton", "--device", "cpu"], "needs"), (["--attn", "efficient", "--device", "cpu"], "efficient"),
    pytest.param(["--device", "cuda"], "no CUDA GPU", marks=needs_no_gpu), (["--device", "tpu"], "--device"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--out", "/proc/nope/x.csv"], "cannot write"), (["--resume"], "--resume needs --out"),
    (["--device", "cuda:0,cuda:1"], "no GPU cuda:0"), (["--device", "cuda:all"], "cuda:all: no CUDA GPU"),
    (["--device", "cpu,cuda:0"], "is not cuda:N"), (["--launcher", "nope"], "'--launcher'"),
    (["--launcher", "slurm"], "sbatch and srun are not on PATH"), (["--workers", "2"], "needs --launcher"),
    (["--launcher", "local", "--partition", "gpu"], "Slurm option"),
    (["--launcher", "local", "--workers", "0"], "--workers must be >= 1"),
    (["--launcher", "local", "--slurm-config", "/nope.toml"], "cannot read it"),
    (["--launcher", "local", "--sbatch", "qos"], "KEY=VALUE"),
    (["--compile", "default,fast"], "--compile 'fast': unknown; choose from none, default, max-autotune"),
    (["--compile", ","], "--compile: no value given"), (["--amp", "fp8"], "--amp 'fp8': unknown"),
    (["--amp", "bf16", "--dtype", "fp16"], "--amp needs --dtype fp32"),
    (["--mode", "infer,fly"], "--mode 'fly': unknown; choose from infer, train"),
    (["--mode", ","], "--mode: no value"),
    (["--grad-checkpointing"], "--grad-checkpointing applies to a train step: add train to --mode"),
    (["--max-batch", "--batch", "2"], "--max-batch finds the batch itself: drop --batch"),
    (["--mem-limit-gib", "1", "--device", "cpu"], "--mem-limit-gib bounds the --max-batch search on CPU"),
    (["--max-batch", "--mem-limit-gib", "0", "--device", "cpu"], "--mem-limit-gib must be a positive number, got 0"),
    (["--mode", "train", "--grad-checkpointing", "--models", "timm:inception_v3", "--device", "cpu"],
     "--grad-checkpointing: timm:inception_v3 does not support activation checkpointing"),
])
def test_bad_input_exits_2_before_work(args, msg, capsys, tmp_path):
    argv = ["scaling", *args] if "--out" in args or "--resume" in args else \
        ["scaling", "--out", str(tmp_path / "x.csv"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and msg in err
    assert not (tmp_path / "x.csv").exists()


def test_each_regime_gets_its_own_configurations(tmp_path, monkeypatch):
    seen = {}
    import vimbench.commands.scaling as scaling
    monkeypatch.setattr(scaling, "run_sweep", lambda configs, *a, **k: seen.setdefault("configs", configs) and [])
    assert main(["scaling", "--models", "deit_tiny", "--attn", "eager", "--res", "32,48", "--compile", "none,default",
                 "--amp", "none,bf16", "--out", str(tmp_path / "r.csv"), "--device", "cpu"]) == 0
    regimes = [(c.compile, c.amp) for c in seen["configs"]]
    assert regimes == [(m, a) for m in ("none", "default") for a in ("none", "bf16") for _ in (32, 48)]


def test_a_forward_only_scan_backend_cannot_train(tmp_path, capsys, fresh_plugins):
    import vimbench
    from vimbench.kernels.selective_scan import selective_scan_ref
    vimbench.register_scan_backend("fwdonly", selective_scan_ref, devices="cpu")  # planted: no backward
    argv = ["scaling", "--models", "vim_tiny", "--scan", "fwdonly", "--res", "32", "--out", str(tmp_path / "x.csv"),
            *FAST]
    assert main([*argv, "--mode", "infer,train"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert ("--mode train (vim_tiny): scan backend 'fwdonly' (package '(direct call)') is forward-only: it registered "
            "no backward" in err)
    assert not (tmp_path / "x.csv").exists()


def test_each_mode_gets_its_own_configurations(tmp_path, monkeypatch):
    seen = {}
    import vimbench.commands.scaling as scaling
    monkeypatch.setattr(scaling, "run_sweep", lambda configs, *a, **k: seen.setdefault("configs", configs) and [])
    assert main(["scaling", "--models", "deit_tiny", "--attn", "eager", "--res", "32,48", "--mode", "train,infer",
                 "--grad-checkpointing", "--max-batch", "--mem-limit-gib", "2.5", "--out", str(tmp_path / "r.csv"),
                 "--device", "cpu"]) == 0
    cfgs = seen["configs"]
    assert [(c.mode, c.grad_checkpointing, c.res) for c in cfgs] == \
        [("train", True, 32), ("train", True, 48), ("infer", False, 32), ("infer", False, 48)]
    assert {(c.batch, c.mem_limit_gib) for c in cfgs} == {(0, 2.5)}


def test_a_scan_that_fails_its_check_gets_train_error_rows_and_no_timing(tmp_path, monkeypatch):
    import vimbench.commands.scaling as scaling
    checked = []
    monkeypatch.setattr(scaling, "check_scans",
                        lambda scans, device, log, grads: checked.append((scans, grads)) or {"ref": "gradients wrong"})
    monkeypatch.setattr(scaling, "scaling_row", lambda cfg, fixed, backoff: {**fixed, "status": "ok"})
    assert main(["scaling", "--models", "vim_tiny,deit_tiny", "--scan", "ref", "--attn", "eager", "--res", "32",
                 "--mode", "infer,train", "--out", str(tmp_path / "r.csv"), *FAST]) == 0
    df = pd.read_csv(tmp_path / "r.csv")
    assert checked == [(["ref"], True)]
    bad = (df.model == "vim_tiny") & (df["mode"] == "train")
    assert list(df.status[bad]) == ["error"] and list(df.error[bad]) == ["gradients wrong"]
    assert (df.status[~bad] == "ok").all() and len(df) == 4


@pytest.mark.slow
def test_train_rows_beside_infer_rows(tmp_path):
    out = tmp_path / "t.csv"
    assert main(["scaling", "--models", "vim_tiny,deit_tiny", "--scan", "ref", "--attn", "eager", "--res", "32",
                 "--mode", "infer,train", "--grad-checkpointing", "--out", str(out), *FAST]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == SCALING.columns and (df.status == "ok").all() and len(df) == 4
    train, infer = df[df["mode"] == "train"], df[df["mode"] == "infer"]
    assert set(train.model) == set(infer.model) == {"vim_tiny", "deit_tiny"}
    assert train.grad_checkpointing.all() and not infer.grad_checkpointing.any()
    for phase in ("time_fwd_ms", "time_bwd_ms", "time_opt_ms"):
        assert (train[phase] > 0).all() and infer[phase].isna().all()
    # one timed step: the phases make up the step
    phases = train.time_fwd_ms + train.time_bwd_ms + train.time_opt_ms
    assert ((phases - train.time_ms).abs() < 1e-6 * train.time_ms).all()
    assert train.mem_peak_gib.notna().all() and df.mem_pred_peak_gib.notna().all()
    # a train row counts and predicts its step (forward, backward, with checkpointing), not the forward
    from vimbench.count.flops import count_flops
    from vimbench.count.memory import predict_memory
    for _, r in train.iterrows():
        options = {"scan": "ref"} if r.model == "vim_tiny" else {"attn": "eager"}
        cfg = FlopsConfig(r.model, options, 32, mode="train", grad_checkpointing=True)
        assert r.flops_total == count_flops(cfg).flops_total
        assert r.mem_pred_peak_gib == pytest.approx(predict_memory(cfg).mem_pred_peak_gib)
    assert (train.flops_total.values > 2 * infer.flops_total.values).all()
    from vimbench.rows.reader import load_results, split_settings
    _, rows = load_results(out)
    assert sorted(s.slug for s in split_settings("scaling", rows)) == ["cpu-fp32-b1-backbone",
                                                                        "cpu-fp32-b1-backbone-train-gc"]


def test_preset_paper_with_explicit_override(tmp_path, monkeypatch):
    """--preset paper fills models/attn/res/batch; explicit --batch and --res win."""
    seen = {}
    import vimbench.commands.scaling as scaling
    monkeypatch.setattr(scaling, "run_sweep", lambda configs, *a, **k: seen.setdefault("configs", configs) and [])
    assert main(["scaling", "--preset", "paper", "--batch", "1", "--res", "32", "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu"]) == 0
    cfgs = seen["configs"]
    assert {(c.model, c.impl) for c in cfgs} == {("vim_tiny", AUTO), ("deit_tiny", "eager"),
                                                       ("deit_tiny", "sdpa")}
    assert {c.batch for c in cfgs} == {1} and {c.res for c in cfgs} == {32}
    assert {c.dtype for c in cfgs} == {"fp32"} and not any(c.head for c in cfgs)
    seen.clear()
    assert main(["scaling", "--preset", "paper", "--out", str(tmp_path / "q.csv"), "--device", "cpu"]) == 0
    assert sorted({c.res for c in seen["configs"]}) == [512, 640, 738, 1024, 1248]
    assert {c.batch for c in seen["configs"]} == {64}
