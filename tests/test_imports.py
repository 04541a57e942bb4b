"""No import cycles inside fedssl: the module graph, read from the source with ``ast``, is acyclic.

Every ``import`` / ``from ... import`` counts wherever it stands: at the top, inside a function, under
``if TYPE_CHECKING``. An import of a package's name from ``fedssl.a.b`` is an edge to ``fedssl.a.b``
(its ``__init__``), one of a submodule an edge to that module; the implicit import of the parent
packages does not count (a package's ``__init__`` may import its submodules).

Sizes, read the same way: no file of the package over :data:`MAX_FILE_LINES` lines, no function
(method, nested function) over :data:`MAX_FUNCTION_LINES` lines from its ``def`` to its last line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedssl"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module a dotted name lives in (``fedssl.a.b.Name`` -> ``fedssl.a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the fedssl modules it imports."""
    known = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                module = _resolve(target, known)
                if module is not None and module != name:
                    graph[name].add(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "fedssl"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from fedssl.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import x\n")  # function-level and relative
    (pkg / "c.py").write_text("import fedssl.a\n")
    assert cycles(import_graph(pkg)) == [["fedssl.a", "fedssl.sub.b"]]


def test_fedssl_has_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "fedssl.engines.loop" in graph["fedssl.engines.local"]
    found = cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")"
                       for c in found)
    assert not found, f"import cycles: {detail}"


def oversized(root: Path = PACKAGE) -> list[str]:
    """The files over MAX_FILE_LINES and the functions over MAX_FUNCTION_LINES, each named with its size."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root.parent).as_posix()
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            found.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
    return found


def test_the_size_checker_names_offenders(tmp_path: Path) -> None:
    pkg = tmp_path / "fedssl"
    pkg.mkdir()
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # def + this = one line too many
    (pkg / "long_function.py").write_text(f"def short():\n    pass\n\n\nclass C:\n    def long(self):\n{body}")
    (pkg / "long_file.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    (pkg / "fits.py").write_text("x = 1\n" * MAX_FILE_LINES)
    assert oversized(pkg) == [f"fedssl/long_file.py: {MAX_FILE_LINES + 1} lines",
                              f"fedssl/long_function.py:6 long(): {MAX_FUNCTION_LINES + 1} lines"]


def test_fedssl_files_and_functions_are_small() -> None:
    found = oversized()
    assert not found, (f"over {MAX_FILE_LINES} lines per file or {MAX_FUNCTION_LINES} per function "
                       f"(split along its jobs): {'; '.join(found)}")
