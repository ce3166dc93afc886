"""The package's modules import one another in one direction (a DAG), and each imports on its
own in a fresh interpreter (no module relies on another having been imported first)."""
import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spinal_ops"


def module_names() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = module_names()


def imported_modules(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source (inside functions too:
    a function-local import is how a cycle hides)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import launch` imports a module, `from .x import y` a name
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def test_imports_form_a_dag():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target] if target in trail else [name, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_a_cycle(tmp_path, monkeypatch):
    # The DAG test must fail on a cycle hidden in a function-local import.
    (tmp_path / "a.py").write_text("from . import cycle_b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .cycle_a import x\n")
    monkeypatch.setitem(MODULES, "spinal_ops.cycle_a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "spinal_ops.cycle_b", tmp_path / "b.py")
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_imports_form_a_dag()


def import_alone(name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"import importlib; importlib.import_module({name!r})"],
                          capture_output=True, text=True, timeout=300, cwd=PACKAGE.parent,
                          env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")})


def test_every_module_imports_on_its_own():
    # __main__ modules run a program when imported; they are exercised by their own tests.
    names = [name for name in MODULES if not name.endswith("__main__")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(names, pool.map(import_alone, names)))
    failed = {name: result.stderr.strip().splitlines()[-1] for name, result in results.items() if result.returncode}
    assert not failed, failed
