"""Where this package runs from: a vimbench checkout (installed editable or not at all) or an installed wheel.

A checkout keeps ``kernels/`` and ``baselines/`` beside ``vimbench/``; pyproject.toml's ``package-dir`` installs
them as ``vimbench.kernels`` and ``vimbench.baselines`` (``MAPPED``). Without installation those names do not
resolve by themselves, so ``map_checkout_folders`` adds an import finder for them: ``python cli.py`` then runs
from a fresh clone.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

MAPPED = {"vimbench.kernels": "kernels", "vimbench.baselines": "baselines"}
"""Subpackage -> its folder in a checkout; the same mapping as pyproject.toml's ``package-dir``."""


def checkout_root() -> Path | None:
    """The checkout this package runs from (pyproject.toml and kernels/ beside vimbench/), else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file() else None


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds the packages of ``MAPPED`` in the checkout at ``root``."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, name, path=None, target=None):
        if name not in MAPPED:
            return None
        folder = self.root / MAPPED[name]
        return importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def map_checkout_folders() -> None:
    """In a checkout whose package has no ``kernels/`` of its own, appends a finder for ``MAPPED`` to
    ``sys.meta_path`` (after the path finder and an editable install's finder, which win when present);
    nothing when installed from a wheel or when the finder is there already."""
    root = checkout_root()
    if root is None or (Path(__file__).parent / "kernels").is_dir():
        return
    if not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
        sys.meta_path.append(_CheckoutFolders(root))
