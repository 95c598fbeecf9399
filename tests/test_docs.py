"""The docs stay true to the code: the generated tables of docs/*.md match what ``python -m vimbench.docs``
writes now, and no doc or docstring names a module, attribute or file that does not exist."""
import ast
import importlib
import re
import subprocess
from pathlib import Path

import pytest

from vimbench import docs
from vimbench.commands import cli
from vimbench.kernels.plugins import GROUPS
from vimbench.rows.schema import SCHEMAS

ROOT = Path(__file__).resolve().parents[1]
TRACKED = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
"""The checkout's files, committed or not (ignored ones left out)."""
MARKDOWN = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "results" / "README.md"]
SOURCES = [ROOT / p for p in TRACKED if p.endswith(".py") and p.split("/")[0] in
           ("vimbench", "kernels", "baselines", "benchmarks")]
INSTALLED_AS = {"kernels/": "vimbench/kernels/", "baselines/": "vimbench/baselines/"}
"""Checkout folder -> the package path it installs as (pyproject's package-dir)."""
NOT_OURS = {"torch", "F", "nn", "np", "pd", "tl", "triton", "math", "time", "scipy", "stats", "click", "timm",
            "mamba_ssm", "self", "cls", "ctx", "out", "g", "features", "optimizer", "aten", "flop_counter",
            "environment", "model", "benchmark"}
"""First parts of dotted names in docstrings that are other libraries' modules or local variables (a model's
``model.train()``, pytest-benchmark's ``benchmark.pedantic``), not ours."""
EXTERNAL_FILES = {"benchmark.py", "triton/runtime/jit.py", "vim/models_mamba.py", "mamba_simple.py"}
"""Files of other projects that the docs name: timm's benchmark.py, Triton's JIT, hustvl/Vim's and mamba's model
files."""
FILE_SUFFIXES = ("py", "md", "json", "csv", "toml", "cpp", "h", "png", "pdf", "txt", "jsonl", "gz")
"""A short dotted name ending in one of these is a file name (``ref.py``, ``report.md``), not an attribute."""


def test_generated_docs_match_the_code():
    stale = [p.name for p in MARKDOWN if p.parent.name == "docs" and docs.regenerate(p.read_text()) != p.read_text()]
    assert not stale, f"{stale} differ from the code: run `python -m vimbench.docs` and commit the result"


def test_every_command_and_csv_kind_has_a_generated_table():
    blocks = {(m[2], m[3]) for p in MARKDOWN for m in docs.BLOCK.finditer(p.read_text())}
    wanted = {("options", name) for name in cli.commands} | {("schema", k) for k in [*SCHEMAS, "environment"]}
    assert not wanted - blocks, f"no generated table in docs/ for {sorted(wanted - blocks)}"


def _module_names() -> dict:
    """Dotted module name of every tracked package file, as installed ("vimbench.kernels.attention")."""
    names = {}
    for p in TRACKED:
        if p.endswith(".py") and p.split("/")[0] in ("vimbench", "kernels", "baselines"):
            installed = next((new + p[len(old):] for old, new in INSTALLED_AS.items() if p.startswith(old)), p)
            names[installed[:-3].replace("/", ".").removesuffix(".__init__")] = p
    return names


MODULES = _module_names()


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` is a module of ours, or an attribute chain under one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return _has_chain(importlib.import_module(".".join(parts[:i])), parts[i:])
    return False


def _short_resolves(dotted: str, here: str) -> bool:
    """A short dotted name in a docstring (``ref.selective_scan_ref``, ``Schema.key``): its first part is a name
    in the docstring's own module, a module of ours (by its last component) or a class of one, and the rest
    resolves."""
    first, *rest = dotted.split(".")
    own = importlib.import_module(here)
    if hasattr(own, first):
        return _has_chain(getattr(own, first), rest)
    full = [m for m in MODULES if m == first or m.endswith("." + first)]
    if first[0].isupper():  # a class of another module of ours (``Schema.setting``)
        return any(_has_chain(importlib.import_module(m), [first, *rest]) for m in MODULES)
    return any(_resolves(".".join([m, *rest])) for m in full)


def _has_chain(obj, attrs) -> bool:
    """Whether ``obj.a.b...`` exists; a dataclass field counts though it has no class attribute, and a last
    part ending in "_" stands for a prefix (``vimbench.register_*``)."""
    for i, a in enumerate(attrs):
        fields = getattr(obj, "__dataclass_fields__", {})
        if a.endswith("_") and i == len(attrs) - 1:
            return any(n.startswith(a) for n in dir(obj))
        if not hasattr(obj, a):
            return a in fields
        obj = getattr(obj, a)
    return True


def _file_exists(name: str) -> bool:
    """A file name or path: a tracked file ends with it (as in the checkout, or as installed)."""
    if name in EXTERNAL_FILES:
        return True
    for old, new in INSTALLED_AS.items():
        if name.startswith(new):
            name = old + name[len(new):]
    return any(p == name or p.endswith("/" + name) for p in TRACKED)


DOTTED = re.compile(r"(?<![\w.])vimbench(?:\.\w+)+")
SHORT = re.compile(r"``(?:[A-Za-z_]\w*\.)+[A-Za-z_]\w*")
FILE = re.compile(r"(?<![\w./-])[\w./-]*\w\.py\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.ClassDef))]
    return [d for n in nodes if (d := ast.get_docstring(n, clean=False))]


def _wrong_names(text: str, where: str, module: str | None) -> list[str]:
    wrong = [f"{where}: {d}" for d in DOTTED.findall(text) if d not in GROUPS and not _resolves(d)]
    wrong += [f"{where}: {f}" for f in FILE.findall(text) if not _file_exists(f)]
    if module:
        for name in (m[2:] for m in SHORT.findall(text)):
            if name.split(".")[0] not in NOT_OURS and name.split(".")[-1] not in FILE_SUFFIXES \
                    and not name.startswith("vimbench.") and not _short_resolves(name, module):
                wrong.append(f"{where}: {name}")
    return wrong


@pytest.mark.parametrize("path", SOURCES + MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_names_in_docs_and_docstrings_exist(path):
    rel = str(path.relative_to(ROOT))
    if path.suffix == ".md":
        text = path.read_text()
        wrong = _wrong_names(text, rel, None)
        wrong += [f"{rel}: link {t}" for t in LINK.findall(text)
                  if "://" not in t and not (path.parent / t).exists()]
    else:
        module = next((m for m, p in MODULES.items() if p == rel), None)
        source = path.read_text()
        wrong = [f"{rel}: {d}" for d in DOTTED.findall(source) if d not in GROUPS and not _resolves(d)]
        wrong += [w for d in _docstrings(path) for w in _wrong_names(d, rel, module) if w not in wrong]
    assert not wrong, "names that do not exist:\n" + "\n".join(wrong)
