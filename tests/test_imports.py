"""Imports point one way: bundle <- model_src <- (handlers, train) <- deploy <- bench, and deploy/ has no
cycles.

Every .py of those packages is read with `ast`: imports at module level and inside functions alike (an import
hidden in a function still ties the layers together). Only `if TYPE_CHECKING:` blocks are left out: they never
run, and annotations may name a class of a module that calls this one."""

import ast
import os

from bundle.settings import ROOT

# A package may import itself and the packages of lower layers; handlers and train share a layer and must not
# import each other (what ships with an archive never needs training code, and training never needs
# TorchServe's).
LAYERS = {"bundle": 0, "model_src": 1, "handlers": 2, "train": 2, "deploy": 3, "bench": 4}


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every import that runs, anywhere in the module; `from a import b` gives a.b."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if is_type_checking(node):
            todo.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        todo.extend(ast.iter_child_nodes(node))
    return found


def modules(root: str) -> dict[str, str]:
    """{dotted module name: path} of every .py in the layered packages under `root`."""
    found = {}
    for package in LAYERS:
        for folder, dirs, files in os.walk(os.path.join(root, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def graph(root: str) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the layered modules it imports, violations of the layer order as 'path:line: message')."""
    mods = modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    wrong = []
    for mod, path in sorted(mods.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        here = mod.split(".")[0]
        for line, name in imported(tree):
            there = name.split(".")[0]
            if there not in LAYERS:
                continue  # the standard library, third parties, tests
            target = next((t for t in (name, name.rsplit(".", 1)[0]) if t in mods), None)
            if target and target != mod:
                edges[mod].add(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                rel = os.path.relpath(path, root)
                wrong.append(f"{rel}:{line}: {here} imports {name} ({there} is not below {here})")
    return edges, wrong


def cycles(edges: dict[str, set[str]], within: str) -> list[list[str]]:
    """The import cycles among the modules of package `within` (one per strongly connected component)."""
    nodes = {m for m in edges if m.split(".")[0] == within}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(m: str):  # Tarjan's algorithm
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in sorted(edges[m] & nodes):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                component.append(n)
                if n == m:
                    break
            if len(component) > 1 or m in edges[m]:
                found.append(sorted(component))

    for m in sorted(nodes):
        if m not in index:
            visit(m)
    return found


def test_imports_point_down_the_layers():
    _, wrong = graph(ROOT)
    order = "bundle <- model_src <- (handlers, train) <- deploy <- bench"
    assert not wrong, f"imports against {order}:\n" + "\n".join(wrong)


def test_deploy_has_no_import_cycles():
    edges, _ = graph(ROOT)
    assert not cycles(edges, "deploy"), f"import cycles in deploy/: {cycles(edges, 'deploy')}"


def test_the_checks_catch_a_reversed_import_and_a_cycle(tmp_path):
    """The checks themselves, on a small tree: a reversed import hidden in a function, a cycle, a type-only
    one."""
    files = {
        "bundle/settings.py": "import os\n",
        "train/data.py": "def f():\n    from deploy import settings\n",  # reversed, and hidden in a function
        "handlers/h.py": "import train.data\n",  # same layer
        "deploy/a.py": "from deploy import b\n",
        "deploy/b.py": "from deploy.a import x\n",  # a <-> b
        "deploy/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from deploy.d import T\n",
        # c's is type-only: no cycle
        "deploy/d.py": "from deploy import c\nfrom bundle.settings import ROOT\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges, wrong = graph(str(tmp_path))
    assert wrong == [
        "handlers/h.py:1: handlers imports train.data (train is not below handlers)",
        "train/data.py:2: train imports deploy.settings (deploy is not below train)",
    ]
    assert cycles(edges, "deploy") == [["deploy.a", "deploy.b"]]
