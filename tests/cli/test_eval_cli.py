"""``ressl eval knn|linear`` on a seconds-long run, an ONNX model, and bad input."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY, assert_one_line_error, run_cli, tiny_args

from ressl.runs.checkpoint import read_metadata
from ressl.training.loop import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, image_folder: Path) -> Path:
    run = tmp_path_factory.mktemp("evalrun") / "run"
    train(dataset=f"folder:{image_folder}", out=str(run), **TINY)
    return run


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


def test_eval_knn_prints_and_records(capsys, tiny_run: Path):
    code, out, err = run_cli(capsys, "eval", "knn", tiny_run, "--k", "5", "--device", "cpu")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert (
        lines[0].startswith("kNN (k 5, t 0.1) on folder:")
        and "36 train -> 12 test images" in lines[0]
    )
    assert "student backbone features (32-d)" in lines[0]
    assert lines[1].startswith("top-1 ") and "top-5" not in lines[1]  # 3 classes: no top-5
    row = records(tiny_run)[-1]
    assert row["protocol"] == "knn" and row["k"] == 5 and row["temperature"] == 0.1
    assert (
        row["checkpoint"] == "last.safetensors"
        and row["epoch"] == 2
        and row["weights"] == "student"
    )
    assert row["features"] == "backbone" and row["dim"] == 32
    assert row["train_images"] == 36 and row["test_images"] == 12 and 0 <= row["top1"] <= 100
    # The same number as the trainer's own monitor at the end of the run (bf16 there, so allow a little).
    monitor = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert abs(monitor["knn_top1"] - row["top1"]) <= 100 / 12 + 1e-6
    assert f"{row['top1']:.2f}%" in lines[1]


def test_eval_knn_json_teacher_without_record(capsys, tiny_run: Path):
    before = len(records(tiny_run)) if (tiny_run / "eval.jsonl").exists() else 0
    code, out, err = run_cli(
        capsys,
        "eval",
        "knn",
        tiny_run / "last.safetensors",
        "--weights",
        "teacher",
        "--device",
        "cpu",
        "--json",
        "--no-record",
    )
    assert code == 0, err
    row = json.loads(out)
    assert row["weights"] == "teacher" and row["k"] == 200 and "top1" in row
    after = len(records(tiny_run)) if (tiny_run / "eval.jsonl").exists() else 0
    assert after == before


def test_eval_linear_prints_and_records(capsys, tiny_run: Path):
    code, out, err = run_cli(
        capsys, "eval", "linear", tiny_run, "--epochs", "20", "--lr", "0.5", "--device", "cpu"
    )
    assert code == 0, err
    assert out.splitlines()[0].startswith("linear probe (20 epochs, lr 0.5) on folder:")
    row = records(tiny_run)[-1]
    assert (
        row["protocol"] == "linear"
        and row["epochs"] == 20
        and row["lr"] == 0.5
        and row["weight_decay"] == 0.0
    )
    assert row["train_top1"] >= 90.0  # 36 features of 3 colour classes in 32-d: easily fitted
    assert f"top-1 {row['top1']:.2f}%" in out


def test_eval_onnx_model(capsys, tmp_path: Path, tiny_run: Path, image_folder: Path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ressl.runs.checkpoint import load_encoder

    encoder, settings = load_encoder(tiny_run)

    class Served(torch.nn.Module):  # images in [0, 1] -> L2-normalised backbone features
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.register_buffer("mean", torch.tensor(settings["mean"]).view(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(settings["std"]).view(1, -1, 1, 1))

        def forward(self, x):
            return torch.nn.functional.normalize(
                self.encoder.features((x - self.mean) / self.std), dim=1
            )

    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            Served().eval(),
            (torch.rand(2, 3, 16, 16),),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["embedding"],
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
        )
    model = onnx.load(str(path))
    for key, value in {
        "head": "false",
        "weights": "student",
        "settings": json.dumps(settings),
    }.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))

    code, out, err = run_cli(
        capsys, "eval", "knn", path, "--k", "5", "--json"
    )  # dataset from the metadata
    assert code == 0, err
    row = json.loads(out)
    assert (
        row["features"] == "onnx:embedding"
        and row["model"] == "model.onnx"
        and row["head"] is False
    )
    code, out, err = run_cli(
        capsys, "eval", "knn", tiny_run, "--k", "5", "--json", "--device", "cpu"
    )
    assert abs(json.loads(out)["top1"] - row["top1"]) < 1e-6  # same features, same answer
    code, out, err = run_cli(capsys, "eval", "knn", path, "--k", "5", "--no-record")
    assert code == 0 and "ONNX output 'embedding' (backbone features)" in out


def test_eval_user_errors_are_one_line(capsys, tmp_path: Path, tiny_run: Path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    cases = [
        (["eval", "knn", tmp_path / "absent.safetensors"], "no such file or folder"),
        (["eval", "linear", tmp_path / "absent"], "no such file or folder"),
        (["eval", "knn", tmp_path / "notes.txt"], "not a readable safetensors file"),
        (["eval", "knn", tmp_path / "bad.onnx"], "is not a valid ONNX model"),
        (["eval", "knn", tiny_run, "--dataset", "mnist"], "dataset must be one of fashion-mnist"),
        (
            ["eval", "knn", tiny_run, "--dataset", f"folder:{tmp_path / 'nowhere'}"],
            "does not exist",
        ),
        (["eval", "knn", tiny_run, "--k", "0"], "--k must be >= 1"),
        (["eval", "linear", tiny_run, "--epochs", "0"], "--epochs must be >= 1"),
        (
            ["eval", "linear", tiny_run, "--lr", "-1", "--device", "cpu"],
            "--lr must be a number > 0",
        ),
        (["eval", "knn", tiny_run, "--device", "tpu"], "device must be"),
        (["eval", "frobnicate"], "frobnicate"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, needle)


def test_eval_reads_a_folder_with_the_encoders_channels_and_refuses_other_counts(
    capsys, tmp_path: Path, tiny_run: Path
):
    from ressl.cli import eval_cmd

    from ressl.errors import ConfigError

    source = eval_cmd.load_source(tiny_run, "student", torch.device("cpu"))
    source.channels = 1  # an encoder of greyscale images: the RGB folder is read as its luma
    assert eval_cmd.load_eval_data(source, None, None).channels == 1
    source.channels = 4  # caught before any forward pass
    with pytest.raises(ConfigError, match="takes 4-channel images"):
        eval_cmd.load_eval_data(source, None, None)


def test_a_grayscale_folder_trains_and_evaluates_on_one_channel(capsys, tmp_path: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c, level in (("dark", 40), ("light", 200)):
            (tmp_path / "grey" / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(level + rng.integers(-30, 30, (28, 28)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(tmp_path / "grey" / split / c / f"{i}.png")
    args = tiny_args(tmp_path / "grey", tmp_path / "run", epochs=1)
    i = args.index("--image-size")
    del args[i : i + 2]  # the size follows the files: 28 px
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    settings = json.loads(read_metadata(tmp_path / "run" / "last.safetensors")["settings"])
    assert (settings["channels"], settings["image_size"], len(settings["mean"])) == (1, 28, 1)
    code, out, err = run_cli(capsys, "eval", "knn", tmp_path / "run", "--k", "3", "--device", "cpu")
    assert code == 0 and "top-1" in out, err


def test_eval_json_prints_exactly_the_record_it_appends(capsys, tiny_run: Path):
    code, out, err = run_cli(
        capsys, "eval", "knn", tiny_run, "--k", "5", "--device", "cpu", "--json"
    )
    assert code == 0, err
    printed = json.loads(out)
    assert printed == records(tiny_run)[-1]
    assert {"time", "ressl_version", "top1"} <= printed.keys()


def test_info_defaults_to_the_current_folder(capsys, tiny_run: Path, monkeypatch, tmp_path):
    monkeypatch.chdir(tiny_run)
    code, out, err = run_cli(capsys, "info")
    assert code == 0, err
    assert out.startswith("checkpoint     .") and "progress       2 of 2 epochs done" in out
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "info")
    assert code != 0 and "last.safetensors" in err and "Traceback" not in err


def centroid(source, data, *, device="cpu", batch_size=512, progress=None, shrink: float = 1.0):
    """A toy protocol: the nearest class centre of the train features (scaled by ``shrink``)."""
    from ressl.eval.sources import extract

    train_f, train_y, test_f, test_y = extract(
        source, data, torch.device(device), batch_size, progress
    )
    centres = torch.stack([train_f[train_y == c].mean(0) for c in range(len(data.classes))])
    hits = (test_f @ (shrink * centres).T).argmax(1) == test_y
    return {
        "protocol": "centroid",
        "dataset": data.name,
        "shrink": shrink,
        "top1": 100.0 * hits.float().mean().item(),
    }


def test_a_new_protocol_is_one_function_and_one_entry(tiny_run: Path):
    """Registered once, a protocol runs from the API and as its own ``ressl eval`` command."""
    from ressl.cli.eval_cmd import eval_commands
    from typer.testing import CliRunner

    import ressl
    from ressl.errors import ConfigError
    from ressl.eval.protocols import unregister_protocol

    toy = ressl.Protocol(
        "centroid",
        centroid,
        "Nearest class centre.",
        {"shrink": "Scale of the centres."},
        lambda row, source: (f"centroid on {row['dataset']}", f"top-1 {row['top1']:.2f}%"),
    )
    runner = CliRunner()
    assert runner.invoke(eval_commands(), ["centroid", str(tiny_run)]).exit_code != 0
    with pytest.raises(ConfigError, match="protocol must be one of knn, linear, linear-paper"):
        ressl.evaluate(tiny_run, "centroid")
    ressl.register_protocol(toy)
    try:
        row = ressl.evaluate(tiny_run, "centroid", device="cpu", shrink=0.5)
        assert row["protocol"] == "centroid" and row["shrink"] == 0.5 and row["top1"] > 50
        with pytest.raises(ConfigError, match="centroid takes the options shrink; got k"):
            ressl.evaluate(tiny_run, "centroid", k=3)
        app = eval_commands()
        assert "--shrink" in runner.invoke(app, ["centroid", "--help"]).output
        args = ["centroid", str(tiny_run), "--shrink", "0.5", "--device", "cpu"]
        result = runner.invoke(app, [*args, "--json", "--no-record"])
        assert result.exit_code == 0, result.output
        printed = json.loads(result.stdout.strip().splitlines()[-1])
        assert printed["top1"] == row["top1"] and printed["shrink"] == 0.5
        result = runner.invoke(app, args)
        assert f"top-1 {row['top1']:.2f}%  (recorded in" in result.output
        assert records(tiny_run)[-1]["protocol"] == "centroid"
    finally:
        unregister_protocol("centroid")
    assert "centroid" not in ressl.PROTOCOLS


def test_the_api_runs_what_the_cli_runs(capsys, tiny_run: Path):
    import ressl

    row = ressl.evaluate(tiny_run, "knn", device="cpu", k=5)
    code, out, err = run_cli(
        capsys, "eval", "knn", tiny_run, "--k", "5", "--json", "--no-record", "--device", "cpu"
    )
    assert code == 0, err
    printed = json.loads(out)
    assert {k: printed[k] for k in ("top1", "k", "dim", "train_images")} == {
        k: row[k] for k in ("top1", "k", "dim", "train_images")
    }
