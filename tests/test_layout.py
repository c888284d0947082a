"""The package's layers, checked from the source: each subpackage imports only itself and those below it,
and no loss module imports another (the ``sharded_`` wrappers excepted: they wrap the cross-entropies)."""

from __future__ import annotations

import ast
import pathlib

import jaxsce

PACKAGE = pathlib.Path(jaxsce.__file__).parent
#: Bottom to top.
LAYERS = ["_base", "_engine", "_api", "_tiers", "_losses"]
WRAPPERS = {"_sharded": {"_cross_entropy", "_linear"}}


def _imports(path: pathlib.Path) -> set[tuple[str, str]]:
    """``(layer, module)`` of every jaxsce module that ``path`` imports (relative imports)."""
    own = path.parent.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        parts = (node.module or "").split(".") if node.module else []
        if node.level == 1:  # from . import x / from ._x import y: the same layer
            layer, rest = own, parts
        else:  # from .._layer import x / from .._layer._x import y
            layer, rest = parts[0], parts[1:]
        modules = rest[:1] if rest else [alias.name for alias in node.names]
        found |= {(layer, m) for m in modules}
    return found


def _modules():
    return [p for layer in LAYERS for p in sorted((PACKAGE / layer).glob("_*.py")) if p.name != "__init__.py"]


def test_every_module_lives_in_a_layer():
    assert not [p.name for p in PACKAGE.glob("_*.py") if p.name != "__init__.py"]
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name.startswith("_")} - {"__pycache__"} == set(LAYERS)
    assert len(_modules()) >= 25


def test_each_layer_imports_only_itself_and_those_below():
    wrong = []
    for path in _modules():
        own = LAYERS.index(path.parent.name)
        for layer, module in _imports(path):
            assert layer in LAYERS, (path, layer)
            if LAYERS.index(layer) > own:
                wrong.append(f"{path.parent.name}/{path.name} imports {layer}.{module}")
    assert not wrong, wrong


def test_no_loss_module_imports_another():
    wrong = []
    for path in sorted((PACKAGE / "_losses").glob("_*.py")):
        for layer, module in _imports(path):
            if layer == "_losses" and module not in WRAPPERS.get(path.stem, set()):
                wrong.append(f"{path.name} imports {module}")
    assert not wrong, wrong
