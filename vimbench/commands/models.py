"""`vimbench models`: the registered models with family, parameter count and options, and the plug-in backends."""
from __future__ import annotations

import click
import torch

from vimbench.commands.options import check_resolution
from vimbench.kernels.attention import ATTENTION_PLUGINS
from vimbench.kernels.selective_scan.backends import scan_plugins
from vimbench.models.registry import DEFAULT_OPTIONS, count_params, create_model, list_models, model_entry
from vimbench.present.tables import format_table


@click.command("models")
@click.option("--res", default=224, show_default=True, help="Resolution at which parameters are counted.")
def command(res):
    """List the registered models: name, family, parameters at RES, options (default first), then the
    scan and attention backends other packages registered (entry points or vimbench.register_*_backend), with
    whether each can train: a scan backend's registered backward, or forward-only; attention's by autograd.

    Any timm model also works by name as timm:<model_name>.
    """
    check_resolution(res)
    rows = []
    for name in list_models():
        entry = model_entry(name)
        with torch.device("meta"):
            params = count_params(create_model(name, img_size=res))
        options = "; ".join(f"{k}={DEFAULT_OPTIONS[entry.family][k]} ({'|'.join(values())})"
                            for k, values in entry.options.items())
        rows.append(dict(model=name, family=entry.family, params=params, options=options,
                         description=entry.description))
    click.echo(format_table(rows, ["model", "family", "params", "options", "description"]))
    plugins = [dict(kind=kind, backend=p.name, package=p.package or "(direct call)", devices=",".join(p.devices),
                    memory_prediction="yes" if p.fake else "unavailable",
                    backward=("yes" if p.backward else "forward-only") if kind == "scan" else "autograd",
                    description=p.description)
               for kind, registry in (("scan", scan_plugins()), ("attention", ATTENTION_PLUGINS))
               for p in registry.values()]
    if plugins:
        click.echo("\nplug-in backends:")
        click.echo(format_table(plugins, ["kind", "backend", "package", "devices", "memory_prediction", "backward",
                                          "description"]))
