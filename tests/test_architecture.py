"""The import graph of ``src/deltatune``: imports point down the layers, never up, never in a circle.

Layers, lowest first (STYLE.md): config -> core -> io -> methods -> peft_model (PeftModel,
get_peft_model) -> api (PEFT's helper functions, built on PeftModel) -> integrations -> cli. Every ``from deltatune...``/relative import counts, including the ones
inside functions (a lazy import up the layers is still a dependency up the layers). A *leaf* — a
module that imports nothing from deltatune (the version, the method table, the atomic file
writer), or only other leaves — may be imported from any layer: it cannot close a circle.
"""

from __future__ import annotations

import ast
import os

import deltatune

SRC = os.path.dirname(deltatune.__file__)
LAYERS = ("config", "core", "io", "methods", "peft_model", "api", "integrations", "cli")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, SRC)[: -len(".py")].replace(os.sep, ".")
    return "deltatune" if rel == "__init__" else "deltatune." + rel.removesuffix(".__init__")


def layer_of(module: str) -> int:
    parts = module.split(".")[1:]
    top = parts[0] if parts else "__init__"
    if top == "__init__":  # the package gathers the public API from every layer below the integrations
        return LAYERS.index("api")
    return LAYERS.index(top) if top in LAYERS else LAYERS.index("config")


def imports_of(path: str) -> set[str]:
    """Every deltatune module ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "deltatune")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "deltatune":
                continue
            for alias in node.names:  # "from . import _device" names a module, not an attribute
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


PATHS = {module_name(os.path.join(d, f)): os.path.join(d, f)
         for d, _, files in os.walk(SRC) for f in files if f.endswith(".py")}
MODULES = set(PATHS)
GRAPH = {m: imports_of(p) for m, p in PATHS.items()}
LEAVES: set[str] = set()
while True:  # bottom up: a module importing only leaves is a leaf too
    more = {m for m, deps in GRAPH.items() if m not in LEAVES and deps <= LEAVES}
    if not more:
        break
    LEAVES |= more


def test_the_graph_is_read():
    assert "deltatune.core.layer" in GRAPH["deltatune.core.tuner"]
    assert "deltatune.methods._device" in GRAPH["deltatune.methods._bone_ops"]
    assert {"deltatune._version", "deltatune.core.registry"} <= LEAVES


def test_no_import_up_the_layers():
    upward = sorted(
        f"{m} ({LAYERS[layer_of(m)]}) imports {d} ({LAYERS[layer_of(d)]})"
        for m, deps in GRAPH.items() if m != "deltatune"  # the package's __init__ gathers the public API
        for d in deps if d not in LEAVES and layer_of(d) > layer_of(m)
    )
    assert not upward, "\n".join(upward)


def test_no_circle():
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if d == "deltatune":
                continue
            if state.get(d) == 1:
                cycle.extend(stack[stack.index(d):] + [d] if d in stack else [m, d])
                return True
            if d not in state and visit(d, stack + [d]):
                return True
        state[m] = 2
        return False

    for m in sorted(GRAPH):
        if m not in state and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)
