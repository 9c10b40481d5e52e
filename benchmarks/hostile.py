"""Hostile files, folders and requests against ``ressl``: each case's outcome, before and after.

Every case of the hostile-input report (crafted images, pipes, links, flags, HTTP bodies)
runs as a fresh ``python -m ressl ...`` process (or a request to a fresh ``ressl
serve``), with a time limit, against files this script writes. For each it prints the
exit status (or HTTP status), the one line the command ended with (or ``traceback``, or
``hang`` past the limit), the peak resident memory of the process (``wait4``'s
``ru_maxrss``; for serve, the server's ``VmHWM``) and the seconds taken.

``--before PYTHON`` runs every case a second time with another interpreter that has
another ressl installed (an older checkout in its own venv), for a before/after table:

    git worktree add /tmp/ressl-before <commit> && python3 -m venv /tmp/ressl-before/.venv \\
        && /tmp/ressl-before/.venv/bin/pip install -e /tmp/ressl-before
    python benchmarks/hostile.py --before /tmp/ressl-before/.venv/bin/python --write  # docs/hostile.md

Files outside the case's own folder are checked before and after every case (their
sha256): the table's last column says whether any changed.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from common import write_block  # noqa: E402  (benchmarks/ is on sys.path as a script)
from PIL import Image

LIMIT_S = 30.0  # a case still running after this is a hang
BOMB = (1, 2_000_000)  # a 1 x 2,000,000 PNG: 4 kB on disk, S x 2,000,000*S once resized whole


@dataclass
class Case:
    """One hostile input: the command (or request) and the files it needs."""

    name: str
    item: str  # the report's item
    argv: list[str] = field(default_factory=list)  # ressl's arguments ({dir}: the case folder)
    request: tuple[str, bytes, str] | None = None  # serve: (path, body, content type)
    setup: Callable[[Path], None] | None = None


@dataclass
class Outcome:
    status: str
    line: str
    peak_mb: float
    seconds: float
    outside_changed: bool


# ------------------------------------------------------------------ files the cases use


def _png(size: tuple[int, int], mode: str = "L", value: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(w: int, h: int, mode: str = "RGB") -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx * yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _folder(root: Path, extra: Callable[[Path], None] | None = None, n: int = 12) -> None:
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.png").write_bytes(_png((28, 28), value=20 * i))
    if extra is not None:
        extra(root / "c0")


def _fifo(where: Path, name: str = "pipe.png") -> None:
    os.mkfifo(where / name)


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    return b"".join(
        parts
    ) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


_FIXTURE_RUN = """
import sys
from ressl import train
from ressl.export import export_onnx
root = sys.argv[1]
train(dataset=f"folder:{root}/data", backbone="small", width=8, hidden_dim=32, embed_dim=16,
      epochs=1, batch_size=8, queue_size=64, warmup_epochs=0, knn_every=-1, out=f"{root}/run",
      device="cpu", seed=0)
export_onnx(f"{root}/run", f"{root}/enc.onnx", verify=False)
"""


def build_fixtures(root: Path, python: str) -> None:
    """A tiny trained run and its ONNX encoder, written by the ressl under test (``python``)."""
    for split in ("train", "test"):  # labelled splits: eval needs both
        _folder(root / "data" / split, n=24)
    subprocess.run([python, "-c", _FIXTURE_RUN, str(root)], check=True, capture_output=True)
    (root / "bomb.png").write_bytes(_png(BOMB))
    (root / "small.png").write_bytes(_png((28, 28)))
    (root / "photo.jpg").write_bytes(_jpeg(84, 56))


# ------------------------------------------------------------------ the cases

RESUME = ["train", "--resume", "{dir}/run", "--epochs", "2", "--device", "cpu"]
TRAIN = [
    "train",
    "--backbone",
    "small",
    "--width",
    "8",
    "--hidden-dim",
    "32",
    "--embed-dim",
    "16",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--queue-size",
    "16",
    "--knn-every",
    "-1",
    "--device",
    "cpu",
]


def _embed(*paths: str) -> list[str]:
    return ["embed", "{fx}/enc.onnx", *paths, "-o", "{dir}/e.npz"]


def _train(folder: str) -> list[str]:
    return [*TRAIN, "--dataset", f"folder:{folder}", "--out", "{dir}/run"]


def _thin_png_in(d: Path) -> None:
    """A labelled train/test folder (``eval`` needs both) with a 1x300,000 PNG in each split."""
    for split in ("train", "test"):
        _folder(d / "imgs" / split, lambda c: (c / "thin.png").write_bytes(_png((1, 300_000))))


def _pipe_in(d: Path) -> None:
    _folder(d / "imgs", _fifo)


def _upload(name: str, data: bytes) -> tuple[str, bytes, str]:
    return ("/embed", *_multipart([(name, data)]))


def _run_copy(d: Path) -> Path:
    """The fixture run, copied into the case folder (the case may change it); case folders
    are LABEL/cases/X beside LABEL/fixtures."""
    run = d / "run"
    shutil.copytree(d.parent.parent / "fixtures" / "run", run)
    return run


def _link_out(name: str) -> Callable[[Path], None]:
    """The run copy's ``name`` as a link to a file outside the case folder."""

    def setup(d: Path) -> None:
        run = _run_copy(d)
        target = d.parent.parent / f"outside-{d.name}.txt"
        target.write_text("a file ressl must not touch\n")
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(target)

    return setup


