"""Launchers: configurations spread over GPU slots, submitit jobs on this machine, and a Slurm job array down to
the sbatch script (fake sbatch and sacct on PATH). Measuring is stubbed: what runs is the machinery."""
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from helpers import fake_slurm, submitted  # noqa: F401 (a fixture)
from vimbench.measure.isolation import run_isolated
from vimbench.measure.launchers import Plain, Submitit
from vimbench.rows.schema import PLACEMENT, SCALING, Schema
from vimbench.rows.sweep import run_sweep
from vimbench.rows.writer import CsvLog

SCHEMA = Schema("test", ["name", "status", "error", "seen", "host", *PLACEMENT], key=["name"], required=(),
                marker=(), setting=())
CONFIGS = [{"name": n} for n in ("a", "b", "c", "d")]


def visible_devices() -> dict:
    """Run in a worker: the GPUs it was given."""
    return {"seen": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def _sweep(tmp_path, run_one, launcher, configs=CONFIGS, resume=False):
    log = CsvLog(tmp_path / "r.csv", SCHEMA, resume=resume)
    run_sweep(configs, log, run_one, lambda c: c["name"], launcher)
    return pd.read_csv(tmp_path / "r.csv", dtype=str, keep_default_na=False)


def test_gpu_slots_run_one_configuration_per_slot_and_write_in_order(tmp_path):
    running, peak, lock = set(), [0], threading.Lock()

    def run_one(cfg):
        with lock:
            running.add(cfg["name"])
            peak[0] = max(peak[0], len(running))
        row = {"name": cfg["name"], **run_isolated(visible_devices)}
        with lock:
            running.discard(cfg["name"])
        return row

    df = _sweep(tmp_path, run_one, Plain(("0", "1")))
    assert list(df.name) == ["a", "b", "c", "d"] and (df.status == "ok").all()
    assert (df.seen == df.cuda_visible_devices).all()  # each worker saw the GPU its row names
    assert set(df.seen) <= {"0", "1"} and peak[0] <= 2
    assert (df.launcher == "plain").all() and (df.workers == "2").all() and (df.job_id == "").all()


def test_plain_rows_say_where_they_ran(tmp_path):
    df = _sweep(tmp_path, lambda cfg: {"name": cfg["name"]}, Plain(), CONFIGS[:2])
    assert list(df.launcher) == ["plain"] * 2 and list(df.workers) == ["1"] * 2 and list(df.job_id) == [""] * 2
    assert (df.host == os.uname().nodename).all()


def test_a_single_job_runs_on_the_first_slot(tmp_path):
    row = Plain(("1", "0")).run_job(lambda cfg: {**cfg, **run_isolated(visible_devices)}, {"name": "p"}, tmp_path)
    assert row["name"] == "p" and row["seen"] == row["cuda_visible_devices"] == "1"
    assert row["launcher"] == "plain" and row["workers"] == 1 and row["job_id"] == ""


@pytest.mark.slow
def test_local_jobs_give_the_keys_of_a_plain_run_and_a_killed_job_an_error_row(tmp_path):
    def run_one(cfg):  # pickled by value into each job
        if cfg["name"] == "c":
            os.kill(os.getpid(), signal.SIGKILL)  # the job's process dies mid-job
        if cfg["name"] == "d":
            raise ValueError("bad configuration")
        return {"name": cfg["name"], "status": "ok", "seen": str(os.getpid())}

    (tmp_path / "p").mkdir()
    (tmp_path / "l").mkdir()
    plain = _sweep(tmp_path / "p", lambda cfg: {"name": cfg["name"], "status": "ok"}, Plain())
    local = _sweep(tmp_path / "l", run_one, Submitit("local", workers=2, poll_s=0.2)).set_index("name")
    assert sorted(local.index) == sorted(plain.name) == ["a", "b", "c", "d"]
    ok, dead, raised = local.loc[["a", "b"]], local.loc["c"], local.loc["d"]
    assert (ok.status == "ok").all() and (local.launcher == "local").all() and (local.workers == "2").all()
    assert local.job_id.is_unique and len(set(ok.seen)) == 2  # two jobs, two processes
    assert dead.status == "error" and dead.error.startswith(f"local job {dead.job_id} ended without a row")
    assert dead.host == os.uname().nodename
    assert raised.error == f"local job {raised.job_id} failed: ValueError: bad configuration"


def test_slurm_array_script_and_failed_tasks_become_error_rows(tmp_path, fake_slurm, monkeypatch):
    from vimbench.commands import main
    from vimbench.measure import launchers
    monkeypatch.setattr(launchers.Submitit, "poll_s", 0.1)
    out = tmp_path / "s.csv"
    config = tmp_path / "slurm.toml"
    config.write_text('partition = "gpu"\ntime_limit = 30\n[sbatch]\naccount = "abc"\n')
    assert main(["scaling", "--models", "deit_tiny", "--attn", "eager", "--res", "32,48", "--device", "cuda",
                 "--launcher", "slurm", "--slurm-config", str(config), "--workers", "1", "--sbatch", "qos=high",
                 "--out", str(out)]) == 0
    [script] = submitted(fake_slurm)
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --time=30",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --account=abc", "#SBATCH --qos=high"):
        assert line in script.splitlines()
    df = pd.read_csv(out).sort_values("res")
    assert list(df.status) == ["error", "error"] and (df.launcher == "slurm").all()
    assert list(df.job_id) == ["4242_0", "4242_1"] and (df.device == "cuda:0").all()
    assert "(state PREEMPTED)" in df.error.iloc[0] and "(state FAILED)" in df.error.iloc[1]
    assert list(df.host) == ["n1", "n2"]  # the nodes sacct names
    # --resume submits only what is missing: here res 48 (res 32 has an ok row now), as a single job
    with CsvLog(out, SCALING, resume=True) as log:  # closed: the next run locks the file
        log.append({**df.iloc[0].to_dict(), "status": "ok", "error": ""})
    assert main(["scaling", "--models", "deit_tiny", "--attn", "eager", "--res", "32,48", "--device", "cuda",
                 "--launcher", "slurm", "--out", str(out), "--resume"]) == 0
    [_, single] = submitted(fake_slurm)
    assert "--array" not in single
    last = pd.read_csv(out).iloc[-1]
    assert len(pd.read_csv(out)) == 4 and last.res == 48 and "(state TIMEOUT)" in last.error


