"""The package's layers: every import points down, so no module imports another in a circle.

The order below is the one the README's "Layout of the code" describes, bottom first.  Modules
on one line are peers: they may not import each other.  A new module joins a line here (the
test fails until it does).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

import scatterlist

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "scatterlist"
#: Where the package is imported from (the source tree in editable mode, site-packages after
#: ``pip install .``, where the built extension is).
INSTALLED = Path(scatterlist.__file__).resolve().parent

LAYERS = [
    ["errors"],
    ["constants"],
    ["_util"],
    ["_contract"],
    ["model.cargs"],
    ["model.physmem"],
    ["model.table", "model.iova"],
    ["model.iommu"],
    ["model.dma"],
    ["model.engine"],
    ["model", "_native"],
    ["_engine"],
    ["debug"],
    ["memory"],
    ["table", "iommu"],
    ["device"],
    ["dma"],
    ["sgtable", "faults"],
    ["bench"],
    ["__init__"],
    ["__main__"],
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Set[str]:
    """Package modules a file imports, at any depth (functions and TYPE_CHECKING blocks
    count: a cycle hidden in a function is still a cycle in the design)."""
    name = module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and (
                    node.module == "scatterlist" or node.module.startswith("scatterlist.")
                ):
                    base = node.module.split(".")[1:]
                else:
                    continue
            else:
                base = package[: len(package) - (node.level - 1)] + (
                    node.module.split(".") if node.module else []
                )
            target = ".".join(base)
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                found.add(candidate if candidate in LEVEL else (target or "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "scatterlist":
                    found.add("__init__")
                elif alias.name.startswith("scatterlist."):
                    found.add(alias.name.split(".", 1)[1])
    found.discard(name)
    return {module for module in found if module in LEVEL or module == "_sg"}


def graph() -> Dict[str, Set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    assert set(graph()) == set(LEVEL), "a module is missing from LAYERS (or LAYERS is stale)"


def test_every_import_points_down():
    wrong = [
        f"{module} (layer {LEVEL[module]}) imports {target} (layer {LEVEL[target]})"
        for module, targets in graph().items()
        for target in sorted(targets)
        if target in LEVEL and LEVEL[target] >= LEVEL[module]
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    edges = graph()
    state: Dict[str, int] = {}

    def visit(module: str, path: list) -> None:
        state[module] = 1
        for target in edges.get(module, ()):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in edges:
        if module not in state:
            visit(module, [])


def test_only_native_module_touches_the_extension():
    touching = {module for module, targets in graph().items() if "_sg" in targets}
    assert touching == {"_native"}


@pytest.mark.parametrize(
    "module", sorted(name for name in LEVEL if name not in ("__init__", "__main__"))
)
def test_module_imports_alone(module: str):
    """Each module imports with only what it needs loaded (the packages' __init__ files, which
    load everything below them, are bypassed unless they are the module tested): an
    import-time circle fails here whatever the order."""
    stubs = ["scatterlist"] + ([] if module == "model" else ["scatterlist.model"])
    code = (
        "import importlib, sys, types\n"
        f"for name in {stubs!r}:\n"
        "    pkg = types.ModuleType(name)\n"
        f"    pkg.__path__ = [{str(INSTALLED)!r} + name[len('scatterlist'):].replace('.', '/')]\n"
        "    sys.modules[name] = pkg\n"
        f"importlib.import_module('scatterlist.{module}')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('scatterlist.'))\n"
        "print(' '.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"SCATTERLIST_ENGINE": "model", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    loaded = {name.split(".", 1)[1] for name in result.stdout.split()} - {"model"}
    above = {name for name in loaded if name in LEVEL and LEVEL[name] > LEVEL[module]}
    assert not above, f"importing {module} loaded modules above it: {sorted(above)}"
