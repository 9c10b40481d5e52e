"""``ressl serve``: every endpoint, micro-batching, every bad input, on a free loopback port."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from cli_helpers import TINY, assert_one_line_error, run_cli
from PIL import Image

uvicorn = pytest.importorskip("uvicorn")
from ressl.export import Embedder, export_onnx  # noqa: E402
from ressl.export.serve_settings import ServeSettings  # noqa: E402
from ressl.export.server import create_app  # noqa: E402

from ressl import train  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory, image_folder):
    run = tmp_path_factory.mktemp("serve") / "run"
    train(out=run, **dict(TINY, dataset=f"folder:{image_folder}", epochs=1, knn_every=-1))
    path = run.parent / "encoder.onnx"
    export_onnx(run, path, verify=False)
    return path


@pytest.fixture(scope="module")
def server(model):
    settings = ServeSettings(
        str(model),
        device="cpu",
        max_batch=8,
        max_wait_ms=50,
        max_upload_mb=300_000 / 2**20,
        max_images=5,
        max_pixels=1_000_000,
        max_request_pixels=2_000_000,
    )
    app = create_app(settings)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app.state.service
    srv.should_exit = True
    thread.join(10)


def _multipart(files):
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _request(url, path, body=None, content_type=None, headers=None):
    req = urllib.request.Request(
        url + path, data=body, method="POST" if body is not None else "GET"
    )
    if content_type:
        req.add_header("Content-Type", content_type)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _files(image_folder, n=3):
    return sorted((image_folder / "test").rglob("*.png"))[:n]


def test_health_readiness_and_metadata(server, model):
    url, _ = server
    assert _request(url, "/healthz")[0] == 200
    status, _, body = _request(url, "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    meta = json.loads(_request(url, "/metadata")[2])
    info = Embedder(model, device="cpu").info
    assert meta["embedding_dim"] == info.embedding_dim and meta["backbone"] == "small"
    assert meta["input"] == {"channels": 3, "image_size": 16, "any_size": info.dynamic_spatial}
    assert (
        meta["source_sha256"] == info.source_sha256 and meta["provider"] == "CPUExecutionProvider"
    )


def test_served_embeddings_equal_the_embedder_bit_for_bit(server, model, image_folder):
    url, _ = server
    paths = _files(image_folder)
    expected = Embedder(model, device="cpu", batch_size=8).embed([str(p) for p in paths])
    body, kind = _multipart([(p.name, p.read_bytes()) for p in paths])
    status, _, out = _request(url, "/embed", body, kind)
    got = json.loads(out)
    assert status == 200 and got["count"] == 3 and got["dim"] == expected.shape[1]
    assert np.array_equal(np.asarray(got["embeddings"], np.float32), expected)
    b64 = json.dumps({"images": [base64.b64encode(p.read_bytes()).decode() for p in paths]})
    status, _, out = _request(url, "/embed", b64.encode(), "application/json")
    assert status == 200 and np.array_equal(
        np.asarray(json.loads(out)["embeddings"], np.float32), expected
    )
    status, headers, raw = _request(url, "/embed?format=raw", body, kind)
    assert status == 200 and headers["X-Shape"] == f"3,{expected.shape[1]}"
    assert np.array_equal(np.frombuffer(raw, np.float32).reshape(3, -1), expected)


def test_concurrent_requests_share_batches(server, model, image_folder):
    url, service = server
    paths = _files(image_folder, 8)
    single = Embedder(model, device="cpu")
    before = service.batcher.batches

    def one(path):
        body, kind = _multipart([(path.name, path.read_bytes())])
        status, _, out = _request(url, "/embed", body, kind)
        return status, np.asarray(json.loads(out)["embeddings"][0], np.float32)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, paths))
    assert all(status == 200 for status, _ in results)
    assert service.batcher.batches - before < len(paths)  # gathered into fewer model calls
    for (_, row), path in zip(results, paths):
        np.testing.assert_allclose(row, single.embed([str(path)])[0], atol=1e-5)


def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_stays_up(server, image_folder):
    url, _ = server
    png = _files(image_folder, 1)[0].read_bytes()
    bomb = io.BytesIO()
    Image.new("L", (2000, 2000)).save(bomb, format="PNG")  # 4 MP in a few KB
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)).save(
        noise, format="PNG"
    )
    gray = io.BytesIO()
    Image.new("L", (800, 800), 80).save(gray, format="PNG")  # 640,000 pixels each, under max_pixels
    gray_800 = gray.getvalue()
    cases = [
        (_multipart([("notes.txt", b"not an image")]), 400, "notes.txt is not an image"),
        (_multipart([("empty.png", b"")]), 400, "empty.png is empty"),
        ((b"", "application/json"), 400, "no body"),
        (_multipart([("bomb.png", bomb.getvalue())]), 413, "decompression bomb"),
        (_multipart([("big.png", noise.getvalue())]), 413, "exceeds the limit of 300000"),
        (_multipart([(f"{i}.png", png) for i in range(6)]), 413, "6 images; the limit is 5"),
        (
            _multipart([(f"{i}.png", gray_800) for i in range(4)]),
            413,
            "the request's 4 images hold 2,560,000+ pixels as decoded, over the limit of 2,000,000",
        ),
        ((png, "image/png"), 415, "content type 'image/png' is not accepted"),
        ((b"{not json", "application/json"), 400, "not valid JSON"),
        ((b'{"images": ["@@@"]}', "application/json"), 400, "images[0] is not valid base64"),
        ((b'{"pictures": []}', "application/json"), 400, '{"images": [base64 string, ...]}'),
        (_multipart([]), 400, "no image"),
    ]
    for (body, kind), status, needle in cases:
        got, _, out = _request(url, "/embed", body, kind)
        error = json.loads(out)
        assert got == status and needle in error["error"], (needle, got, error)
    assert _request(url, "/healthz")[0] == 200
    metrics = _request(url, "/metrics")[2].decode()
    assert 'ressl_errors_total{status="413"} 4' in metrics
    three = _multipart([(f"{i}.png", gray_800) for i in range(3)])  # 1,920,000: within the budget
    assert _request(url, "/embed", *three)[0] == 200
    assert "ressl_embed_seconds_count" in metrics and "ressl_images_total" in metrics


def test_serve_without_the_extra_says_how_to_install(capsys, monkeypatch, model):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    code, _, err = run_cli(capsys, "serve", model)
    assert_one_line_error(code, err, "ressl serve needs the serve extra")
    assert "pip install 'ressl[serve]'" in err


def test_serve_command_starts_answers_and_stops_on_sigterm(model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"serving {model}") and f"on CPU at http://127.0.0.1:{port}" in line
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if _request(f"http://127.0.0.1:{port}", "/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the server never became ready")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "CUDA" not in err
    finally:
        proc.kill()


def test_the_batcher_gathers_concurrent_requests_and_never_delays_a_lone_one():
    import asyncio

    from ressl.export.batching import MicroBatcher

    calls = []

    def run(batch):
        calls.append(len(batch))
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)

    async def scenario():
        batcher = MicroBatcher(run, max_batch=8, max_wait=0.5)
        await batcher.start()
        start = time.perf_counter()
        alone = await batcher.submit(np.ones((1, 2, 2, 2), np.float32))
        lone_seconds = time.perf_counter() - start

        async def one(i):
            with batcher.arriving():
                await asyncio.sleep(0.01 * i)  # decoding
            return await batcher.submit(np.full((1, 2, 2, 2), i, np.float32))

        rows = await asyncio.gather(*(one(i) for i in range(5)))
        await batcher.stop()
        return alone, lone_seconds, rows

    alone, lone_seconds, rows = asyncio.run(scenario())
    assert alone.tolist() == [[8.0]] and lone_seconds < 0.25  # not held for max_wait
    assert [r.tolist() for r in rows] == [[[8.0 * i]] for i in range(5)]
    assert calls[0] == 1 and calls[1:] == [5]  # the five in one model call


def test_images_for_a_model_that_takes_no_image_files_get_a_400(tmp_path, image_folder):
    from ressl.export.server import EmbeddingService
    from ressl.export.uploads import BadInput

    from ressl import ReSSL

    net = ReSSL(
        "small", in_channels=4, image_size=16, hidden_dim=16, embed_dim=8, width=4, queue_size=16
    ).student.eval()
    path = tmp_path / "four.onnx"
    export_onnx(
        net,
        path,
        image_size=16,
        channels=4,
        mean=(0.5,) * 4,
        std=(0.5,) * 4,
        backbone="small",
        verify=False,
    )
    service = EmbeddingService(ServeSettings(str(path), device="cpu"))
    png = _files(image_folder, 1)[0].read_bytes()
    with pytest.raises(BadInput, match="4-channel input") as e:
        service._decode("a.png", png)
    assert e.value.status == 400


def test_a_stop_lets_requests_in_flight_finish(model, image_folder):
    slow = Embedder(model, device="cpu")
    real = slow.run
    slow.run = lambda batch: (time.sleep(1.0), real(batch))[1]  # a model call in flight for 1 s
    app = create_app(ServeSettings(str(model), device="cpu"), embedder=slow)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    path = _files(image_folder, 1)[0]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            _request, url, "/embed", *_multipart([(path.name, path.read_bytes())])
        )
        time.sleep(0.3)  # the request is in the model now
        srv.should_exit = True  # what SIGTERM sets
        status, _, out = pending.result(timeout=30)
    thread.join(30)
    assert status == 200 and json.loads(out)["count"] == 1
    assert not thread.is_alive() and app.state.service.ready is False


# --------------------------------------------------------------------------- hostile input


def test_a_batch_waiting_for_a_request_whose_decode_fails_runs_at_once():
    """A batch gathered while another request decodes must not wait for it once it fails:
    with an endless max wait it used to wait forever (and hold the server's stop)."""
    import asyncio

    from ressl.export.batching import MicroBatcher

    def run(batch):
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)

    async def scenario():
        batcher = MicroBatcher(run, max_batch=8, max_wait=1e9)
        await batcher.start()

        async def failing():
            with pytest.raises(ValueError), batcher.arriving():
                await asyncio.sleep(0.2)  # decoding ...
                raise ValueError("not an image")

        async def waiting():
            await asyncio.sleep(0.05)  # submitted while the other decodes
            return await batcher.submit(np.ones((1, 2, 2, 2), np.float32))

        start = time.perf_counter()
        _, rows = await asyncio.wait_for(asyncio.gather(failing(), waiting()), 5)
        seconds = time.perf_counter() - start
        await asyncio.wait_for(batcher.stop(), 5)
        return rows, seconds

    rows, seconds = asyncio.run(scenario())
    assert rows.tolist() == [[8.0]] and seconds < 2


