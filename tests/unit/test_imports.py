"""No vmm module imports a module that imports it back (STYLE.md habit 11).

The graph is built from the source with ``ast``: module-level and function-level
imports alike, relative imports resolved, ``from vmm import x`` counted as importing
vmm.x when x is a module, and a package's __init__ treated as a module of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

VMM = Path(__file__).resolve().parents[2] / "vmm"

#: Cycles in files this change does not own, each as its sorted modules; remove an
#: entry when its cycle is gone (the shared piece moved lower).
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_names(root: Path = VMM) -> dict[str, Path]:
    """Every module under ``root`` by dotted name (a package's __init__ by the package's)."""
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The vmm modules ``name`` (at ``path``) imports anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        # ``import vmm.a.b`` also runs vmm.a's __init__, but the edge that can close a
        # cycle is the one to the module named; the nearest existing module is taken.
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[:-(node.level - 1)]
                base = ".".join(base)
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in mods else module)
    return found


def import_graph(root: Path = VMM) -> dict[str, set[str]]:
    mods = module_names(root)
    return {name: {t for t in imports_of(name, path, mods) if t.startswith("vmm")}
            for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as
    one cycle through them, ``[a, b, ..., a]``."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(_one_cycle(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _one_cycle(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(comp)
    prev = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("not a cycle")  # pragma: no cover


def test_graph_sees_all_import_forms(tmp_path):
    pkg = tmp_path / "vmm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from vmm import b\n")
    (pkg / "b.py").write_text("def f():\n    import vmm.sub.c\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import X\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\nX = 1\n")
    g = import_graph(pkg)
    assert g["vmm.a"] == {"vmm.b"}
    assert g["vmm.b"] == {"vmm.sub.c"}
    assert g["vmm.sub"] == {"vmm.sub.c"}
    assert g["vmm.sub.c"] == {"vmm.a"}
    assert cycles(g) == [["vmm.a", "vmm.b", "vmm.sub.c", "vmm.a"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    stale = KNOWN_CYCLES - {tuple(sorted(set(c))) for c in found}
    assert not stale, f"known cycles that no longer exist (drop them from KNOWN_CYCLES): {stale}"
    found = [c for c in found if tuple(sorted(set(c))) not in KNOWN_CYCLES]
    assert not found, "import cycles (a module imports one that imports it back):\n" + \
        "\n".join(" -> ".join(c) for c in found)
