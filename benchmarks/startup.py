"""Start-up time: ``ressl --help`` and ``import ressl.export``, this tree against another revision.

Both trees are laid out the same way in temporary folders (``ressl/``, with ``cli/``
as ``ressl/cli`` and ``export/`` as ``ressl/export``, as the installed package maps
them) and imported from there with the same interpreter, so only the code differs.
The trees take turns for ``--repeat`` rounds (a busy neighbour on a shared CPU hits
both alike); the table gives each command's median wall time and whether PyTorch
was loaded. Prints a markdown table and, with ``--write``, puts it in docs/benchmarks.md.

    python benchmarks/startup.py --against c33b7f7 --write
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import cpu_model, write_block  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "`ressl --help`": "from ressl.cli.app import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "`import ressl.export`": "import ressl.export",
    "`import ressl`": "import ressl",
}
PROBE = "\nimport sys\nprint('torch' in sys.modules, file=sys.stderr)"


def lay_out(source: Path, into: Path) -> Path:
    """The package as it installs: ``into/ressl`` with ``cli`` and ``export`` inside."""
    package = into / "ressl"
    shutil.copytree(source / "ressl", package)
    shutil.copytree(source / "cli", package / "cli")
    shutil.copytree(source / "export", package / "export")
    return into


def checkout(rev: str, into: Path) -> Path:
    """The files of revision ``rev`` (``git archive``), unpacked into ``into``."""
    into.mkdir(parents=True)
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def time_once(code: str, path: Path) -> tuple[float, bool]:
    env = dict(os.environ, PYTHONPATH=str(path), PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code + PROBE],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - start, done.stderr.strip().splitlines()[-1] == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default="c33b7f7", help="the revision to compare with")
    parser.add_argument("--repeat", type=int, default=7, help="rounds per command and tree")
    parser.add_argument(
        "--write", action="store_true", help="write the table to docs/benchmarks.md"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {
            args.against: lay_out(checkout(args.against, Path(tmp) / "old"), Path(tmp) / "old-pkg"),
            "this tree": lay_out(ROOT, Path(tmp) / "new-pkg"),
        }
        times: dict[tuple[str, str], list[float]] = {}
        torch_loaded: dict[tuple[str, str], bool] = {}
        for name, code in COMMANDS.items():
            for tree in trees.values():  # warm the file cache
                time_once(code, tree)
            for _ in range(args.repeat):
                for label, tree in trees.items():
                    seconds, loaded = time_once(code, tree)
                    times.setdefault((name, label), []).append(seconds)
                    torch_loaded[(name, label)] = loaded
    old, new = args.against, "this tree"
    lines = [
        f"| command | {old} (s) | torch loaded | this tree (s) | torch loaded | ratio |",
        "|---|---:|---|---:|---|---:|",
    ]
    for name in COMMANDS:
        a, b = statistics.median(times[(name, old)]), statistics.median(times[(name, new)])
        yes = {True: "yes", False: "no"}
        lines.append(
            f"| {name} | {a:.2f} | {yes[torch_loaded[(name, old)]]} | {b:.2f} | "
            f"{yes[torch_loaded[(name, new)]]} | {a / b:.1f}x |"
        )
    lines += [
        "",
        f"Median of {args.repeat} rounds per command and tree, taken in turns, wall time of a new "
        f"Python process; {cpu_model()}, {os.cpu_count()} logical CPUs.",
        "",
        f"Command: `python benchmarks/startup.py --against {args.against} --write`",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_block("startup", table, "Start-up time: the CLI and the serving import")


if __name__ == "__main__":
    main()
