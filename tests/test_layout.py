"""The package's shape, checked: the data flow visible in ``ls peftlab/``, no import cycles, private names stay
private, modules small enough to read, and a training loop that reads in one sitting (issue 17)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peftlab"
MAX_ENTRIES = 14
MAX_MODULE_LINES = 500
LOOP_MODULE = PACKAGE / "trainer" / "loop.py"
MAX_LOOP_LINES = 300


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, name: str) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every import of peftlab code in ``path``."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "peftlab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "peftlab":
                found.append((module, [a.name for a in node.names], node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the peftlab modules importing it runs: every import (top-level or in a function), plus the
    parent packages Python initialises first, plus ``from pkg import submodule``."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for module, names, _ in _imports(path, name):
            targets = {module} | {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
            for target in targets:
                parts = target.split(".")
                for i in range(2, len(parts) + 1):  # peftlab.a.b also runs peftlab.a/__init__
                    dep = ".".join(parts[:i])
                    if dep in modules and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_imports_of_another_modules_private_names():
    bad = []
    modules = _modules()
    for name, path in modules.items():
        for module, names, line in _imports(path, name):
            if module == name:
                continue
            bad += [f"{path.relative_to(PACKAGE.parent)}:{line}: {module}.{n}" for n in names if n.startswith("_")]
    assert not bad, "private names imported from other modules:\n" + "\n".join(bad)


def test_modules_are_small_enough_to_read():
    big = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(big)


def test_the_top_level_shows_the_data_flow():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert len(entries) <= MAX_ENTRIES, entries
    for stage in ("recipe", "model", "adapters", "data", "objectives", "engine", "trainer", "checkpoint",
                  "metrics", "evaluation", "export"):
        assert (PACKAGE / stage / "__init__.py").is_file(), f"peftlab/{stage}/ is missing"


def test_the_training_loop_reads_in_one_sitting():
    source = LOOP_MODULE.read_text()
    assert len(source.splitlines()) <= MAX_LOOP_LINES
    tree = ast.parse(source)
    local = [n.lineno for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not local, f"function-local imports in {LOOP_MODULE.name} at lines {local}"
    # no branching on the engine (an interface) or on the task (the objective carries it)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("hasattr", "isinstance"):
            assert "engine" not in ast.unparse(node), f"line {node.lineno}: {ast.unparse(node)}"
        if isinstance(node, ast.Compare):
            text = ast.unparse(node)
            assert ".task" not in text and "deepspeed" not in text, f"line {node.lineno}: {text}"


def test_messages_go_through_logging():
    """print() is for a command's own output (the CLI), never for messages from the library."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):  # a call, or print handed on as a callback
            if isinstance(node, ast.Name) and node.id == "print":
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, "print() outside the CLI:\n" + "\n".join(offenders)


@pytest.mark.parametrize("sub", ["recipe", "model", "adapters", "data", "objectives", "engine", "trainer",
                                 "checkpoint", "metrics", "evaluation", "export"])
def test_tests_mirror_the_package(sub):
    """Every module of a subpackage has its test file: tests/<subpackage>/test_<module>.py."""
    tests = Path(__file__).resolve().parent / sub
    missing = [p.stem for p in (PACKAGE / sub).glob("*.py") if p.name != "__init__.py"
               and not (tests / f"test_{p.stem}.py").is_file()]
    assert not missing, f"tests/{sub}/ has no test file for: {', '.join(missing)}"
