"""The package's layers (docs/architecture.md): every import, at module level or inside a function, points down."""

import ast
import os

import pytest

import diffusers_pixnerd

PACKAGE_DIR = os.path.dirname(diffusers_pixnerd.__file__)


# Layer of each top-level part of the package; a module may import its own part or a part of a lower layer.
LAYERS = {
    "schedulers": 0,
    "loaders": 0,
    "utils": -1,  # helpers every part uses: number checks, file permissions, state-dict prefixes
    "models": 1,
    "pipelines": 2,
    "training": 3,
    "convert": 4,  # the command line
    "__init__": 5,
    # Tiny configurations for tests and fixture scripts, imported explicitly: above `__init__`, so that the package
    # never imports it (`import diffusers_pixnerd` stays free of test code); it may import any part below it.
    "testing_utils": 6,
}


def package_modules() -> dict[str, str]:
    """Dotted module name (relative to the package) -> file."""
    modules = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, PACKAGE_DIR)[: -len(".py")].split(os.sep)
                if rel[-1] == "__init__" and len(rel) > 1:
                    rel = rel[:-1]
                modules[".".join(rel)] = path
    return modules


MODULES = package_modules()


def imported_modules(module: str, path: str, known: set[str]) -> set[str]:
    """The package modules that `module` imports anywhere in its file (relative or absolute imports)."""
    is_package = path.endswith("__init__.py")
    parts = module.split(".") if module != "__init__" else []
    base = parts if is_package else parts[:-1]
    found = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = anchor + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "diffusers_pixnerd":
                prefix = node.module.split(".")[1:]
            else:
                continue
            targets = [prefix + [alias.name] for alias in node.names] + [prefix]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "diffusers_pixnerd"]
        for target in targets:
            name = ".".join(target) or "__init__"
            if name in known:  # `from .x import y` names module x.y only when y is a module
                found.add(name)
    found.discard(module)
    return found


IMPORTS = {m: imported_modules(m, p, set(MODULES)) for m, p in MODULES.items()}


def test_every_part_of_the_package_has_a_layer():
    assert {m.split(".")[0] for m in MODULES} <= set(LAYERS)
    # The walk finds what it should: the model layer uses the loaders, the CLI the pipelines.
    assert "loaders.official_checkpoint" in IMPORTS["models.transformer_pixnerd"]
    assert "pipelines.loading" in IMPORTS["convert"]


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    upward = sorted(
        target
        for target in IMPORTS[module]
        if target.split(".")[0] != module.split(".")[0] and layer(target) >= layer(module)
    )
    assert not upward, f"{module} (layer {layer(module)}) imports {upward}: a lower layer must not import a higher one"


def test_no_import_cycles():
    """Not even inside a layer (a function-level import would hide one at run time)."""
    state = {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(IMPORTS[module]):
            # A package's __init__ re-exports its modules: importing it from one of its own modules is the cycle
            # `pkg.mod -> pkg -> pkg.mod`, which we count too.
            if state.get(target) == "open":
                raise AssertionError(" -> ".join(stack + [module, target]))
            if target not in state:
                visit(target, stack + [module])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [])


def test_the_walk_sees_function_level_and_absolute_imports(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(
        "import torch\n"
        "def f():\n"
        "    from ..pipelines import pipeline_utils\n"
        "    import diffusers_pixnerd.training.loop\n"
        "from . import transformer_pixnerd\n"
    )
    known = set(MODULES) | {"training.loop"}
    found = imported_modules("models.fake", str(path), known)
    assert found == {"pipelines", "pipelines.pipeline_utils", "training.loop", "models", "models.transformer_pixnerd"}