def _nested_settings(d: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = _run_copy(d)
    file = run / "last.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    save_file(load_file(file), file, metadata={**meta, "settings": "[" * 100_000 + "]" * 100_000})


def _cut_metrics_line(d: Path) -> None:
    run = _run_copy(d)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) // 2])


def _onnx_contradicting(d: Path) -> None:
    """The encoder with a static 28x28 input whose metadata says any size, at 4096."""
    import onnx

    model = onnx.load(d.parent.parent / "fixtures" / "enc.onnx")
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = 28
    for prop in model.metadata_props:
        if prop.key == "image_size":
            prop.value = "4096"
    onnx.save(model, d / "lying.onnx")


def cases() -> list[Case]:
    knn = ["eval", "knn", "{fx}/run", "--dataset", "folder:{dir}/imgs", "--no-record"]
    return [
        Case("embed: 28x28 PNG (reference)", "1", _embed("{fx}/small.png")),
        Case("embed: 1x2,000,000 PNG", "1", _embed("{fx}/bomb.png")),
        Case("train: folder with a 1x300,000 PNG", "1", _train("{dir}/imgs"), setup=_thin_png_in),
        Case("eval knn: folder with a 1x300,000 PNG", "1", knn, setup=_thin_png_in),
        Case(
            "embed: a named pipe named directly",
            "3",
            _embed("{dir}/pipe.png", "{fx}/small.png"),
            setup=_fifo,
        ),
        Case("embed: folder with a named pipe", "3", _embed("{dir}/imgs"), setup=_pipe_in),
        Case("train: folder with a named pipe", "3", _train("{dir}/imgs"), setup=_pipe_in),
        Case("embed ''", "3", _embed("")),
        Case("serve: 28x28 PNG upload (reference)", "1", request=_upload("s.png", _png((28, 28)))),
        Case("serve: 1x2,000,000 PNG upload", "1", request=_upload("bomb.png", _png(BOMB))),
        Case("serve: not an image", "6", request=_upload("x.png", b"not an image")),
        Case("train --resume: RUN/.lock links out", "2", RESUME, setup=_link_out(".lock")),
        Case(
            "eval knn: RUN/eval.jsonl links out",
            "2",
            ["eval", "knn", "{dir}/run"],
            setup=_link_out("eval.jsonl"),
        ),
        Case(
            "serve --max-wait-ms inf",
            "3",
            ["serve", "{fx}/enc.onnx", "--max-wait-ms", "inf", "--port", "8719"],
        ),
        Case(
            "embed: ONNX static 28x28, metadata 4096",
            "4/5",
            ["embed", "{dir}/lying.onnx", "{fx}/small.png", "-o", "{dir}/e.npz"],
            setup=_onnx_contradicting,
        ),
        Case(
            "info: settings nested 100,000 deep", "5", ["info", "{dir}/run"], setup=_nested_settings
        ),
        Case(
            "serve --max-upload-mb inf", "5", ["serve", "{fx}/enc.onnx", "--max-upload-mb", "inf"]
        ),
        Case(
            "serve --max-upload-mb nan", "6", ["serve", "{fx}/enc.onnx", "--max-upload-mb", "nan"]
        ),
        Case("train --resume: metrics.jsonl line cut", "6", RESUME, setup=_cut_metrics_line),
        Case(
            "train --seed 1e20",
            "6",
            [
                *TRAIN,
                "--dataset",
                "folder:{fx}/data",
                "--seed",
                "100000000000000000000",
                "--out",
                "{dir}/run",
            ],
        ),
        Case(
            "train --ema-momentum 1",
            "6",
            [*TRAIN, "--dataset", "folder:{fx}/data", "--ema-momentum", "1", "--out", "{dir}/run"],
        ),
        Case(
            "train --teacher-temperature 1e-30",
            "6",
            [
                *TRAIN,
                "--dataset",
                "folder:{fx}/data",
                "--teacher-temperature",
                "1e-30",
                "--out",
                "{dir}/run",
            ],
        ),
        Case("ressl --version", "12", ["--version"]),
        Case("info: a path that does not exist", "12", ["info", "{dir}/nothing"]),
    ]


# ------------------------------------------------------------------ running one case


