"""Where the configurations of a sweep run, and the columns that say so in every row.

    Plain     on this machine, each configuration in its own worker (``isolation.run_isolated``). With one
              slot (the default) one configuration at a time; with several slots (``--device cuda:0,cuda:1``
              or ``cuda:all``) one configuration per slot at a time, each worker pinned to its slot's GPU with
              CUDA_VISIBLE_DEVICES, so that every worker sees its GPU as cuda:0 and the rows' keys are those
              of a one-GPU run. Rows come back in the order of the configurations.
    Submitit  one submitit job per configuration, running the same isolated worker and returning its row:
              ``local`` runs the jobs as processes on this machine, ``workers`` at a time (LocalExecutor);
              ``slurm`` submits one job array through AutoExecutor, ``workers`` tasks at a time (the
              array's parallelism). Rows come back as jobs finish; a job that ends without a row (failed,
              pre-empted, timed out, killed) becomes an error row naming its state.

``run_job`` runs one function the same way and returns its row: how a sweep runs a preamble (the kernels
sweep's correctness checks and ceilings) where its configurations will run, before them. ``launcher_settings``
reads a ``Submitit`` launcher's settings from the --slurm-config file (TOML or JSON) and the options beside it.

Every row gets ``PLACEMENT`` columns: ``launcher``, ``job_id`` (empty for plain), ``workers`` (configurations
running at once, which share the cores on a CPU), ``cuda_visible_devices``; and the ``environment`` of the
machine that ran it. submitit is an optional dependency: only ``Submitit`` imports it, when it runs.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from vimbench.config import columns
from vimbench.errors import InputError
from vimbench.measure.env import environment
from vimbench.measure.isolation import one_line, pinned

RunOne = Callable[[Any], dict]
"""A configuration (``vimbench.config``, or a dict) in, its row out (measured in an isolated worker)."""


def placed(row: dict, cfg: dict, launcher: str, workers: int, visible: str | None = None) -> dict:
    """``row`` with the environment of this process's machine (its own values win: the worker's threads
    and load) and where it ran: ``visible`` is its workers' CUDA_VISIBLE_DEVICES (default: this process's).
    ``job_id`` is added by whoever knows it. A configuration without a device ran on the CPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
    env = environment(torch.device(columns(cfg).get("device", "cpu")))
    return {**env, **row, "launcher": launcher, "workers": workers, "cuda_visible_devices": visible}


@dataclass(frozen=True)
class Plain:
    """Configurations run on this machine, one per slot at a time. ``slots``: the CUDA_VISIBLE_DEVICES value
    of each slot's workers (GPU indices); empty: one slot, workers inherit this process's environment."""
    slots: tuple[str, ...] = ()
    name = "plain"

    @property
    def workers(self) -> int:
        return max(1, len(self.slots))

    def run(self, run_one: RunOne, todo: list[dict], jobs_dir: Path) -> Iterator[tuple[dict, dict]]:
        """(configuration, row) for each of ``todo``, in its order. ``jobs_dir`` is not used."""
        if not self.slots:
            for cfg in todo:
                yield cfg, {**placed(run_one(cfg), cfg, self.name, 1), "job_id": ""}
            return
        results: list = [None] * len(todo)
        finished = [threading.Event() for _ in todo]
        claim = iter(range(len(todo)))
        lock = threading.Lock()

        def slot_loop(slot: str):
            with pinned({"CUDA_VISIBLE_DEVICES": slot}):
                while True:
                    with lock:
                        i = next(claim, None)
                    if i is None:
                        return
                    try:
                        results[i] = (slot, run_one(todo[i]), None)
                    except BaseException as e:  # re-raised in order, in the caller's thread
                        results[i] = (slot, None, e)
                    finished[i].set()

        for slot in self.slots:  # daemons: an interrupted parent does not wait for running configurations
            threading.Thread(target=slot_loop, args=(slot,), daemon=True).start()
        for i, cfg in enumerate(todo):
            finished[i].wait()
            slot, row, exc = results[i]
            if exc is not None:
                raise exc
            on_gpu = torch.device(columns(cfg).get("device", "cpu")).type == "cuda" and slot.isdigit()
            env_cfg = {**columns(cfg), "device": f"cuda:{slot}"} if on_gpu else cfg  # the name of the slot's own GPU
            yield cfg, {**placed(row, env_cfg, self.name, self.workers, visible=slot), "job_id": ""}

    def run_job(self, fn: RunOne, cfg: dict, jobs_dir: Path) -> dict:
        """``fn(cfg)``'s row, run once as ``run`` runs a configuration: on the first slot, if there are slots."""
        [(_, row)] = Plain(self.slots[:1]).run(fn, [cfg], jobs_dir)
        return row


