"""Check fisherjax's import structure: no cycles, and no private name used across modules.

    python3 scripts/import_graph.py            # report; exit 1 on a cycle or a private import
    python3 scripts/import_graph.py --edges    # also print every fisherjax → fisherjax import

Reads the source with :mod:`ast` (nothing is imported). Every import counts, including those
inside functions — an import moved into a function to dodge a cycle is still a cycle here.

* A cycle is a strongly connected component of more than one module in the graph of imports
  between fisherjax modules (``from fisherjax import io`` is an edge to ``fisherjax.io``; the
  implicit import of a module's parent package is not an edge).
* A private import is ``from M import _x`` or ``M._x`` where ``M`` is a fisherjax module and
  ``_x`` is not itself a module: a private name is used only inside its own module. Importing a
  module that is private by purpose (``from fisherjax.analysis.qkov import _looped``) and using
  its public names is how plumbing is shared. Checked in fisherjax/, tests/, benchmarks/ and
  scripts/.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fisherjax"


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package."""
    out = {}
    for file in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(file.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = file
    return out


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``current``)."""
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, file: Path, modules: dict[str, Path]) -> tuple[set[str], list[tuple[int, str]]]:
    """The fisherjax modules ``file`` imports, and its private uses ``(line, text)``."""
    tree = ast.parse(file.read_text(), str(file))
    is_package = file.name == "__init__.py"
    edges, private = set(), []
    aliases: dict[str, str] = {}  # local name -> fisherjax module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE and alias.name in modules:
                    edges.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, name, is_package)
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in modules:  # a submodule
                    edges.add(full)
                    aliases[alias.asname or alias.name] = full
                    continue
                if source in modules:
                    edges.add(source)
                if alias.name.startswith("_") and not alias.name.startswith("__") and source != name:
                    private.append((node.lineno, f"from {source} import {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            attr = node.attr
            target = aliases[node.value.id]
            if attr.startswith("_") and not attr.startswith("__") and f"{target}.{attr}" not in modules and target != name:
                private.append((node.lineno, f"{node.value.id}.{attr} ({target})"))
    return edges, private


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one member (the cycles)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", action="store_true", help="print every import between fisherjax modules")
    args = parser.parse_args(argv)
    modules = module_files()
    graph, problems = {}, []
    for name, file in modules.items():
        edges, private = imports_of(name, file, modules)
        graph[name] = {e for e in edges if e != name}
        problems += [f"{file.relative_to(ROOT)}:{line}: private name used across modules: {text}" for line, text in private]
    for folder in ("tests", "benchmarks", "scripts"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            _, private = imports_of(f"{folder}.{file.stem}", file, modules)
            problems += [f"{file.relative_to(ROOT)}:{line}: private name used across modules: {text}" for line, text in private]
    cycles = strongly_connected(graph)
    if args.edges:
        for name in sorted(graph):
            for target in sorted(graph[name]):
                print(f"{name} -> {target}")
    for cycle in cycles:
        problems.append("import cycle: " + " <-> ".join(cycle))
    n_edges = sum(len(v) for v in graph.values())
    print(f"{len(modules)} modules, {n_edges} imports between them, {len(cycles)} cycle(s), "
          f"{len(problems) - len(cycles)} private import(s)")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
