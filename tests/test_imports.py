"""The package's modules import one another without cycles, lazy (function-level) imports included:
a cycle hidden inside a function still ties two modules into one unit of change."""

import ast
import os

import cones_jax

PACKAGE = os.path.dirname(os.path.abspath(cones_jax.__file__))


def module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def package_modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[module_name(path)] = path
    return out


def imported(tree: ast.AST, name: str, path: str, known: set[str]) -> set[str]:
    """The package modules that a module imports anywhere in its body."""
    is_package = path.endswith("__init__.py")
    base = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = base.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{parent}.{mod}" if mod else parent
            # `from pkg import mod` names a module; `from mod import fn` names the module itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import cones_jax.models.unet` -> that module
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("cones_jax"):
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    graph = {}
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            graph[name] = imported(ast.parse(f.read(), path), name, path, set(mods))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own submodules: Python loads the parent first anyway
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "cones_jax.sampling" in graph["cones_jax.guidance"]
    assert len(graph) > 15


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_private_names_cross_modules():
    mods = package_modules()
    bad = []
    for name, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cones_jax"):
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in _module_aliases(tree):
                    bad.append(f"{name}: {owner.id}.{node.attr}")
    assert not bad, bad


def _module_aliases(tree: ast.AST) -> set[str]:
    """Local names bound to cones_jax modules (`from cones_jax import x as y`, `import cones_jax.x as y`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cones_jax"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name.startswith("cones_jax")}
    return names


# docs/ARCHITECTURE.md: who may import whom. Each rule: modules under a prefix may import only
# package modules under the allowed prefixes (a prefix matches itself and its submodules).
LAYERS = {
    "cones_jax.errors": (),
    "cones_jax.fileio": ("cones_jax.errors",),
    "cones_jax.config": ("cones_jax.errors", "cones_jax.configs"),
    "cones_jax.models": ("cones_jax.models", "cones_jax.fileio", "cones_jax.errors"),
    "cones_jax.layout": ("cones_jax.layout", "cones_jax.models", "cones_jax.fileio", "cones_jax.errors"),
    "cones_jax.artifacts": ("cones_jax.fileio", "cones_jax.errors"),
    "cones_jax.sampling": ("cones_jax.models", "cones_jax.schedulers", "cones_jax.errors"),
}
DRIVERS = ("cones_jax.generate", "cones_jax.sample", "cones_jax.train", "cones_jax.cli", "cones_jax.demo",
           "cones_jax.app")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_modules_import_only_their_layers():
    graph = import_graph()
    broken = []
    for name, deps in graph.items():
        for prefix, allowed in LAYERS.items():
            if _under(name, prefix):
                broken += [f"{name} -> {d}" for d in deps
                           if not _under(d, prefix) and not any(_under(d, a) for a in allowed)]
    assert not broken, broken


def test_the_library_does_not_import_its_drivers():
    """The command lines, `generate` and the demo sit on top: nothing below imports them."""
    graph = import_graph()
    library = [n for n in graph if not any(_under(n, d) for d in DRIVERS)]
    broken = [f"{n} -> {d}" for n in library for d in graph[n] if any(_under(d, x) for x in DRIVERS)]
    assert not broken, broken
    assert not [n for n in graph if not _under(n, "cones_jax.demo")
                and any(_under(d, "cones_jax.demo") for d in graph[n])]
