"""Make this tree's ``ressl`` importable on a machine that has only a copy of the tree.

``ressl.cli`` and ``ressl.export`` live in ``cli/`` and ``export/``, mapped by
``pyproject.toml``'s ``package-dir``; a copied tree therefore does not import as
``ressl`` from its folder. :func:`ensure_importable` tries, in order: the ``ressl``
already installed from this tree, an offline ``pip install --no-deps
--no-build-isolation -e .``, and, failing that, :class:`TreeFinder`, an import hook
that maps the three package names to their folders (no ``sys.path`` entry, no
``.pth`` file). Only the standard library is used, so this runs before torch or
ressl can be imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
#: Set in the environment of the processes that need :class:`TreeFinder`.
FINDER_ENV = "RESSL_TREE_FINDER"
_CHECK = "import ressl, ressl.cli, ressl.export; print(ressl.__file__)"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """``pyproject.toml``'s ``package-dir``: package name -> its folder (read with a pattern,
    since ``tomllib`` is Python >= 3.11)."""
    text = (root / "pyproject.toml").read_text()
    line = next(line for line in text.splitlines() if line.startswith("package-dir"))
    return {
        name: root / folder for name, folder in re.findall(r'"([\w.]+)"\s*=\s*"([\w./]+)"', line)
    }


class TreeFinder(importlib.abc.MetaPathFinder):
    """Finds the packages of ``package_dirs`` in their folders; their submodules are then
    found by the ordinary machinery through each package's ``__path__``."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        init = folder / "__init__.py"
        return importlib.util.spec_from_file_location(
            fullname, init, submodule_search_locations=[str(folder)]
        )


def install_finder(root: Path = ROOT) -> None:
    """Put a :class:`TreeFinder` first in ``sys.meta_path`` (once)."""
    if not any(isinstance(f, TreeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TreeFinder(package_dirs(root)))


def python() -> list[str]:
    """This interpreter with its flags (``-S``, ``-I``...), for the processes it starts."""
    return [sys.executable, *subprocess._args_from_interpreter_flags()]  # type: ignore[attr-defined]


def imported_from(env: dict[str, str] | None = None) -> Path | None:
    """The folder ``ressl`` imports from in a fresh interpreter, or None if it does not
    import (run outside the tree, so that the current folder does not count)."""
    out = subprocess.run(
        [*python(), "-c", _CHECK],
        capture_output=True,
        text=True,
        cwd=Path(os.sep),
        env=env,
        timeout=60,
    )
    return Path(out.stdout.strip()).parent if out.returncode == 0 else None


def ensure_importable(install: bool = True, root: Path = ROOT) -> dict[str, str]:
    """Make ``root``'s ressl importable here and in the processes started afterwards; return
    how (``{"ressl_import": "installed" | "pip install -e" | "finder", ...}``)."""
    if imported_from() == root / "ressl":
        return {"ressl_import": "installed"}
    how: dict[str, str] = {}
    if install and imported_from() is None:  # never reinstall over another tree's ressl
        pip = [*python(), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
        try:
            out = subprocess.run(
                [*pip, "-e", str(root)], capture_output=True, text=True, timeout=90
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            how["pip_error"] = f"{type(e).__name__}: {e}"
        else:
            importlib.invalidate_caches()
            if out.returncode == 0 and imported_from() == root / "ressl":
                return {"ressl_import": "pip install -e"}
            how["pip_error"] = (out.stderr or out.stdout).strip()[-500:]
    os.environ[FINDER_ENV] = str(root)  # inherited by every process started from here
    install_finder(root)
    return {**how, "ressl_import": "finder"}


def finder_if_asked() -> None:
    """In a process started by the suite: install the finder if the suite chose it."""
    root = os.environ.get(FINDER_ENV)
    if root:
        install_finder(Path(root))
