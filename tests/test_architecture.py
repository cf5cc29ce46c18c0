"""The package layout is the architecture: every import, at module level or inside a function, goes
from a higher layer to a lower one (or within a package), and no two modules import each other,
directly or around a cycle. Read from the source with `ast`, so lazy imports count too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "loraforge"

# Bottom to top. A package may import its own modules and any package on a lower line; packages on
# one line are siblings and import none of each other.
LAYERS = [
    {"core"},
    {"models", "grading", "sampling", "tasks"},
    {"inits"},
    {"adapters"},
    {"ship"},
    {"rl", "eval"},
    {"cli"},
    {"__init__", "__main__"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """loraforge modules PATH imports (absolute and relative, anywhere in the file)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("loraforge"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.startswith("loraforge"):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_layer():
    unknown = sorted({_package(m) for m in _graph()} - set(RANK))
    assert not unknown, f"packages with no layer in LAYERS: {unknown}; add them where they belong"


def test_imports_go_down_the_layers():
    wrong = []
    for module, deps in _graph().items():
        if module == "loraforge":  # the public API re-exports from every layer
            continue
        for dep in deps:
            a, b = _package(module), _package(dep)
            if a != b and dep != "loraforge" and RANK[b] >= RANK[a]:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    "source, expected",
    [
        (
            "from loraforge.core.errors import LoraforgeError",
            {"loraforge.core.errors", "loraforge.core.errors.LoraforgeError"},
        ),
        ("from . import checkpoint", {"loraforge.rl", "loraforge.rl.checkpoint"}),
        ("def f():\n    import loraforge.inits.linalg", {"loraforge.inits.linalg"}),
    ],
)
def test_import_reader_sees_every_form(tmp_path, source, expected):
    # The walker must see relative and function-level imports, or a cycle could hide from it.
    pkg = tmp_path / "loraforge" / "rl"
    pkg.mkdir(parents=True)
    f = pkg / "mod.py"
    f.write_text(source)
    assert _imports(f, tmp_path / "loraforge") == expected
