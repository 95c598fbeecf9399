"""A generic sweep: configurations in, one CSV row per configuration out, each measured in its own worker.

Resuming skips configurations whose key is already in the CSV with status ok; everything else is
appended (never rewritten). A progress bar names the configuration running, the rows done and the ETA.
"""
from __future__ import annotations

import sys
from typing import Callable

from tqdm import tqdm

from vimbench.rows.writer import CsvLog


def run_sweep(configs: list[dict], log: CsvLog, run_one: Callable[[dict], dict],
              describe: Callable[[dict], str]) -> list[dict]:
    """Runs ``run_one(cfg) -> row`` for every configuration not yet done in ``log`` and appends each row
    as it finishes. A config's key is its values of the log schema's key columns (``CsvLog.key``).
    Returns the rows written by this call."""
    done = log.done()
    todo = [c for c in configs if log.key(c) not in done]
    if len(todo) < len(configs):
        print(f"resuming {log.path}: {len(configs) - len(todo)} configurations already ok, {len(todo)} to run",
              file=sys.stderr)
    written = []
    with tqdm(total=len(todo), unit="config", file=sys.stderr, dynamic_ncols=True) as bar:
        for cfg in todo:
            bar.set_description(describe(cfg))
            row = run_one(cfg)
            log.append(row)
            written.append(row)
            bar.set_postfix_str(f"last: {row.get('status', '?')}")
            bar.update()
    return written
