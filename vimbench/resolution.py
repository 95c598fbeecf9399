"""The resolution spec shared by every command: ``A..B`` (step 64), ``A..B:S``, comma lists, and mixes.

    parse_resolutions("224..1248")             -> [224, 288, ..., 1248]
    parse_resolutions("512,640,738,1024,1248") -> [512, 640, 738, 1024, 1248]
    parse_resolutions("224..480:128,738")      -> [224, 352, 480, 738]
"""
from __future__ import annotations

import re

from .errors import InputError

DEFAULT_STEP = 64
_RANGE = re.compile(r"^(\d+)\.\.(\d+)(?::(\d+))?$")


def parse_resolutions(spec: str, min_res: int = 16) -> list[int]:
    """Sorted, de-duplicated resolutions (pixels, square images) named by ``spec``.

    A range ``A..B`` is inclusive and must have A <= B; its step defaults to 64. Every resolution must be
    at least ``min_res`` (the patch size). Raises ``InputError`` naming the offending part.
    """
    out: set[int] = set()
    parts = [p.strip() for p in str(spec).split(",")]
    if not any(parts):
        raise InputError(f"empty resolution spec {spec!r}")
    for part in parts:
        m = _RANGE.match(part)
        if m:
            lo, hi, step = int(m[1]), int(m[2]), int(m[3] or DEFAULT_STEP)
            if lo > hi:
                raise InputError(f"resolution range {part!r} runs backwards; write {hi}..{lo}")
            if step <= 0:
                raise InputError(f"resolution step in {part!r} must be positive")
            values = list(range(lo, hi + 1, step))
        elif part.isdigit():
            values = [int(part)]
        else:
            raise InputError(f"cannot read resolution {part!r}: use N, A..B or A..B:STEP, comma-separated")
        for r in values:
            if r < min_res:
                raise InputError(f"resolution {r} is smaller than the patch size {min_res}")
        out.update(values)
    return sorted(out)