def test_killing_the_parent_leaves_a_valid_csv_that_resume_completes(tmp_path):
    """The parent (two slots) is SIGKILLed after its first row; --resume runs the rest, no key twice."""
    code = f"""
import time
from vimbench.measure.launchers import Plain
from vimbench.rows.sweep import run_sweep
from vimbench.rows.writer import CsvLog
from test_launchers import SCHEMA
run_one = lambda c: time.sleep(0.5) or {{"name": c["name"], "status": "ok"}}
run_sweep(CONFIGS, CsvLog({str(tmp_path / 'r.csv')!r}, SCHEMA), run_one, str, Plain(("0", "1")))
"""
    configs = [{"name": str(i)} for i in range(16)]
    here = os.path.dirname(__file__)  # test_launchers, and helpers in the folder above
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.path.dirname(here),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", f"CONFIGS = {configs!r}" + code], env=env,
                            stderr=subprocess.DEVNULL)
    csv = tmp_path / "r.csv"
    while proc.poll() is None and (not csv.exists() or len(csv.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    before = pd.read_csv(csv, dtype=str)
    assert 2 <= len(before) < 16 and list(before.name) == [str(i) for i in range(len(before))]
    df = _sweep(tmp_path, lambda c: {"name": c["name"], "status": "ok"}, Plain(), configs, resume=True)
    assert sorted(df.name, key=int) == [str(i) for i in range(16)] and df.name.is_unique


def test_without_submitit_vimbench_imports_and_a_launcher_is_one_line_exit_2(tmp_path):
    argv = ["scaling", "--launcher", "local", "--device", "cpu", "--out", str(tmp_path / "x.csv")]
    code = f"import sys; sys.modules['submitit'] = None\nfrom vimbench.commands import main\nsys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "x.csv").exists()
    assert proc.stderr.strip() == ("vimbench scaling: error: --launcher local needs submitit: "
                                   "pip install 'vimbench[cluster]'")
