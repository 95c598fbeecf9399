"""A row of a memory CSV: a configuration's predicted CUDA memory (``count.memory.predict_memory``, for its
card's compute capability), what nvidia-smi would show (reserved + ``CONTEXT_GIB``), whether that fits the card,
and the paper's value where it has one; see ``rows/schema.py`` (MEMORY) for the columns."""
from __future__ import annotations

from typing import Callable

from vimbench.config import MemoryConfig
from vimbench.count.memory import CARD_CAPABILITY, CARDS, CONTEXT_GIB, fits, predict_memory
from vimbench.rows.schema import MEMORY
from vimbench.rows.sweep import computed_row

PaperGib = Callable[[str, int, int, str, bool, str], "float | None"]
"""(model, res, batch, dtype, head, impl) -> the paper's GiB for that configuration, or None where it has none
(``vimbench.analysis.paper.paper_gib``)."""


def memory_row(cfg: MemoryConfig, fixed: dict, paper: PaperGib) -> dict:
    """The row of ``cfg``: its columns, ``fixed`` (environment, command), a timestamp, the prediction (its
    ``impl`` the backend resolved as on CUDA), the used memory, whether it fits ``card``, and ``paper_gib``
    (inference rows only: the paper measured no training; empty where ``paper`` has no value). An error row
    naming the exception when the prediction fails."""
    def predicted() -> dict:
        pred = predict_memory(cfg, CARD_CAPABILITY[cfg.card])
        value = paper(cfg.model, cfg.res, cfg.batch, cfg.dtype, cfg.head, pred.impl) if cfg.mode == "infer" else None
        return {**pred._asdict(), "mem_pred_used_gib": pred.mem_pred_reserved_gib + CONTEXT_GIB,
                "card_gib": CARDS[cfg.card], "context_gib": CONTEXT_GIB,
                "fits": fits(pred.mem_pred_reserved_gib, cfg.card),
                "paper_gib": "" if value is None else value}
    return computed_row(MEMORY, cfg, fixed, predicted)
