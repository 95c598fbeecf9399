"""A row of a FLOPs CSV: a configuration's FLOPs, params and tokens counted on the meta device
(``count.flops.count_flops``); see ``rows/schema.py`` (FLOPS) for the columns."""
from __future__ import annotations

from vimbench.config import FlopsConfig
from vimbench.count.flops import count_flops
from vimbench.rows.schema import FLOPS
from vimbench.rows.sweep import computed_row


def flops_row(cfg: FlopsConfig, fixed: dict) -> dict:
    """The row of ``cfg``: its columns, ``fixed`` (environment, command), a timestamp and its counts; an error
    row naming the exception when the count fails."""
    return computed_row(FLOPS, cfg, fixed, lambda: count_flops(cfg)._asdict())
