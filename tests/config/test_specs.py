"""The model and data specs: built once by a run, stored as the checkpoint's settings, read
back and checked once; a shape setting is a field, its use and this test."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ressl import train
from ressl.config.resuming import from_saved
from ressl.config.seeds import views_seed
from ressl.config.settings import TrainConfig, settings
from ressl.config.specs import DataSpec, ModelSpec, run_settings
from ressl.errors import CheckpointError, ConfigError
from ressl.rules import CHANNELS, IMAGE_SIZE, MAX_IMAGE_SIZE
from ressl.runs.checkpoint import load_checkpoint, load_encoder, save_checkpoint
from ressl.runs.checks import check_file
from ressl.runs.weights import save_backbone_weights

#: A value each field's rule refuses, and a valid one that gives the tiny run's model other
#: tensor shapes (None: the field does not change the small CNN's shapes).
BAD_AND_OTHER = {
    "backbone": ("vgg:nope", "resnet18"),
    "width": (0, 8),
    "hidden_dim": (0, 32),
    "embed_dim": (-1, 16),
    "queue_size": (0, 64),
    "channels": (2, 1),
    "image_size": (7, None),  # the small CNN pools globally: any side, the same weights
}


def _rewritten(src: Path, dst: Path, **changes: object) -> Path:
    """``src`` saved as ``dst`` with its settings changed (a crafted checkpoint)."""
    tensors, meta = load_checkpoint(src)
    meta["settings"] = json.dumps({**json.loads(meta["settings"]), **changes})
    return save_checkpoint(dst, tensors, meta)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    from cli_helpers import TINY

    out = tmp_path_factory.mktemp("run")
    return train(**dict(TINY, dataset=f"folder:{image_folder}", out=str(out), epochs=1))


def test_every_model_field_is_stored_read_back_and_checked(tiny_run, tmp_path):
    assert set(BAD_AND_OTHER) == {f.name for f in dataclasses.fields(ModelSpec)}
    checked = check_file(tiny_run)
    spec = checked.model
    assert spec == ModelSpec("small", 4, 16, 8, 32, channels=3, image_size=16)
    assert ModelSpec.from_settings(spec.to_settings(), "x") == spec  # the round trip
    for name, (bad, other) in BAD_AND_OTHER.items():
        crafted = _rewritten(tiny_run, tmp_path / f"{name}.safetensors", **{name: bad})
        with pytest.raises(CheckpointError, match=f"its settings' {name} is "):
            check_file(crafted)
        if other is None:
            continue
        changed = _rewritten(tiny_run, tmp_path / f"{name}-other.safetensors", **{name: other})
        if name == "channels":  # mean/std follow the channels
            changed = _rewritten(changed, changed, mean=[0.5], std=[0.25])
        with pytest.raises(CheckpointError, match="its settings"):
            check_file(changed)  # the tensors are not those of the model the field describes
        missing = {k: v for k, v in checked.settings.items() if k != name}
        tensors, meta = load_checkpoint(tiny_run)
        meta["settings"] = json.dumps(missing)
        with pytest.raises(CheckpointError, match=f"its settings have no '{name}'"):
            check_file(save_checkpoint(tmp_path / "missing.safetensors", tensors, meta))


def test_the_data_spec_is_stored_and_checked_against_the_channels(tiny_run, tmp_path):
    checked = check_file(tiny_run)
    data = checked.data
    assert len(data.mean) == len(data.std) == 3 and data.num_classes == 3
    assert data.files is not None and data.files[0] == 36  # an image folder's files
    assert DataSpec.from_settings(data.to_settings(), 3, "x") == data
    for key, value in (("mean", [0.5, 0.5]), ("std", [0.2, 0.0, 0.2]), ("num_classes", -1)):
        crafted = _rewritten(tiny_run, tmp_path / f"{key}.safetensors", **{key: value})
        with pytest.raises(CheckpointError, match=f"its settings' {key} is "):
            check_file(crafted)


def test_the_stored_settings_are_the_config_and_the_specs(tiny_run):
    _, meta = load_checkpoint(tiny_run)
    checked = check_file(tiny_run)
    config = from_saved(checked.settings)
    assert meta["settings"] == json.dumps(run_settings(config, checked.model, checked.data))
    fields = ["image_size", "channels", "mean", "std", "num_classes", "data_files", "data_digest"]
    assert [k for k in checked.settings if k not in config.to_dict()] + [
        "image_size",
        "channels",
    ] == [
        *fields[2:],
        "image_size",
        "channels",
    ]


def test_exports_and_readers_take_the_specs(tiny_run, tmp_path):
    checked = check_file(tiny_run)
    encoder, settings = load_encoder(tiny_run)
    assert encoder.backbone(torch.zeros(2, 3, 16, 16)).shape[0] == 2
    assert settings["mean"] == list(checked.data.mean)
    weights = save_backbone_weights(tiny_run, tmp_path / "backbone.safetensors")
    assert (weights.mean, weights.std) == (checked.data.mean, checked.data.std)


def test_image_size_and_channels_have_one_rule_each():
    rules = {name: setting.rule for name, _, setting in settings()}
    assert rules["image_size"] is IMAGE_SIZE and rules["channels"] is CHANNELS
    assert ModelSpec.rules()["image_size"] is IMAGE_SIZE
    assert ModelSpec.rules()["channels"] is CHANNELS
    assert [IMAGE_SIZE.ok(v) for v in (7, 8, MAX_IMAGE_SIZE, MAX_IMAGE_SIZE + 1)] == [
        False,
        True,
        True,
        False,
    ]
    assert [CHANNELS.ok(v) for v in (0, 1, 2, 3, 4, True)] == [False, True, False, True] + [
        False
    ] * 2
    with pytest.raises(ConfigError, match="image_size"):
        TrainConfig(image_size=7)


def test_each_rank_draws_its_own_views_and_rank_0_the_single_process_ones():
    assert views_seed(5, 0) == 7
    assert len({views_seed(5, rank) for rank in range(64)}) == 64