_SERVE_VALUES = ["0", "-1", "nan", "inf", "1e300", "", "x" * 5000, "9" * 5000]
_SERVE_FLAGS = [
    "--host",
    "--port",
    "--device",
    "--max-batch",
    "--max-wait-ms",
    "--workers",
    "--max-upload-mb",
    "--max-images",
    "--max-pixels",
    "--max-request-pixels",
]


@pytest.mark.parametrize("flag", _SERVE_FLAGS)
def test_every_serve_flag_out_of_its_range_is_one_line_naming_it(capsys, tmp_path, flag):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"never read: the flags are checked first")
    for value in _SERVE_VALUES:
        if (flag, value) == ("--max-wait-ms", "0"):
            continue  # valid: no waiting for others
        code, _, err = run_cli(capsys, "serve", model, flag, value)
        assert_one_line_error(code, err, flag)
        assert len(err) < 300, err  # a 5,000-character value is not echoed whole


def test_serve_flags_default_to_the_settings_defaults():
    """The command line's defaults are ServeSettings' (the one source of every default)."""
    import inspect

    from ressl.cli.serve_cmd import serve_cmd

    fields = ServeSettings.__dataclass_fields__
    for name, param in inspect.signature(serve_cmd).parameters.items():
        if name != "model":
            assert param.default == fields[name].default, name


