"""The numbers the Vim paper claims, to set beside what vimbench measures.

Provenance: Zhu et al., "Vision Mamba", arXiv 2401.09417 (ICML 2024). The abstract claims Vim is 2.8x
faster than DeiT and saves 86.8% GPU memory in batch inference at 1248x1248. Fig. 1 (b)/(c) plot Vim-Ti
and DeiT-Ti, backbone only. FPS was plotted as log10 and is read back from the figure (hence "~", about
+-5% per value); memory is printed on the figure in GB. DeiT-Ti is OOM at 1248 in Fig. 1, so the 86.8%
cannot come from that figure (it implies DeiT-Ti at ~84.4 GB); it is kept here as the abstract states it.
The paper gives no GPU, batch size, dtype or memory definition; the authors' benchmark script runs fp32,
batch 64 (see /work/shared/reference/vim-facts.md, section 1).
"""
from __future__ import annotations

from dataclasses import dataclass

PATCH = 16  # Vim-Ti and DeiT-Ti patch size: the grid of a resolution is res // PATCH


@dataclass(frozen=True)
class PaperPoint:
    """One resolution of Fig. 1: FPS (images/s, read off a log plot) and memory (GB, None = OOM)."""
    res: int
    deit_fps: float
    vim_fps: float
    deit_gb: float | None
    vim_gb: float

    @property
    def tokens(self) -> int:
        """Patch tokens (res // 16)^2, without the cls token, as the paper counts them."""
        return (self.res // PATCH) ** 2


FIG1 = (
    PaperPoint(512, 347.0, 347.0, 4.56, 3.32),
    PaperPoint(640, 178.0, 195.0, 8.09, 4.22),
    PaperPoint(738, 112.0, 117.0, 12.48, 5.03),  # 46x46 patches: 738 is not a multiple of 16
    PaperPoint(1024, 37.2, 81.3, 40.09, 8.13),
    PaperPoint(1248, 18.2, 51.3, None, 11.14),   # DeiT-Ti OOM
)

HEADLINE_RES = 1248
HEADLINE_SPEEDUP = 2.8           # Vim-Ti FPS / DeiT-Ti FPS at 1248 (abstract; = 10^(1.71 - 1.26))
HEADLINE_MEMORY_SAVING = 0.868   # 1 - Vim-Ti GB / DeiT-Ti GB at 1248 (abstract; not derivable from Fig. 1)
PAPER_BATCH, PAPER_DTYPE = 64, "fp32"
PAPER_SETTING = "backbone only; GPU, batch, dtype and memory definition not stated (authors' script: fp32, batch 64)"

PAPER_SETTING_OPTIONS = dict(models_spec="vim_tiny,deit_tiny", attn_spec="eager,sdpa", dtype="fp32", batch=64,
                             res_spec="512,640,738,1024,1248", head=False)
"""The paper's Fig. 1 setting as command options (``--preset paper``): backbone only, fp32, batch 64 at its
resolutions, plus deit_tiny with sdpa, the comparison the paper did not make."""


def paper_gib(model: str, res: int, batch: int, dtype: str, head: bool, impl: str) -> float | None:
    """The Vim paper's Fig. 1 (c) memory (GB, read as GiB) for this configuration, when it is one the
    paper measured (vim_tiny or eager deit_tiny, fp32, batch 64, backbone only, at a Fig. 1 resolution);
    NaN where the paper draws OOM; None otherwise."""
    point = next((p for p in FIG1 if p.res == res), None)
    if point is None or batch != PAPER_BATCH or dtype != PAPER_DTYPE or head:
        return None
    if model == "vim_tiny":
        return point.vim_gb
    if model == "deit_tiny" and impl == "eager":
        return float("nan") if point.deit_gb is None else point.deit_gb
    return None
