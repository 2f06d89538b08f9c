"""The shape of the source tree: small files, imports without cycles, no private names
borrowed across modules, no warnings silenced wholesale."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = sorted(SRC.rglob("*.py"))
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in FILES}


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file, at any
    depth (imports inside functions count: they are edges too)."""
    found = []
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in MODULES:  # `from package import module`
                    found.append((target, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return [(m, names, line) for m, names, line in found if m.split(".")[0] == "qareg"]


def test_no_source_file_is_longer_than_400_lines():
    long = {str(p.relative_to(SRC)): n for p in FILES
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_import_graph_has_no_cycle():
    # Edges are the imports written in the files (a package's __init__ re-exporting its
    # modules is not a cycle with them, as in any Python package).
    graph = {name: {m for m, _, _ in imports(path) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles[:5]


def test_no_private_name_is_imported_from_another_module():
    borrowed = [f"{p.relative_to(SRC)}:{line} {m}.{n}" for p in FILES
                for m, names, line in imports(p) for n in names if n.startswith("_")
                and n != "__version__"]
    assert not borrowed, borrowed


@pytest.mark.parametrize("pattern", ["simplefilter(", 'filterwarnings("ignore"',
                                     "filterwarnings('ignore'"])
def test_no_warnings_are_silenced_wholesale(pattern):
    assert not [str(p) for p in FILES if pattern in p.read_text()]