def test_serve_settings_state_every_range_and_name_the_setting():
    from ressl.export.serve_settings import RULES

    from ressl.errors import ConfigError

    assert set(RULES) <= set(ServeSettings.__dataclass_fields__)
    for name, value in [
        ("max_upload_mb", float("inf")),
        ("max_upload_mb", 1e300),
        ("max_upload_mb", float("nan")),
        ("max_wait_ms", float("inf")),
        ("max_wait_ms", 1e12),
        ("host", ""),
        ("port", 0),
    ]:
        with pytest.raises(ConfigError, match=f"^{name} must be"):
            ServeSettings("m.onnx", **{name: value})
    assert ServeSettings("m.onnx", max_upload_mb=0.5).max_upload_bytes == 2**19


def _raw_http(url, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _metric(url, line_start):
    text = _request(url, "/metrics")[2].decode()
    return sum(
        int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    )


def test_a_client_gone_mid_upload_is_a_499_not_a_server_error(server):
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    before = _metric(url, 'ressl_requests_total{path="/embed",status="499"}')
    errors = _metric(url, "ressl_errors_total")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200000\r\n\r\n" + b"{" * 1000
        )
        time.sleep(0.2)
    for _ in range(100):  # the server notices the closed connection
        if _metric(url, 'ressl_requests_total{path="/embed",status="499"}') > before:
            break
        time.sleep(0.05)
    assert _metric(url, 'ressl_requests_total{path="/embed",status="499"}') == before + 1
    assert _metric(url, "ressl_errors_total") == errors  # not a 500, nor any error
    assert _request(url, "/healthz")[0] == 200


def test_nested_json_is_a_400_saying_so_without_recursing(server):
    url, _ = server
    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    cases = [
        (deep, "nests 100001 levels deep"),
        (b"[" * 100_000, "nests 100000 levels deep"),
        (b'{"images": [["a"]]}', "nests 3 levels deep"),
        (b'{"images": ["[[[[\\"[[[", "@@@"]}', "images[0] is not valid base64"),  # in strings
    ]
    for body, needle in cases:
        status, _, out = _request(url, "/embed", body, "application/json")
        assert status == 400 and needle in json.loads(out)["error"], (needle, out[:200])


def test_a_part_that_is_not_an_image_is_named_without_a_python_repr(server, image_folder):
    url, _ = server
    png = base64.b64encode(_files(image_folder, 1)[0].read_bytes()).decode()
    junk = base64.b64encode(b"not an image").decode()
    body = json.dumps({"images": [png, png, png, junk]}).encode()
    status, _, out = _request(url, "/embed", body, "application/json")
    error = json.loads(out)["error"]
    assert status == 400 and error.startswith("images[3] is not an image"), error
    assert "object at 0x" not in error and "BytesIO" not in error
    status, _, out = _request(url, "/embed", *_multipart([("notes.txt", b"plain text")]))
    error = json.loads(out)["error"]
    assert status == 400 and "notes.txt" in error and "object at 0x" not in error, error


def test_metrics_count_every_route_in_the_prometheus_text_format(server):
    url, _ = server
    for path in ("/healthz", "/readyz", "/metadata", "/nowhere", "/nowhere/else"):
        _request(url, path)
    _request(url, "/embed")  # a GET: 405
    _request(url, "/metrics")
    text = _request(url, "/metrics")[2].decode()
    # every sample's family is declared (# HELP, # TYPE) before it, as the format requires
    helped, declared = set(), set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            declared.add(line.split()[2])
        else:
            name = line.split("{")[0].split(" ")[0]
            family = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert name in declared or family in declared, line
            assert name in helped or family in helped, line
    for needle in (
        'path="/healthz",status="200"',
        'path="/readyz",status="200"',
        'path="/metadata",status="200"',
        'path="/metrics",status="200"',
        'path="other",status="404"',
        'path="/embed",status="405"',
    ):
        assert needle in text, needle
    assert "/nowhere" not in text  # no series per made-up path
    parser = pytest.importorskip("prometheus_client.parser")  # the reference parser agrees
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert {
        "ressl_requests",
        "ressl_images",
        "ressl_errors",
        "ressl_batches",
        "ressl_batched_images",
        "ressl_embed_seconds",
    } <= set(families)
    assert families["ressl_batched_images"].type == "counter"
    assert families["ressl_embed_seconds"].type == "histogram"
    seen = {(s.labels["path"], s.labels["status"]) for s in families["ressl_requests"].samples}
    assert {("/healthz", "200"), ("other", "404"), ("/embed", "405")} <= seen


def test_a_model_claiming_a_huge_image_size_gets_bounded_requests(tmp_path, model, image_folder):
    """A graph that takes any size, with metadata asking for 4096x4096: one decoded image is
    192 MiB, so a request holds one and a batch runs one (not --max-images and --max-batch)."""
    import onnx
    from ressl.export.server import EmbeddingService
    from ressl.export.uploads import BadInput

    proto = onnx.load(str(model))
    for prop in proto.metadata_props:
        if prop.key == "image_size":
            prop.value = "4096"
    onnx.save(proto, str(tmp_path / "huge.onnx"))
    service = EmbeddingService(ServeSettings(str(tmp_path / "huge.onnx"), device="cpu"))
    assert service.embedder.image_bytes == 3 * 4096 * 4096 * 4
    assert service.max_images == 1 and service.batcher.max_batch == 1
    assert service.embedder.images_per_run == 1

    class Request:
        headers = {"content-type": "application/json"}

        async def stream(self):
            png = base64.b64encode(_files(image_folder, 1)[0].read_bytes()).decode()
            yield json.dumps({"images": [png, png]}).encode()

    import asyncio

    with pytest.raises(
        BadInput,
        match=r"2 images; the limit is 1 per request \(this model's "
        r"3x4096x4096 input is 192.0 MiB an image decoded\)",
    ) as e:
        asyncio.run(service._images(Request()))  # type: ignore[arg-type]
    assert e.value.status == 413


def _http_fuzz_bodies(png: bytes):
    """(name, body, content type): mutated multipart and JSON bodies, nesting, budgets."""
    rng = np.random.default_rng(11)
    good, kind = _multipart([("a.png", png)])
    yield "good", good, kind
    for cut in (1, 10, len(good) // 3, len(good) // 2, len(good) - 3):
        yield f"multipart cut at {cut}", good[:cut], kind
    for i in range(12):
        flipped = bytearray(good)
        for at in rng.integers(0, len(good), 8):
            flipped[at] = int(rng.integers(0, 256))
        yield f"multipart with 8 bytes changed #{i}", bytes(flipped), kind
    yield "multipart, wrong boundary", good, "multipart/form-data; boundary=nope"
    yield "multipart, no boundary", good, "multipart/form-data"
    for depth in (1, 2, 3, 50, 1000, 100_000):
        body = b'{"images": ' + b"[" * depth + b"]" * depth + b"}"
        yield f"JSON nested {depth} deep", body, "application/json"
    b64 = base64.b64encode(png).decode()
    for name, payload in [
        ("JSON list", [b64]),
        ("JSON string", b64),
        ("JSON number", 3),
        ("JSON null", None),
        ("images: a number", {"images": 5}),
        ("images: nested dict", {"images": [{"a": b64}]}),
        ("images: 6 (over max_images)", {"images": [b64] * 6}),
        ("images: bad base64", {"images": ["!!" + b64]}),
        ("images: empty string", {"images": [""]}),
        ("images: base64 of noise", {"images": [base64.b64encode(rng.bytes(300)).decode()]}),
        ("images: one good", {"images": [b64]}),
    ]:
        yield name, json.dumps(payload).encode(), "application/json"
    yield "JSON, invalid UTF-8", b'{"images": ["\xff\xfe"]}', "application/json"
    yield "JSON, 1e400", b'{"images": 1e400}', "application/json"
    yield "random bytes as JSON", rng.bytes(500), "application/json"
    yield "random bytes as multipart", rng.bytes(500), kind
    yield "no content type", good, ""
    yield "text/plain", good, "text/plain"


def test_http_body_fuzz_gets_200_or_4xx_never_a_5xx(server, image_folder):
    """Every mutated body is answered 200 or a 4xx naming the problem; the server stays up."""
    url, _ = server
    png = _files(image_folder, 1)[0].read_bytes()
    statuses: dict[int, int] = {}
    for name, body, kind in _http_fuzz_bodies(png):
        status, _, out = _request(url, "/embed", body, kind or None)
        statuses[status] = statuses.get(status, 0) + 1
        assert status == 200 or 400 <= status < 500, (name, status, out[:300])
        if status != 200:
            error = json.loads(out)["error"]
            assert error and "object at 0x" not in error and len(error) < 400, (name, error)
    assert _request(url, "/healthz")[0] == 200
    cases = sum(statuses.values())
    print(
        f"\nHTTP body fuzz: {cases} bodies: {statuses.get(200, 0)} embedded, "
        f"{cases - statuses.get(200, 0)} refused with a 4xx ({dict(sorted(statuses.items()))}), "
        "0 5xx, 0 hangs"
    )
    assert statuses.get(200, 0) >= 2 and cases - statuses.get(200, 0) >= 30