def run_task(run_one: RunOne, cfg: dict, launcher: str, workers: int) -> dict:
    """What a submitit job runs: ``run_one(cfg)`` placed on the job's machine."""
    return placed(run_one(cfg), cfg, launcher, workers)


SLURM_KEYS = ("partition", "time_limit", "gpus_per_task", "workers", "sbatch")
"""What --slurm-config FILE may hold (TOML or JSON): the options of the same names; sbatch is a table."""


def read_slurm_config(path: str | None) -> dict:
    """The settings in the --slurm-config file ``path`` (TOML, or JSON by its .json suffix; {} for None), checked
    (``check_settings``). InputError naming the file for one that cannot be read, an unknown key, a null value or
    a setting out of range."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import tomllib  # Python >= 3.11
            values = tomllib.loads(text)
    except (OSError, ValueError, ImportError) as e:
        raise InputError(f"--slurm-config {path}: cannot read it ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict) or not isinstance(values.get("sbatch", {}), dict):
        raise InputError(f"--slurm-config {path}: expected a table of settings with sbatch a table of KEY = VALUE")
    unknown = sorted(set(values) - set(SLURM_KEYS))
    if unknown:
        raise InputError(f"--slurm-config {path}: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"it may hold {', '.join(SLURM_KEYS)}")
    nulls = [k for k, v in values.items() if v is None]  # JSON null: a setting is given a value or left out
    if nulls:
        raise InputError(f"--slurm-config {path}: {nulls[0]} is null; give it a value or leave it out")
    try:
        check_settings(values)
    except InputError as e:
        raise InputError(f"--slurm-config {path}: {e}") from None
    return values


def launcher_settings(config: str | None, given: dict, sbatch: tuple[str, ...]) -> dict:
    """The ``Submitit`` settings of a sweep: the --slurm-config file ``config`` (``read_slurm_config``), overridden
    by the options ``given`` that are not None (``SLURM_KEYS`` but sbatch) and the --sbatch KEY=VALUE items
    ``sbatch`` (merged into the file's sbatch table), checked (``check_settings``)."""
    settings = {**read_slurm_config(config), **{k: v for k, v in given.items() if v is not None}}
    merged = {**settings.pop("sbatch", {}), **dict(_key_value(item) for item in sbatch)}
    if merged:
        settings["sbatch"] = merged
    check_settings(settings)
    return settings


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--sbatch {item!r}: use KEY=VALUE, e.g. --sbatch account=abc")
    return key.strip(" "), value.strip(" ")  # spaces only: any control character is refused (check_settings)


SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
"""An sbatch option's long name as --sbatch and [sbatch] take it (submitit writes ``_`` as ``-``)."""


def check_settings(settings: dict) -> None:
    """InputError naming the option for a ``Submitit`` setting that would not reach the sbatch script or the
    submitit parameters as given: ``workers``, ``time_limit`` or ``gpus_per_task`` not an int (a bool is not
    one), a ``partition`` that is not printable text (a newline would start a shell line of the script), an
    ``sbatch`` key that is not an option name, or an ``sbatch`` value that is not printable text, an int, a
    finite float or true (a bare flag: ``#SBATCH --KEY``). Other keys of ``settings`` are not looked at."""
    for name in ("workers", "time_limit", "gpus_per_task"):
        value = settings.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")
    if settings.get("partition") is not None:
        check_text("--partition", settings["partition"])
    for key, value in settings.get("sbatch", {}).items():
        if not (isinstance(key, str) and SBATCH_KEY.fullmatch(key)):
            raise InputError(f"--sbatch {key!r}: not an sbatch option name (a letter, then letters, digits, - or _)")
        if isinstance(value, str):
            check_text(f"--sbatch {key}", value)
        elif not (value is True or type(value) is int or isinstance(value, float) and math.isfinite(value)):
            raise InputError(f"--sbatch {key}={value!r}: a value is text, a number or true (a bare flag)")


def check_text(what: str, value) -> None:
    """InputError naming ``what`` unless ``value`` is non-empty printable text (no newline, NUL, escape, ...)."""
    if not isinstance(value, str):
        raise InputError(f"{what} must be text, got {value!r}")
    bad = next((c for c in value if not c.isprintable()), None)
    if not value or bad:
        why = f"holds the control character {bad!r}" if bad else "is empty"
        raise InputError(f"{what} {value!r} {why}; the sbatch script would not read it as one value")


FINAL_STATES = ("PREEMPTED",)
"""Slurm states taken as final although submitit waits on them (a pre-empted task that is not requeued)."""


@dataclass(frozen=True)
class Submitit:
    """Configurations as submitit jobs. ``cluster``: local or slurm; ``workers``: jobs at once (None: all
    at once on Slurm); ``time_limit``: minutes per job; ``gpus_per_task``; Slurm only: ``partition`` and
    ``sbatch`` (extra sbatch parameters, e.g. {"account": "abc"}), all checked (``check_settings``). Job files
    and logs go to ``jobs_dir``."""
    cluster: str
    workers: int | None = None
    time_limit: int = 60
    gpus_per_task: int = 0
    partition: str | None = None
    sbatch: dict = field(default_factory=dict)
    poll_s: float = 1.0

    def __post_init__(self):
        check_settings(vars(self))

    @property
    def name(self) -> str:
        return self.cluster

    def executor(self, jobs_dir: Path):
        """The submitit executor with this launcher's parameters (``%j`` in the folder: one per job)."""
        import submitit
        if self.cluster == "slurm":  # submitit writes the folder into the script's #SBATCH --output line
            check_text("--out: its jobs folder", str(jobs_dir))
        ex = submitit.AutoExecutor(folder=Path(jobs_dir) / "%j", cluster=self.cluster)
        params = dict(name="vimbench", timeout_min=self.time_limit, gpus_per_node=self.gpus_per_task or None)
        if self.cluster == "slurm":
            params.update(slurm_partition=self.partition, slurm_additional_parameters=dict(self.sbatch) or None)
            if self.workers:
                params["slurm_array_parallelism"] = self.workers
        ex.update_parameters(**params)
        return ex

    def run(self, run_one: RunOne, todo: list[dict], jobs_dir: Path) -> Iterator[tuple[dict, dict]]:
        """(configuration, row) as jobs finish. Jobs still running when the caller stops are cancelled."""
        if not todo:
            return
        ex = self.executor(jobs_dir)
        workers = min(self.workers or len(todo), len(todo))
        task = functools.partial(run_task, run_one, launcher=self.name, workers=workers)
        waiting, running = list(todo), []
        if self.cluster == "slurm":  # one job array; Slurm runs `workers` of its tasks at a time
            running, waiting = list(zip(ex.map_array(task, waiting), waiting)), []
        try:
            while running or waiting:
                while waiting and len(running) < workers:  # local: keep `workers` jobs running
                    cfg = waiting.pop(0)
                    running.append((ex.submit(task, cfg), cfg))
                done = [(job, cfg) for job, cfg in running if self._ended(job)]
                for job, cfg in done:
                    running.remove((job, cfg))
                    yield cfg, {"launcher": self.name, "workers": workers, **self._row(job), "job_id": job.job_id}
                if not done:
                    time.sleep(self.poll_s)
        finally:
            for job, _ in running:
                job.cancel(check=False)

    def run_job(self, fn: RunOne, cfg: dict, jobs_dir: Path) -> dict:
        """``fn(cfg)``'s row from one job (on Slurm a single job, not an array), waited for; an error row naming
        the job's state if it ended without one."""
        [(_, row)] = self.run(fn, [cfg], jobs_dir)
        return row

    @staticmethod
    def _state(job) -> str:
        return str(job.state).split()[0].upper()  # "CANCELLED by 123" -> CANCELLED

    def _ended(self, job) -> bool:
        return job.done() or self._state(job) in FINAL_STATES

    def _row(self, job) -> dict:
        """The job's row, or an error row naming the job's state (and the exception, or the log to read) and
        its host as far as known."""
        if job.paths.result_pickle.exists():
            try:
                return job.result()
            except Exception as e:  # the job raised: its trace is in the message
                trace = str(e).split("-" * 22)
                last = trace[1].strip().splitlines()[-1] if len(trace) > 2 else one_line(e)
                return {"status": "error", "error": f"{self.name} job {job.job_id} failed: {last}"}
        host = platform.node() if self.cluster == "local" else \
            job.watcher.get_info(job.job_id, mode="cache").get("NodeList", "")  # from sacct
        return {"status": "error", "host": host, "error": f"{self.name} job {job.job_id} ended without a row "
                                                          f"(state {self._state(job)}); log: {job.paths.stderr}"}
