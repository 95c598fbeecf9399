"""`vimbench memory`: predicted peak GPU memory of an inference forward, computed without a GPU."""
from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from ..csvlog import check_writable
from ..errors import InputError
from ..kernels.selective_scan import BackendUnavailable, check_scan_backend
from ..memory import (CARDS, CONTEXT_GIB, DTYPES, fits, paper_comparison, paper_comparison_markdown,
                      predict_memory)
from ..table import format_table
from ._options import models_option, resolutions, variants

COLUMNS = ["model", "family", "impl", "res", "tokens", "batch", "dtype", "head", "params",
           "mem_pred_weights_gib", "mem_pred_activations_gib", "mem_pred_peak_gib", "mem_pred_reserved_gib",
           "card", "card_gib", "context_gib", "fits"]
_PRESET_FIXED = ("models_spec", "attn_spec", "scan_spec", "res_spec", "batch", "dtype", "head")


def _check_variants(variants, dtype: str) -> None:
    """InputError for a scan backend that cannot run on CUDA here, or flash/cudnn attention in fp32."""
    for _, options in variants:
        scan, attn = options.get("scan"), options.get("attn")
        if scan and scan != "auto":
            try:
                check_scan_backend(scan, "cuda")
            except BackendUnavailable as e:
                raise InputError(f"cannot predict scan backend {scan!r}: {e}") from None
        if attn in ("flash", "cudnn") and dtype == "fp32":
            raise InputError(f"attention backend {attn!r} needs --dtype fp16 or bf16 (use efficient or sdpa for fp32)")


@click.command("memory")
@models_option
@click.option("--attn", "attn_spec", default="eager,sdpa", show_default=True,
              help="Attention backend(s) for DeiT/ViT models; sdpa is predicted as the kernel an sm80+ GPU picks.")
@click.option("--scan", "scan_spec", default="auto", show_default=True,
              help="Scan backend(s) for Vim models; auto is resolved as on a CUDA machine with this environment.")
@click.option("--res", "res_spec", default="512,640,738,1024,1248", show_default=True,
              help="Resolutions: A..B (step 64), A..B:STEP, comma lists, or a mix.")
@click.option("--batch", default=64, show_default=True, type=int, help="Images per forward.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(list(DTYPES)),
              help="Weights and input dtype.")
@click.option("--head/--no-head", default=False, show_default=True,
              help="Include the classifier head (default: backbone only, as the Vim paper measured).")
@click.option("--card", default="h100-80gb", show_default=True,
              help=f"Card for the fits column: {', '.join(CARDS)}.")
@click.option("--preset", type=click.Choice(["paper"]),
              help="paper: the Vim paper's Fig. 1 (c) setting beside its numbers (fixes every option but --card/--out).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write the table as CSV here (with --preset paper also the Markdown table, as .md beside it).")
@click.pass_context
def command(ctx, models_spec, attn_spec, scan_spec, res_spec, batch, dtype, head, card, preset, out):
    """Predict the peak CUDA memory of one inference forward (torch.inference_mode) per model, kernel and
    resolution, without a GPU: the forward runs on fake CUDA tensors while every allocation is recorded,
    and the trace is replayed through a model of PyTorch's caching allocator. Columns (GiB = 2^30 B):
    weights; activations (input included); peak = torch.cuda.max_memory_allocated; reserved =
    max_memory_reserved. fits: reserved + a CUDA context of 0.5 GiB <= the card's memory."""
    if card not in CARDS:
        raise InputError(f"unknown card {card!r}; known: {', '.join(CARDS)}")
    if preset:
        fixed = [f"--{n.removesuffix('_spec')}" for n in _PRESET_FIXED
                 if ctx.get_parameter_source(n) is not click.core.ParameterSource.DEFAULT]
        if fixed:
            raise InputError(f"--preset {preset} fixes {', '.join(fixed)}; drop them")
        if out:
            check_writable(out)
        df = paper_comparison(card)
        markdown = paper_comparison_markdown(df)
        click.echo(markdown)
        if out:
            df.to_csv(out, index=False)
            Path(out).with_suffix(".md").write_text(markdown + "\n")
            click.echo(f"wrote {len(df)} rows to {out} and {Path(out).with_suffix('.md')}")
        return
    if batch < 1:
        raise InputError(f"--batch must be >= 1, got {batch}")
    res_list = resolutions(res_spec)
    pairs = variants(models_spec, attn_spec, scan_spec)
    _check_variants(pairs, dtype)
    if out:
        check_writable(out)
    rows = []
    for model, options in pairs:
        for res in res_list:
            pred = predict_memory(model, res, batch, dtype, head, **options)
            rows.append({**pred, "card": card, "card_gib": CARDS[card], "context_gib": CONTEXT_GIB,
                         "fits": fits(pred["mem_pred_reserved_gib"], card)})
    click.echo(format_table(rows, COLUMNS))
    if out:
        pd.DataFrame(rows, columns=COLUMNS).to_csv(out, index=False)
        click.echo(f"wrote {len(rows)} rows to {out}")
