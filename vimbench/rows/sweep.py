"""A generic sweep: configurations in, one CSV row per configuration out, each measured in its own worker.

Resuming skips configurations whose key is already in the CSV with status ok; everything else is
appended (never rewritten). A progress bar names the launcher, the last configuration done and the ETA.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from vimbench.errors import Interrupted
from vimbench.measure.isolation import one_line
from vimbench.measure.launchers import Plain, config_fields
from vimbench.rows.schema import ENVIRONMENT, PLACEMENT, Schema
from vimbench.rows.writer import CsvLog


WHERE = {*ENVIRONMENT, *PLACEMENT}
"""Columns every launcher adds to a row; kept where the log's schema has them (scaling, kernels)."""


def jobs_dir(log: CsvLog) -> Path:
    """Where a submitit launcher keeps the job files and logs of ``log``'s sweep: <csv stem>-jobs beside it."""
    return log.path.with_name(f"{log.path.stem}-jobs")


def run_sweep(configs: list, log: CsvLog, run_one: Callable, describe: Callable, launcher=Plain()) -> list[dict]:
    """Runs ``run_one(cfg) -> row`` for every configuration not yet done in ``log`` where ``launcher``
    (``vimbench.measure.launchers``) puts it, and appends each row as it comes back, with the columns of
    its configuration and of where it ran. A configuration is a dict or a dataclass (``config_fields``); its
    key is its values of the log schema's key columns (``CsvLog.key``). Returns the rows written by this call.
    Ctrl-C raises ``Interrupted`` saying how many rows were written and where (each row is whole on disk before
    the next configuration's)."""
    done = log.done()
    todo = [c for c in configs if log.key(config_fields(c)) not in done]
    if len(todo) < len(configs):
        print(f"resuming {log.path}: {len(configs) - len(todo)} configurations already ok, {len(todo)} to run",
              file=sys.stderr)
    written, columns = [], set(log.schema.columns)
    try:
        with tqdm(total=len(todo), unit="config", file=sys.stderr, dynamic_ncols=True) as bar:
            bar.set_description(f"{launcher.name} x{launcher.workers or len(todo)}" if todo else "")
            for cfg, row in launcher.run(run_one, todo, jobs_dir(log)):
                # all a job that died returns is its key
                row = {**{k: v for k, v in config_fields(cfg).items() if k in columns},
                       **{k: v for k, v in row.items() if k in columns or k not in WHERE}}
                log.append(row)
                written.append(row)
                bar.set_postfix_str(f"last: {describe(cfg)} {row.get('status', '?')}")
                bar.update()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {len(written)} of {len(todo)} configurations; every row written is "
                          f"kept in {log.path}: add --resume to continue it") from None
    return written


def computed_row(schema: Schema, cfg: dict, fixed: dict, compute: Callable[[], dict]) -> dict:
    """One row of ``schema`` for a configuration computed in this process (counted or predicted, not
    timed, so no worker): ``cfg``'s values of the schema's columns, ``fixed`` (environment, command), a
    timestamp, and the columns ``compute()`` returns with status ok. An exception in ``compute`` becomes
    an error row naming it: one configuration that cannot be computed never stops the others."""
    row = {k: v for k, v in cfg.items() if k in schema.columns}
    row.update(fixed, timestamp=datetime.datetime.now().isoformat(timespec="seconds"))
    try:
        return {**row, **compute(), "status": "ok"}
    except Exception as e:  # reported in the row, see the docstring
        return {**row, "status": "error", "error": one_line(e)}
