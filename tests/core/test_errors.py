"""Errors that never hide bugs: bad input is a ``ResslError`` printed as one line, anything
else is a bug that keeps its traceback and asks to be reported (issue 23, item 5)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math

import numpy as np
import pytest
import ressl.cli.info_cmd as info_cmd
from cli_helpers import assert_one_line_error, run_cli
from ressl.cli.common import UserError, fail

from ressl._version import __version__
from ressl.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DataNotFoundError,
    DivergedError,
    ExportError,
    InputError,
    ResslError,
    RunFileError,
    RunInUseError,
    first_line,
)

REPORT = (
    f"ressl: internal error (ressl {__version__}): this is a bug in ressl, "
    "please report it with the traceback above"
)


def _info_raises(monkeypatch, tmp_path, error: BaseException) -> list[str]:
    """``ressl info MODEL.onnx`` arguments whose command raises ``error`` inside."""

    def broken(path, as_json):
        raise error

    monkeypatch.setattr(info_cmd, "onnx_info", broken)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"")
    return ["info", str(model)]


@pytest.mark.parametrize(
    "bug",
    [
        ValueError("x must be 1"),
        TypeError("bad operand"),
        KeyError("settings"),
        ZeroDivisionError(),
    ],
)
def test_a_bug_prints_its_traceback_and_asks_for_a_report(capsys, monkeypatch, tmp_path, bug):
    code, _, err = run_cli(capsys, *_info_raises(monkeypatch, tmp_path, bug))
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert f"{type(bug).__name__}" in err and "broken" in err  # where it was raised
    assert err.strip().splitlines()[-1] == REPORT
    assert "ressl: error:" not in err


def test_a_ressl_error_is_one_line_naming_flags_without_a_traceback(capsys, monkeypatch, tmp_path):
    error = ConfigError("{batch_size} must be >= 1, got 0", "batch_size")
    code, _, err = run_cli(capsys, *_info_raises(monkeypatch, tmp_path, error))
    assert code == 2
    assert_one_line_error(code, err, "--batch-size must be >= 1, got 0")


@pytest.mark.parametrize("value", ["1", "yes"])
def test_ressl_debug_shows_the_traceback_of_a_ressl_error(capsys, monkeypatch, tmp_path, value):
    monkeypatch.setenv("RESSL_DEBUG", value)
    error = CheckpointError("run/last.safetensors is not a ressl checkpoint")
    code, _, err = run_cli(capsys, *_info_raises(monkeypatch, tmp_path, error))
    assert code == 2
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1] == (
        "ressl: error: run/last.safetensors is not a ressl checkpoint"
    )


def test_ressl_debug_0_or_empty_is_off(capsys, monkeypatch, tmp_path):
    for value in ("0", ""):
        monkeypatch.setenv("RESSL_DEBUG", value)
        error = ConfigError("{k} must be >= 1, got 0", "k")
        code, _, err = run_cli(capsys, *_info_raises(monkeypatch, tmp_path, error))
        assert_one_line_error(code, err, "--k must be >= 1, got 0")


def test_an_os_error_is_one_line_naming_the_file(capsys, monkeypatch, tmp_path):
    error = PermissionError(13, "Permission denied", "/data/locked.png")
    code, _, err = run_cli(capsys, *_info_raises(monkeypatch, tmp_path, error))
    assert_one_line_error(code, err, "/data/locked.png: Permission denied")
    monkeypatch.setenv("RESSL_DEBUG", "1")
    code, _, err = run_cli(capsys, *_info_raises(monkeypatch, tmp_path, error))
    assert "Traceback" in err and err.strip().endswith("/data/locked.png: Permission denied")


def test_a_full_disk_without_a_file_name_is_one_line(capsys, monkeypatch, tmp_path):
    error = OSError(28, "No space left on device")
    code, _, err = run_cli(capsys, *_info_raises(monkeypatch, tmp_path, error))
    assert_one_line_error(code, err, "No space left on device")


def test_a_data_not_found_error_renders_its_flags_as_a_ressl_error(capsys, monkeypatch, tmp_path):
    error = DataNotFoundError(
        "cifar10 is not in {data_root}; pass {download}", "data_root", "download"
    )
    code, _, err = run_cli(capsys, *_info_raises(monkeypatch, tmp_path, error))
    assert_one_line_error(code, err, "cifar10 is not in --data-root; pass --download")


def test_a_real_bad_input_is_still_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    code, _, err = run_cli(capsys, "info", bad)
    assert_one_line_error(code, err, str(bad))


def test_the_hierarchy_is_small_and_every_kind_is_a_ressl_value_error():
    kinds = [
        CheckpointError,
        ConfigError,
        DataError,
        DataNotFoundError,
        DivergedError,
        ExportError,
        InputError,
        RunFileError,
        RunInUseError,
        UserError,
    ]
    for kind in kinds:
        assert issubclass(kind, ResslError) and issubclass(kind, ValueError)
    assert issubclass(DataNotFoundError, DataError) and issubclass(DataNotFoundError, OSError)
    with pytest.raises(UserError, match="^-o out.onnx exists; pass --overwrite$") as e:
        fail("-o out.onnx exists; pass --overwrite")
    assert e.value.render(lambda s: "--" + s) == "-o out.onnx exists; pass --overwrite"


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ValueError("first\nsecond"), "first"),
        (RuntimeError("\n\n  indented first  \nsecond"), "indented first"),
        (KeyError(), "KeyError"),
        (OSError("   \n  "), "OSError"),
        (ValueError("x" * 1000), "x" * 300),
    ],
)
def test_first_line_is_the_first_non_empty_line_or_the_type_name(error, line):
    assert first_line(error) == line
    assert first_line(ValueError("abcdef"), limit=3) == "abc"


def test_one_is_number_a_finite_real_not_a_bool():
    from ressl.rules import is_number
    from ressl.views import checks

    assert checks.is_number is is_number  # the views' checks use the rules' one
    assert is_number(1) and is_number(0.5) and is_number(np.float32(2))
    for value in (True, math.inf, math.nan, "1", None):
        assert not is_number(value)
    with pytest.raises(ConfigError, match="must be a pair"):
        checks.check_range("scale", (0.2, math.inf))


@pytest.mark.parametrize(
    ("call", "kind"),
    [
        (lambda: __import__("ressl.jsontext").jsontext.parse_json("{", "x"), DataError),
        (lambda: __import__("ressl.jsontext").jsontext.parse_json("[" * 100, "x"), DataError),
        (lambda: __import__("ressl.schedules").schedules.cosine_lr(0, 0, 1.0, 0), ConfigError),
        (
            lambda: __import__("ressl.schedules").schedules.momentum_schedule(0, 10, 2.0),
            ConfigError,
        ),
    ],
)
def test_bad_input_to_the_library_is_a_specific_ressl_error(call, kind):
    with pytest.raises(kind):
        call()


def test_bad_files_are_their_kinds(tmp_path):
    from ressl.export.modelfile import read_model_info

    from ressl.data.formats.fashion_mnist import read_idx

    idx = tmp_path / "t10k-images-idx3-ubyte"
    idx.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="too short for an idx file"):
        read_idx(idx)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"\x00garbage")
    with pytest.raises(ExportError, match="not a valid ONNX file"):
        read_model_info(onnx_file)


def test_one_onnxruntime_session_opener_refuses_a_bad_file_and_device(tmp_path):
    from ressl.export.embedder import open_session

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="is not a valid ONNX model onnxruntime can load"):
        open_session(bad, "cpu")
    with pytest.raises(ConfigError, match="device must be 'auto', 'cpu' or 'cuda'"):
        open_session(bad, "tpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pytest.importorskip("starlette")
    from ressl.export import export_onnx

    from ressl import ReSSL

    net = ReSSL(
        "small", in_channels=3, image_size=16, hidden_dim=16, embed_dim=8, width=4, queue_size=16
    ).student.eval()
    path = tmp_path_factory.mktemp("errors") / "m.onnx"
    export_onnx(
        net,
        path,
        image_size=16,
        channels=3,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        backbone="small",
        verify=False,
    )
    return path


@pytest.fixture
def service(model):
    """A fresh service for each request (stopping one shuts its thread pools)."""
    from ressl.export.serve_settings import ServeSettings
    from ressl.export.server import EmbeddingService

    return lambda: EmbeddingService(ServeSettings(str(model), device="cpu"))


class _Request:
    """What ``EmbeddingService.embed`` reads of a request: one PNG as a JSON body."""

    headers = {"content-type": "application/json"}
    query_params: dict[str, str] = {}

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def stream(self):
        yield self.body


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _embed(service, body: bytes):
    """``service``'s answer to a request ``body``, its batcher started and stopped around it."""

    async def scenario():
        await service.batcher.start()
        try:
            return await service.embed(_Request(body))
        finally:
            await service.batcher.stop()

    return asyncio.run(scenario())


def test_a_server_bug_is_a_500_with_its_traceback_logged(service, monkeypatch, caplog):
    body = json.dumps({"images": [base64.b64encode(_png()).decode()]}).encode()
    assert _embed(service(), body).status_code == 200

    def broken(batch):
        raise KeyError("a bug")

    buggy = service()
    monkeypatch.setattr(buggy.batcher, "run", broken)
    with caplog.at_level(logging.ERROR, logger="ressl.export.server"):
        response = _embed(buggy, body)
    assert response.status_code == 500
    assert b"KeyError" in response.body
    (record,) = [r for r in caplog.records if r.name == "ressl.export.server"]
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_a_clients_bad_image_is_a_400_not_logged(service, caplog):
    body = json.dumps({"images": [base64.b64encode(b"not an image").decode()]}).encode()
    with caplog.at_level(logging.ERROR, logger="ressl.export.server"):
        response = _embed(service(), body)
    assert response.status_code == 400
    assert not [r for r in caplog.records if r.name == "ressl.export.server"]
