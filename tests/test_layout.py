"""The package's imports go one way, down (README, Layout): no cycle, function-level imports included, and
no layer imports from one above it."""
from __future__ import annotations

import ast
import pathlib

import council_fast

ROOT = pathlib.Path(council_fast.__file__).parent
# Lower layers first; a module may import only from its own layer or below.
LAYERS = [
    ("reference", "config", "version", "fileio", "images", "checkpoint", "runtime", "threads", "ops", "data",
     "colour_distance", "retention", "evalrecord", "runlog"),
    ("lowering", "cuda_graphs", "metrics"),
    ("training", "parity", "train_monitor"),
    ("inference", "conversion", "convert_ranks", "facecrop", "report", "bench", "devtools"),
    ("serving",),
    ("cli", "__main__", "__init__"),
]


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path, root: pathlib.Path = ROOT) -> set[str]:
    """Every council_fast module ``path`` imports, at any depth of its code."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("council_fast")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("council_fast"):
                found |= {f"{base}.{a.name}" for a in node.names}  # a name that is no module: its package
    return found


def _graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in imports_of(path, root):
            while imported not in files and "." in imported:  # `from pkg import name` of a non-module name
                imported = imported.rpartition(".")[0]
            if imported in files and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module}: not in any layer of tests/test_layout.py")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_go_down():
    wrong = [f"{a} imports {b}" for a, targets in _graph().items() for b in targets
             if a != "council_fast" and _layer(b) > _layer(a)]
    assert not wrong, wrong


def test_the_check_sees_function_level_and_relative_imports(tmp_path):
    fake = tmp_path / "council_fast"
    for folder in (fake, fake / "ops", fake / "serving"):
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").write_text("")
    (fake / "ops" / "registry.py").write_text("")
    (fake / "serving" / "app.py").write_text("")
    probe = fake / "ops" / "probe.py"
    probe.write_text("from . import registry\n\ndef f():\n    from ..serving import app\n")
    assert imports_of(probe, fake) == {"council_fast.ops.registry", "council_fast.serving.app"}
    graph = _graph(fake)
    assert graph["council_fast.ops.probe"] == {"council_fast.ops.registry", "council_fast.serving.app"}
    assert _layer("council_fast.serving.app") > _layer("council_fast.ops.probe")  # what test_imports_go_down flags
