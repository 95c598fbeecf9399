"""The package's layers import one way: errors/kernels -> models -> config -> measure/count -> rows -> analysis
-> present -> gate/gpucheck -> commands. Read from the source (ast), nothing is imported. Only the vimbench/
folder is read: kernels/ and baselines/ are the checkout's own folders (an installed package holds them
inside; their lazy imports of measure and models are not checked here)."""
from __future__ import annotations

import ast
from pathlib import Path

import vimbench

LAYER = {"errors": 0, "layout": 0, "kernels": 0, "baselines": 1, "models": 1, "config": 2, "measure": 3,
         "count": 3, "rows": 4, "analysis": 5, "present": 6, "gate": 7, "gpucheck": 7, "commands": 8, "docs": 9,
         "__init__": 9}


def upward_edges(root: Path) -> set[tuple[str, str]]:
    """(file, module) for each import of a vimbench module in a higher layer than the file's."""
    edges = set()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in ("kernels", "baselines"):
            continue
        layer = LAYER.get(parts[0])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"vimbench.{a.name}" for a in node.names if node.module == "vimbench"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")
                if top[0] == "vimbench" and len(top) > 1 and LAYER.get(top[1], -1) > layer:
                    edges.add((f"vimbench/{path.relative_to(root).as_posix()}", name))
    return edges


def test_no_module_imports_a_higher_layer():
    root = Path(vimbench.__file__).parent
    assert {p.name for p in root.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()} \
        - {"kernels", "baselines"} <= {f"{k}.py" for k in LAYER} | set(LAYER)  # every top-level module has a layer
    assert upward_edges(root) == set()
