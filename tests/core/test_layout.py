"""The architecture, checked: the packages form layers, no module imports itself back (also
through imports inside functions), ``ressl/`` needs neither the CLI nor ONNX, every module's
``__all__`` names what it defines, and modules and functions stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Installed names of the three top-level packages (cli/ and export/ install as ressl.cli and
#: ressl.export, see pyproject.toml).
PACKAGES = {"ressl": ROOT / "ressl", "ressl.cli": ROOT / "cli", "ressl.export": ROOT / "export"}
#: ressl's sub-packages from the bottom up: each imports only those below it and the
#: top-level modules (errors, rules, functional, schedules, device, distributed, ...).
LAYERS = ("views", "data", "config", "models", "runs", "eval", "training")
#: Item 7 of the architecture issue: no module over ~450 lines and no function over ~50
#: lines of code (its docstring, comments and blank lines aside).
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 50


def _modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


MODULES = _modules()


def _runtime_imports(module: str, path: Path) -> set[str]:
    """The modules of ours that ``module`` imports when it runs (at the top or inside a
    function; ``if TYPE_CHECKING:`` blocks aside), each as the module it resolves to."""
    tree = ast.parse(path.read_text())
    checking = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                found.add(name)
    return found


IMPORTS = {m: _runtime_imports(m, p) for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in IMPORTS[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in MODULES:
        if v not in index:
            visit(v)
    return groups


def test_no_module_imports_itself_back():
    assert _cycles() == []


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ressl" and parts[1] in LAYERS else None


def test_the_sub_packages_form_layers():
    assert {p.name for p in (ROOT / "ressl").iterdir() if (p / "__init__.py").is_file()} == set(
        LAYERS
    ), "a new sub-package takes its place in LAYERS"
    upward = []
    for module, imported in IMPORTS.items():
        if module.startswith(("ressl.cli", "ressl.export")) or module in (
            "ressl",
            "ressl.__main__",
        ):
            continue  # the public facade, the CLI and serving sit above the library
        mine = _layer(module)
        for other in imported:
            theirs = _layer(other)
            if other.startswith(("ressl.cli", "ressl.export")):
                upward.append(f"{module} -> {other}")
            elif theirs is not None and theirs != mine:
                if mine is None or LAYERS.index(theirs) > LAYERS.index(mine):
                    upward.append(f"{module} -> {other}")
    assert upward == [], "\n".join(upward)


def test_the_library_needs_neither_the_cli_nor_onnx():
    found = []
    for module, path in MODULES.items():
        if module.startswith(("ressl.cli", "ressl.export")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for name in names:
                    if name.split(".")[0] in ("typer", "click", "onnx", "onnxruntime"):
                        found.append(f"{module}: {name}")
    assert found == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_name_in_a_modules_all_is_defined_there(module):
    tree = ast.parse(MODULES[module].read_text())
    listed: list[str] = []
    defined: set[str] = set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Name) and t.id == "__all__" and isinstance(node.value, ast.List):
                listed = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
        defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
    if "__getattr__" in defined:  # a lazy package (PEP 562): test_api.py resolves its names
        return
    assert len(listed) == len(set(listed)), "a name listed twice"
    assert [n for n in listed if n not in defined] == []


def _code_lines(lines: list[str], node: ast.AST) -> int:
    body = getattr(node, "body", [])
    doc: set[int] = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            doc = set(range(body[0].lineno, body[0].end_lineno + 1))  # type: ignore[operator]
    return sum(
        1
        for i in range(node.lineno, node.end_lineno + 1)  # type: ignore[attr-defined,operator]
        if i not in doc and lines[i - 1].strip() and not lines[i - 1].strip().startswith("#")
    )


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for module, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            long_modules.append(f"{module}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(lines, node)
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {n} lines of code")
    assert long_modules == [], "\n".join(long_modules)
    assert long_functions == [], "\n".join(long_functions)


def test_the_tests_mirror_the_packages():
    """A test lives in the folder of the package it tests: ressl's sub-packages, ``core`` for
    the top-level modules, ``cli``, ``export`` and ``benchmarks``; none at the top."""
    tests = ROOT / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    packages = {p.name for p in (ROOT / "ressl").iterdir() if (p / "__init__.py").is_file()}
    assert folders == packages | {"core", "cli", "export", "benchmarks"}
    assert not list(tests.glob("test_*.py"))
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names))  # pytest imports them by their base name
