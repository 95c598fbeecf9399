"""Running the GPU check: its output folder, the plan under a budget, the steps within it (each stopped when
the budget runs out, SIGTERM turned into an exception so that the summary and archive are still written)."""
from __future__ import annotations

import datetime
import json
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from vimbench.gpucheck import archive, steps as gpu_steps, summary
from vimbench.gpucheck.steps import Step
from vimbench.measure.env import environment, slug

WRAP_UP_S = 10.0
"""Budget kept back for writing the summary and the archive."""


def default_out(card: str, today: datetime.date | None = None) -> Path:
    """results/gpu/<card slug>-<YYYY-MM-DD>, e.g. results/gpu/nvidia-h100-80gb-hbm3-2026-11-25."""
    return Path("results") / "gpu" / f"{slug(card)}-{(today or datetime.date.today()).isoformat()}"


def plan(steps: list[Step], budget_s: float | None) -> tuple[list[Step], list[Step]]:
    """(steps to run, steps left out): the longest prefix of ``steps`` (priority order) whose estimates,
    plus ``WRAP_UP_S``, fit ``budget_s`` (None: no budget, all of them)."""
    total = WRAP_UP_S
    for i, step in enumerate(steps):
        total += step.estimate_s
        if budget_s is not None and total > budget_s:
            return steps[:i], steps[i:]
    return list(steps), []


class BudgetSpent(BaseException):
    """The budget ran out while a step was running (raised by the SIGALRM handler of ``deadline``)."""


class Terminated(BaseException):
    """The process got SIGTERM (raised by the handler ``sigterm_raises`` installs)."""


@contextmanager
def deadline(seconds: float | None):
    """Raises ``BudgetSpent`` in the main thread after ``seconds`` (None: never); restores the old handler."""
    def on_alarm(signum, frame):
        raise BudgetSpent()

    old = signal.signal(signal.SIGALRM, on_alarm)
    if seconds is not None:
        signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def sigterm_raises():
    """Within the block SIGTERM raises ``Terminated``, so that clean-up in ``finally`` (summary, archive) runs."""
    def on_term(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_steps(steps: list[Step], budget_s: float | None, log: Path,
              echo: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
              start: float | None = None) -> list[dict]:
    """Runs ``steps`` in order within ``budget_s`` seconds (None: no limit) and returns one record per step:
    name, what, estimate_s, actual_s (None if it did not start), status (ok, failed, skipped, no budget,
    cut short: budget spent, interrupted) and failures. Appends each record to ``log`` (JSON lines, with
    the run's start time) as the step ends. The budget counts from ``start`` (a ``clock()`` reading;
    default: now).

    After a failed correctness step, every later step that is not one is ``skipped``. Otherwise a step
    starts only while its estimate fits the time left (less ``WRAP_UP_S``); the first that does not fit and
    every one after it get status ``no budget``. When the budget runs out mid-step, the step is stopped
    (``cut short``; its CSV is resumed by the next run); KeyboardInterrupt or SIGTERM stop the run
    (``interrupted``) and re-raise after the record is written."""
    start, run_id = clock() if start is None else start, time.strftime("%Y-%m-%dT%H:%M:%S")
    records = [dict(name=s.name, what=s.what, estimate_s=round(s.estimate_s, 1), actual_s=None, status="no budget",
                    failures=[]) for s in steps]
    correct = True

    def write(rec):
        with open(log, "a") as f:
            f.write(json.dumps({"run": run_id, "budget_s": budget_s, **rec}) + "\n")

    for step, rec in zip(steps, records):
        if not correct and not step.correctness:
            rec["status"] = "skipped"
            rec["failures"] = ["kernels failed their correctness checks: no timing taken"]
            write(rec)
            continue
        left = None if budget_s is None else budget_s - (clock() - start) - WRAP_UP_S
        if left is not None and step.estimate_s > left:
            echo(f"== {step.name}: not started, estimate {step.estimate_s:.0f} s > {max(left, 0):.0f} s left")
            break
        echo(f"== {step.name} (estimate {step.estimate_s:.0f} s): {step.what}")
        began = clock()
        try:
            with deadline(left):
                rec["failures"] = step.run()
            rec["status"] = "failed" if rec["failures"] else "ok"
        except BudgetSpent:
            rec["status"] = "cut short: budget spent"
        except (KeyboardInterrupt, Terminated):
            rec["status"] = "interrupted"
            raise
        finally:
            rec["actual_s"] = round(clock() - began, 1)
            write(rec)
        if step.correctness and rec["status"] != "ok":
            correct = False
        if rec["status"].startswith("cut short"):
            break
    for rec in records:
        if rec["status"] == "no budget":
            write(rec)
    return records


def check_gpu(out: Path, budget_s: float | None, archive_path: Path | None, command: str,
              echo: Callable[..., None] = print, start: float | None = None, *, call: gpu_steps.Caller) -> int:
    """The whole check on cuda:0 after its preflight: environment.json, the plan (``gpu_steps.build_steps``,
    ``plan``), the steps (``run_steps``) within ``budget_s`` counted from ``start``, then the summary and, with
    ``archive_path``, the archive, also when interrupted. ``command`` (the gpu-check command line) is recorded
    in environment.json and in the sweeps' rows, which ``call`` runs (``gpu_steps.Caller``); ``echo(text,
    err=False)`` prints. Returns the exit code: 1 when a step failed or was skipped, 130 on KeyboardInterrupt, 143
    on SIGTERM, else 0."""
    import torch
    card, today = torch.cuda.get_device_name(0), datetime.date.today()
    out.mkdir(parents=True, exist_ok=True)
    code = 1
    try:
        with sigterm_raises():
            archive.write_environment(out, {**environment(torch.device("cuda:0")), "command": command,
                                            "budget_s": budget_s}, "start")
            steps = gpu_steps.build_steps(out, command=command, call=call)
            chosen, left_out = plan(steps, budget_s)
            echo(f"plan: {', '.join(f'{s.name} ~{s.estimate_s:.0f} s' for s in chosen) or 'nothing fits'}"
                 + (f"; no budget for: {', '.join(s.name for s in left_out)}" if left_out else ""))
            records = run_steps(steps, budget_s, out / "steps.jsonl", echo=echo, start=start)
        code = 1 if any(r["status"] in ("failed", "skipped") for r in records) else 0
    except KeyboardInterrupt:
        code = 130
    except Terminated:
        code = 143
    finally:
        wrap_up(out, archive_path, archive.archive_name(card, today), echo)
    if code in (130, 143):
        echo(f"gpu-check: interrupted; summary{' and archive' if archive_path else ''} written", err=True)
    return code


def wrap_up(out: Path, archive_path: Path | None, top: str, echo: Callable[..., None] = print) -> None:
    """The summary, then the archive: a summary that fails to write is reported and the archive still made."""
    try:
        archive.write_environment(out, {}, "end")
        echo(f"wrote {summary.write_summary(out)}")
    except Exception as e:  # the archive of the results matters more than their summary
        echo(f"gpu-check: the summary failed: {type(e).__name__}: {e}", err=True)
    if archive_path:
        echo(f"wrote {archive.write_archive(out, archive_path, top)}; bring it home and run "
             f"`vimbench gpu-check --unpack {archive_path.name}` in your checkout")
