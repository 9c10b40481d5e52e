"""Serving throughput: ``ressl serve`` under load against ``Embedder`` in-process, one run.

A bounded load test on the loopback address only. The server (``ressl serve``, one
worker, CPU) runs in its own process; N client threads in this process each keep one
HTTP connection open and send a fixed number of ``POST /embed`` requests of one PNG
image each, then stop. Reported per N: images/s over the whole test, p50/p95/p99
request latency, and failed requests. Beside it: ``Embedder.embed_files`` on the same
images, decoded and embedded in-process in full batches of ``--max-batch``. The same
machine runs clients and server, so on a small CPU they compete for it.

The encoders are randomly initialised (speed does not depend on the weights): the
small CNN (width 32) and ResNet-18 (small-image stem), both at 32 px RGB.

    python benchmarks/serve.py --write
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from common import cpu_model, write_block  # noqa: E402  (benchmarks/ is on sys.path as a script)
from PIL import Image
from ressl.export import Embedder, export_onnx

from ressl import ReSSL

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _client(
    port: int, bodies: list[tuple[bytes, str]], latencies: list[float], failures: list[int]
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for body, kind in bodies:
        start = time.perf_counter()
        try:
            conn.request("POST", "/embed", body, {"Content-Type": kind})
            response = conn.getresponse()
            response.read()
            ok = response.status == 200
        except OSError:
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        latencies.append(time.perf_counter() - start)
        if not ok:
            failures.append(1)
    conn.close()


def _load(port: int, files: list[Path], clients: int, requests: int) -> tuple[float, ...]:
    payloads = [_multipart(f.name, f.read_bytes()) for f in files]
    per_client = requests // clients
    latencies: list[float] = []
    failures: list[int] = []
    threads = [
        threading.Thread(
            target=_client,
            args=(
                port,
                [payloads[(c * per_client + i) % len(payloads)] for i in range(per_client)],
                latencies,
                failures,
            ),
        )
        for c in range(clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    q = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return clients * per_client / seconds, float(q[0]), float(q[1]), float(q[2]), len(failures)


def _batches(port: int) -> tuple[int, int]:
    """(model calls, images in them) so far, from the server's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    values = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith(("ressl_batches_total", "ressl_batched_images_total")):
            name, value = line.split()
            values[name] = int(value)
    return values["ressl_batches_total"], values["ressl_batched_images_total"]


def _serve(model: Path, port: int, max_batch: int, max_wait_ms: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ressl",
            "serve",
            str(model),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-batch",
            str(max_batch),
            "--max-wait-ms",
            str(max_wait_ms),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=512, help="Requests per load level.")
    parser.add_argument("--clients", default="1,8,32", help="Concurrent clients per level.")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--backbones", default="small,resnet18")
    parser.add_argument("--write", action="store_true", help="Put the table in docs/benchmarks.md.")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        files = []
        for i in range(256):
            path = Path(tmp) / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(path)
            files.append(path)
        for backbone in args.backbones.split(","):
            torch.manual_seed(0)
            encoder = ReSSL(backbone, in_channels=3, image_size=32, queue_size=16).student.eval()
            model = Path(tmp) / f"{backbone}.onnx"
            export_onnx(
                encoder,
                model,
                image_size=32,
                channels=3,
                mean=MEAN,
                std=STD,
                backbone=backbone,
                verify=False,
            )
            embedder = Embedder(model, device="cpu", batch_size=args.max_batch)
            embedder.embed_files(files[: args.max_batch])  # warm-up
            start = time.perf_counter()
            rounds = max(1, args.requests // len(files))
            for _ in range(rounds):
                embedder.embed_files(files)
            inproc = rounds * len(files) / (time.perf_counter() - start)
            rows.append(
                (
                    backbone,
                    "Embedder in-process, full batches",
                    inproc,
                    None,
                    None,
                    None,
                    0,
                    float(args.max_batch),
                )
            )
            port = _free_port()
            server = _serve(model, port, args.max_batch, args.max_wait_ms)
            try:
                _load(port, files, 4, 64)  # warm-up
                for clients in levels:
                    calls, images = _batches(port)
                    ips, p50, p95, p99, failed = _load(port, files, clients, args.requests)
                    calls2, images2 = _batches(port)
                    batch = (images2 - images) / max(calls2 - calls, 1)
                    rows.append(
                        (
                            backbone,
                            f"ressl serve, {clients} client(s)",
                            ips,
                            p50,
                            p95,
                            p99,
                            failed,
                            batch,
                        )
                    )
            finally:
                server.terminate()
                server.wait(30)
    table = _table(rows, args)
    print(table)
    if args.write:
        print("wrote", write_block("serve", table, "Serving: ressl serve under load"))


def _table(rows: list[tuple], args: argparse.Namespace) -> str:
    inproc = {r[0]: r[2] for r in rows if r[3] is None}
    lines = [
        f"{cpu_model()}, {os.cpu_count()} cores; clients and server on the same machine; "
        f"{args.requests} requests of one 32 px PNG per level; `--max-batch {args.max_batch} "
        f"--max-wait-ms {args.max_wait_ms:g}`; `python benchmarks/serve.py`.",
        "",
        "| encoder | how | images/s | vs in-process | mean batch | p50 ms | p95 ms | p99 ms "
        "| failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backbone, how, ips, p50, p95, p99, failed, batch in rows:
        lat = ["-"] * 3 if p50 is None else [f"{v:.1f}" for v in (p50, p95, p99)]
        lines.append(
            f"| {backbone} | {how} | {ips:,.0f} | {ips / inproc[backbone]:.2f}x | "
            f"{batch:.1f} | {' | '.join(lat)} | {failed} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
