"""``ressl.runs.weights``: the loading code printed by ``ressl export -o X.safetensors`` and
``ressl info X.safetensors`` gives ressl's features when pasted, from any folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY, run_cli

from ressl import load_encoder, train


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    """A torchvision ResNet-18 (BatchNorm, the small-image stem) trained for one tiny epoch."""
    out = tmp_path_factory.mktemp("resnet") / "run"
    train(
        **dict(
            TINY,
            dataset=f"folder:{image_folder}",
            backbone="torchvision:resnet18",
            epochs=1,
            out=str(out),
        )
    )
    return out


def _printed_code(stdout: str) -> str:
    return stdout.split("load it without ressl:\n", 1)[1]


def _features_of_pasted_code(code: str, images: np.ndarray, folder: Path) -> np.ndarray:
    """Run ``code`` as a user would, in a fresh Python in another folder, on ``images``."""
    folder.mkdir()
    np.save(folder / "x.npy", images)
    script = code + (
        "\nimport numpy\n"
        "numpy.save('f.npy', features(torch.from_numpy(numpy.load('x.npy'))).numpy())\n"
    )
    (folder / "paste.py").write_text(script)
    done = subprocess.run([sys.executable, "paste.py"], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return np.load(folder / "f.npy")


@pytest.mark.slow
def test_pasted_loading_code_gives_ressls_features(capsys, tmp_path, resnet_run):
    out = tmp_path / "weights" / "backbone.safetensors"
    out.parent.mkdir()
    code, stdout, err = run_cli(capsys, "export", resnet_run, "-o", out)
    assert code == 0, err
    exported = _printed_code(stdout)
    assert str(out.resolve()) in exported and "net.eval()" in exported

    encoder, settings = load_encoder(resnet_run)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(settings["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(settings["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = encoder.features((images - mean) / std).numpy()
    got = _features_of_pasted_code(exported, images.numpy(), tmp_path / "elsewhere")
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # ressl info prints the code for the file where it is, run from another folder too
    code, stdout, err = run_cli(capsys, "info", out)
    assert code == 0, err
    got = _features_of_pasted_code(_printed_code(stdout), images.numpy(), tmp_path / "other")
    np.testing.assert_allclose(got, expected, atol=1e-5)