def _digests(root: Path, skip: Path) -> dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and skip not in p.parents:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:110] if lines else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _run_request(
    python: str, model: Path, request: tuple[str, bytes, str], cwd: Path
) -> tuple[str, str, float, float]:
    port = _free_port()
    server = subprocess.Popen(
        [python, "-m", "ressl", "serve", str(model), "--port", str(port), "--device", "cpu"],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + LIMIT_S
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None:
                    return (
                        str(server.returncode),
                        _last_line(server.stderr.read().decode()),
                        0.0,
                        0.0,
                    )
                time.sleep(0.1)
        path, body, kind = request
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LIMIT_S)
        start = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": kind})
            response = conn.getresponse()
            status, text = str(response.status), response.read().decode(errors="replace")
        except TimeoutError:
            return "none", "hang", _vm_hwm_mb(server.pid), LIMIT_S
        seconds = time.perf_counter() - start
        try:
            line = json.loads(text).get("error") or f"{json.loads(text).get('count')} embedding(s)"
        except (ValueError, AttributeError):
            line = _last_line(text)
        return status, str(line)[:110], _vm_hwm_mb(server.pid), seconds
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)


def run_case(case: Case, python: str, fixtures: Path, scratch: Path) -> Outcome:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    if case.setup is not None:
        case.setup(folder)
    before = _digests(scratch.parent, folder)
    if case.request is not None:
        status, line, peak, seconds = _run_request(
            python, fixtures / "enc.onnx", case.request, folder
        )
    else:
        argv = [a.replace("{dir}", str(folder)).replace("{fx}", str(fixtures)) for a in case.argv]
        status, line, peak, seconds = _run_command_isolated(python, argv, folder)
    changed = _digests(scratch.parent, folder) != before
    shutil.rmtree(folder, ignore_errors=True)
    return Outcome(
        status,
        line.replace(str(folder), "DIR").replace(str(fixtures), "FX"),
        peak,
        seconds,
        changed,
    )


def _run_command_isolated(python: str, argv: list[str], cwd: Path) -> tuple[str, str, float, float]:
    """Run in a fresh helper process, so RUSAGE_CHILDREN's peak is this command's alone."""
    helper = (
        "import json, resource, subprocess, sys, time\n"
        "argv = json.loads(sys.argv[1]); limit = float(sys.argv[2])\n"
        "t = time.perf_counter()\n"
        "p = subprocess.Popen([sys.argv[3], '-m', 'ressl', *argv], stdin=subprocess.DEVNULL,"
        " stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)\n"
        "try:\n"
        "    out, err = p.communicate(timeout=limit); code = str(p.returncode)\n"
        "except subprocess.TimeoutExpired:\n"
        "    import os; os.killpg(p.pid, 9); out, err = p.communicate(); code = 'killed'\n"
        "s = time.perf_counter() - t\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps([code, out.decode(errors='replace'), err.decode(errors='replace'), peak, s]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", helper, json.dumps(argv), str(LIMIT_S), python],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    code, out, err, peak, seconds = json.loads(done.stdout)
    if code == "killed":
        return "killed", "hang", peak, seconds
    line = (
        "traceback: " + _last_line(err)
        if "Traceback" in err
        else _last_line(err) or _last_line(out)
    )
    return code, line, peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="another interpreter with an older ressl installed")
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument(
        "--write", action="store_true", help="write the table to docs/benchmarks.md"
    )
    args = parser.parse_args()
    pythons = [("after", sys.executable)] + ([("before", args.before)] if args.before else [])
    chosen = [c for c in cases() if not args.only or args.only in c.name]
    with tempfile.TemporaryDirectory() as tmp:
        places = {}
        for label, python in pythons:  # each ressl writes its own run and model
            fixtures, scratch = Path(tmp) / label / "fixtures", Path(tmp) / label / "cases"
            fixtures.mkdir(parents=True)
            scratch.mkdir()
            build_fixtures(fixtures, python)
            places[label] = (fixtures, scratch)
        rows = []
        for case in chosen:
            results = {label: run_case(case, py, *places[label]) for label, py in pythons}
            rows.append((case, results))
            for label, r in results.items():
                print(
                    f"{case.name} [{label}]: {r.status} | {r.line} | {r.peak_mb:.0f} MB | {r.seconds:.2f} s"
                    f"{' | OUTSIDE FILES CHANGED' if r.outside_changed else ''}",
                    file=sys.stderr,
                )
    columns = ("status", "ended with", "peak MB", "s", "outside files changed")
    labels = [label for label, _ in reversed(pythons)]  # before, then after
    header = "| item | case | " + " | ".join(f"{lb}: {c}" for lb in labels for c in columns) + " |"
    lines = [header, "|" + "---|" * (2 + len(columns) * len(labels))]
    for case, results in rows:
        cells = []
        for label in labels:
            r = results[label]
            changed = "**yes**" if r.outside_changed else "no"
            line = r.line.replace("|", "\\|")
            cells += [r.status, line, f"{r.peak_mb:.0f}", f"{r.seconds:.2f}", changed]
        lines.append(f"| {case.item} | {case.name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_block("hostile", table, "Before and after, one run", "hostile.md")


if __name__ == "__main__":
    main()
