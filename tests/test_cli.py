import json
import subprocess
import sys

from cli_helpers import assert_one_line_error, run_cli


def tiny_args(folder, out):
    return [
        "train",
        "--dataset",
        f"folder:{folder}",
        "--backbone",
        "small",
        "--width",
        "4",
        "--hidden-dim",
        "16",
        "--embed-dim",
        "8",
        "--image-size",
        "16",
        "--batch-size",
        "8",
        "--queue-size",
        "32",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--knn-every",
        "1",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--out",
        out,
    ]


def test_train_then_resume_then_info(capsys, tmp_path, image_folder):
    run = tmp_path / "run"
    code, out, err = run_cli(
        capsys, *tiny_args(image_folder, run)[:-4], "--epochs", "1", "--out", run
    )
    assert code == 0, err
    assert out.strip() == str(run / "last.safetensors")
    assert "epoch 1/1" in err and "knn top-1" in err
    code, out, err = run_cli(capsys, "train", "--resume", run, "--epochs", "2")
    assert code == 0, err
    assert "epoch 2/2" in err
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    code, out, err = run_cli(capsys, "info", run)
    assert code == 0 and "epoch 2/2" in out and '"small"' in out
    code, out, _ = run_cli(capsys, "info", run / "last.safetensors", "--json")
    assert code == 0 and json.loads(out)["settings"]["queue_size"] == 32


def test_user_errors_are_one_line(capsys, tmp_path, image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    cases = [
        (["train", "--dataset", f"folder:{tmp_path / 'missing'}"], "does not exist"),
        (["train", "--dataset", f"folder:{empty}"], "no image file"),
        (["train", "--resume", tmp_path / "notes.txt"], "not a readable safetensors file"),
        (["train", "--resume", tmp_path / "nowhere"], "no such file or folder"),
        (["train", "--epochs", "abc"], "--epochs"),
        (["train", "--epochs", "0"], "epochs must be an integer >= 1"),
        (["train", "--teacher-temperature", "-1"], "teacher_temperature must be a number > 0"),
        (["train", "--crop-scale", "big"], "--crop-scale must be 2 comma-separated numbers"),
        (["train", "--jitter", "0.4,0.4"], "--jitter must be 4 comma-separated numbers"),
        (["train", "--jitter-p", "1.5"], "jitter_p must be a probability in [0, 1]"),
        (["train", "--backbone", "vit"], "--backbone"),
        (["train", "--dataset", "mnist"], "dataset must be one of"),
        (["train", "--device", "tpu"], "device must be"),
        (["info", tmp_path / "notes.txt"], "not a readable safetensors file"),
        (["info", tmp_path / "absent.safetensors"], "no such file or folder"),
        (["frobnicate"], "frobnicate"),
    ]
    for args, needle in cases:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, needle)
    args = tiny_args(image_folder, tmp_path / "big")
    args[args.index("--batch-size") + 1] = "64"
    args[args.index("--queue-size") + 1] = "64"
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "larger than the training set")


def test_console_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ressl", "info", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ressl: error: {tmp_path / 'none'}: no such file or folder"
    help_proc = subprocess.run(
        [sys.executable, "-m", "ressl", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_proc.returncode == 0 and "--queue-size" in help_proc.stdout


def test_multicrop_and_symmetric_options(capsys, tmp_path, image_folder):
    args = tiny_args(image_folder, tmp_path / "run")
    code, _, err = run_cli(
        capsys, *args, "--epochs", "1", "--crops", "16,12", "--crop-scales", "0.2:1,0.1:0.5"
    )
    assert code == 0, err
    code, out, _ = run_cli(capsys, "info", tmp_path / "run", "--json")
    settings = json.loads(out)["settings"]
    assert settings["crops"] == [16, 12] and settings["crop_scales"] == [[0.2, 1.0], [0.1, 0.5]]
    code, _, err = run_cli(
        capsys, *tiny_args(image_folder, tmp_path / "sym"), "--symmetric", "--queue-size", "12"
    )
    assert_one_line_error(code, err, "queue_size must be >= 2 x batch_size")
    code, _, err = run_cli(capsys, *tiny_args(image_folder, tmp_path / "x"), "--crops", "16,big")
    assert_one_line_error(code, err, "--crops must be comma-separated crop sides")
    code, _, err = run_cli(
        capsys, *tiny_args(image_folder, tmp_path / "y"), "--crops", "16,8", "--crop-scales", "0.2"
    )
    assert_one_line_error(code, err, "--crop-scales must be comma-separated lo:hi ranges")
