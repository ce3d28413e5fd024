"""The command line is a shell over the library: no hf_unlearn module but cli.py and __main__.py imports cli.py
(an import there closed the circle cli → training → cli, and put library logic where only the CLI finds it)."""

import ast
from pathlib import Path

import hf_unlearn

PACKAGE = Path(hf_unlearn.__file__).resolve().parent
ENTRY_POINTS = {"cli.py", "__main__.py"}


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """Every module an import statement in `path` names, at any depth (imports inside functions included), with
    relative imports resolved and `from package import name` counted as `package.name` too."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_imported_modules_resolves_relative_and_nested_imports(tmp_path):
    fake = tmp_path / "hf_unlearn"
    (fake / "solvers").mkdir(parents=True)
    (fake / "solvers" / "x.py").write_text(
        "import json\nfrom .. import cli\n\ndef f():\n    from ..cli import main\n    from . import dense\n"
    )
    assert imported_modules(fake / "solvers" / "x.py", fake) == {
        "json",
        "hf_unlearn",
        "hf_unlearn.cli",
        "hf_unlearn.cli.main",
        "hf_unlearn.solvers",
        "hf_unlearn.solvers.dense",
    }


def test_no_library_module_imports_the_cli():
    files = [
        p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).as_posix() not in ENTRY_POINTS
    ]
    assert len(files) > 20  # the package was found
    offending = {
        p.relative_to(PACKAGE).as_posix(): sorted(
            m for m in imported_modules(p) if m.split(".")[:2] == ["hf_unlearn", "cli"]
        )
        for p in files
    }
    assert {path: names for path, names in offending.items() if names} == {}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search of `graph` (module → modules it imports) closes."""
    found, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                found.append(stack[stack.index(other) :] + [other])
            elif other not in state:
                visit(other, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def test_no_import_cycles_between_modules():
    """No module imports, at any depth, a module that imports it back (io ↔ training did, through imports inside
    functions). Package `__init__` files re-export their modules and are left out of the graph."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    files = {module_name(p, PACKAGE): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    graph = {m: {i for i in imported_modules(p) if i in files and i != m} for m, p in files.items()}
    assert import_cycles(graph) == []
