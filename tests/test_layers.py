"""The package's layers, read from its source: no import circle, and ops/ is torch math only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eaft_plugins"
FRAMEWORKS = ("transformers", "llamafactory", "swift", "trl", "megatron", "deepspeed", "peft", "accelerate")


def modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict) -> set:
    """Every module this one imports, at module level or inside a function (a lazy import is an import too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    return found


def graph() -> dict:
    known = modules()
    return {name: {m for m in imports(name, path, known) if m in known and m != name} for name, path in known.items()}


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_two_modules_import_each_other():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_ops_import_no_framework():
    known = modules()
    for name, path in known.items():
        if name.startswith("eaft_plugins.ops"):
            outside = {m for m in imports(name, path, known) if m.split(".")[0] in FRAMEWORKS}
            assert not outside, f"{path.name} imports {sorted(outside)}: ops/ is torch math only"
            inside = {m for m in imports(name, path, known) if m.startswith("eaft_plugins.")
                      and not m.startswith(("eaft_plugins.ops", "eaft_plugins.options", "eaft_plugins.stats"))}
            assert not inside, f"{path.name} imports {sorted(inside)}: ops/ sits below every other layer"
