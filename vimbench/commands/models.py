"""`vimbench models`: the registered models with family, parameter count and options."""
from __future__ import annotations

import click
import torch

from vimbench.commands.options import check_resolution
from vimbench.models.registry import DEFAULT_OPTIONS, count_params, create_model, list_models, model_entry
from vimbench.present.tables import format_table


@click.command("models")
@click.option("--res", default=224, show_default=True, help="Resolution at which parameters are counted.")
def command(res):
    """List the registered models: name, family, parameters at RES, options (default first).

    Any timm model also works by name as timm:<model_name>.
    """
    check_resolution(res)
    rows = []
    for name in list_models():
        entry = model_entry(name)
        with torch.device("meta"):
            params = count_params(create_model(name, img_size=res))
        options = "; ".join(f"{k}={DEFAULT_OPTIONS[entry.family][k]} ({'|'.join(v)})"
                            for k, v in entry.options.items())
        rows.append(dict(model=name, family=entry.family, params=params, options=options,
                         description=entry.description))
    click.echo(format_table(rows, ["model", "family", "params", "options", "description"]))
