"""ressl.config.settings: one typed source for every training setting; ressl.data.registry: recipes as data."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ressl.config.notes import check_data, combination_notes, fit_data
from ressl.config.resuming import from_saved
from ressl.config.settings import BACKBONES, TrainConfig, settings
from ressl.data.registry import DATASETS, find, recipe_for
from ressl.errors import ConfigError, flag


def test_config_is_frozen_keyword_only_and_resolved():
    config = TrainConfig(dataset="cifar10", epochs=3)
    assert (config.lr, config.queue_size, config.backbone, config.epochs) == (
        0.06,
        4096,
        "resnet18",
        3,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainConfig("cifar10")  # type: ignore[misc]


def test_every_recipe_fills_exactly_the_recipe_fields():
    recipe_fields = {name for name, _, meta in settings() if meta.recipe}
    for entry in DATASETS.values():
        assert set(entry.recipe) == recipe_fields, entry.name
        config = TrainConfig(dataset=entry.spec.replace("PATH", "/data"))
        assert {k: getattr(config, k) for k in recipe_fields} == dict(entry.recipe)
    for name, default, meta in settings():
        assert (default is None) == (meta.recipe or meta.optional), name


def test_from_keywords_takes_none_as_default_and_refuses_unknown_names():
    assert TrainConfig.from_keywords(batch_size=None, lr=None) == TrainConfig()
    with pytest.raises(ConfigError, match="unknown setting.*batch_sise.*valid: dataset"):
        TrainConfig.from_keywords(batch_sise=8)


def test_values_are_coerced_to_the_field_types():
    config = TrainConfig(crop_scale=[0.3, 1], crops="16,12", crop_scales="0.2:1,0.1:0.5", lr=1)
    assert config.crop_scale == (0.3, 1.0) and config.crops == (16, 12)
    assert config.crop_scales == ((0.2, 1.0), (0.1, 0.5))
    assert isinstance(config.lr, float) and config.lr == 1.0


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(epochs=0), "epochs must be an integer >= 1, got 0"),
        (dict(epochs=2.5), "epochs must be an integer >= 1, got 2.5"),
        (dict(batch_size=True), "batch_size must be an integer >= 2, got True"),
        (dict(lr=float("nan")), "lr must be a number > 0 and < 3.40282e+38, got nan"),
        (dict(lr=float("inf")), "lr must be a number > 0 and < 3.40282e+38, got inf"),
        (dict(sgd_momentum=1.0), "sgd_momentum must be a number >= 0 and < 1, got 1.0"),
        (
            dict(backbone="vit"),
            "backbone must be one of small, resnet18, resnet50, torchvision:NAME or timm:NAME, got 'vit'",
        ),
        (dict(precision="fp8"), "precision must be one of 'auto', 'bf16', 'fp32'"),
        (dict(device="tpu"), "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        (dict(crop_scale="big"), "crop_scale must be 2 comma-separated numbers like 0.2,1.0"),
        (dict(crops=(16, 4)), "crops must be crop sides >= 8"),
        (dict(dataset="mnist"), "dataset must be one of fashion-mnist, cifar10"),
        (dict(dataset="folder:"), "dataset folder:PATH needs the folder's path"),
        (dict(symmetric="yes"), "symmetric must be True or False, got 'yes'"),
        # torch's generators take 64 bits; beyond, its own words never named the flag
        (
            dict(seed=10**20),
            "seed must be an integer in [-9223372036854775808, 9223372036854775807]",
        ),
        (dict(seed=-(2**63) - 1), "seed must be an integer in [-9223372036854775808"),
        (
            dict(ema_momentum=1.0),
            "ema_momentum must be a number >= 0 and < 1 (1 would keep the teacher",
        ),
        (dict(ema_momentum=-0.1), "ema_momentum must be a number >= 0 and < 1"),
        (
            dict(teacher_temperature=1e-30),
            "teacher_temperature must be a number >= 0.001 (a sharper",
        ),
        (dict(student_temperature=0.0), "student_temperature must be a number >= 0.001"),
    ],
)
def test_each_rule_names_the_setting_and_the_valid_range(changes, message):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**changes)
    assert message in str(e.value)
    name = next(iter(changes))
    assert e.value.render(flag).startswith(flag(name))  # the CLI's wording of the same error


def test_range_ends_are_valid():
    edges = dict(seed=2**63 - 1, ema_momentum=0.0, teacher_temperature=1e-3)
    assert TrainConfig(**edges).seed == 2**63 - 1
    assert TrainConfig(seed=-(2**63), ema_momentum=0.999999).ema_momentum == 0.999999


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"queue_size must be >= batch_size \(64\), got 32"):
        TrainConfig(batch_size=64, queue_size=32)
    with pytest.raises(ConfigError, match=r"queue_size must be >= 2 x batch_size \(128"):
        TrainConfig(batch_size=64, queue_size=100, symmetric=True)
    with pytest.raises(ConfigError, match="symmetric .* and multi-crop .* cannot be combined"):
        TrainConfig(symmetric=True, crops=(28, 20))
    with pytest.raises(ConfigError, match="crop_scales must be one .* per crop in crops"):
        TrainConfig(crop_scales=((0.2, 1.0),))
    error = ConfigError("{queue_size} must be >= {batch_size}", "queue_size", "batch_size")
    assert error.render(flag) == "--queue-size must be >= --batch-size"


def test_notes_and_checks_against_the_data():
    assert combination_notes(TrainConfig(epochs=10)) == []
    (note,) = combination_notes(TrainConfig(epochs=1, dataset="cifar10"))
    assert "warmup_epochs 5 >= epochs 1" in str(note)
    config = TrainConfig(batch_size=8, queue_size=64)
    assert check_data(config, 100) == []
    assert "larger than the training set (36 images)" in str(check_data(config, 36)[0])
    with pytest.raises(ConfigError, match="batch_size 8 is larger than the training set"):
        check_data(config, 5)
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        check_data(config, 100, world_size=3)
    (note,) = combination_notes(TrainConfig(epochs=10, decode="device", device="cpu"))
    assert note.render(flag).startswith("--decode device on --device cpu decodes every JPEG")
    assert combination_notes(TrainConfig(epochs=10, decode="device", device="cuda")) == []


def test_a_resumed_config_changes_only_what_may_change():
    saved = TrainConfig(dataset="cifar10", epochs=10, queue_size=4096)
    assert (
        from_saved(saved.to_dict(), {"epochs": 20, "device": "cpu", "queue_size": 4096}).epochs
        == 20
    )
    assert (
        from_saved(saved.to_dict(), {"crop_scale": "0.2,1"}) == saved
    )  # the same value, typed as text
    with pytest.raises(ConfigError, match="but queue_size 1024 differs from the checkpoint's 4096"):
        from_saved(saved.to_dict(), {"queue_size": 1024})
    with pytest.raises(ConfigError, match="epochs must be an integer >= 1"):
        from_saved(saved.to_dict(), {"epochs": 0})


def test_saved_settings_round_trip_through_json():
    config = TrainConfig(dataset="folder:/x", crops=(48, 32), crop_scales=((0.2, 1.0), (0.1, 0.6)))
    saved = json.loads(json.dumps({**config.to_dict(), "channels": 3, "mean": [0.5] * 3}))
    # the data's channels are saved, so a resume reads the folder as it was trained
    assert from_saved(saved) == config.replace(channels=3)


def test_recipes_are_data():
    assert find("CIFAR_10")[0] is DATASETS["cifar10"] and find("folder:/a:b")[1] == "/a:b"
    assert recipe_for("folder:/x", image_size=224) is DATASETS["imagenet"].recipe
    assert recipe_for("folder:/x", image_size=96) is DATASETS["folder"].recipe
    for spec in ("mnist", "cifar10:/x"):
        with pytest.raises(ValueError, match="dataset must be one of"):
            find(spec)
    assert set(BACKBONES) == {"small", "resnet18", "resnet50"}


def test_values_from_numpy_and_paths_are_stored_plainly():
    import numpy as np

    config = TrainConfig(
        epochs=np.int64(3), lr=np.float32(0.5), data_root="./data/", out="runs/{x}"
    )
    assert type(config.epochs) is int and type(config.lr) is float
    assert config.data_root == "data" and config.out == "runs/{x}"
    json.dumps(config.to_dict())  # what every checkpoint stores
    assert TrainConfig(device="cpu:0").device == "cpu:0"


def test_resume_compares_what_the_settings_mean():
    saved = TrainConfig(dataset="fmnist", data_root="data", epochs=2).to_dict()
    config = from_saved(saved, {"dataset": "Fashion_MNIST", "data_root": "./data/"})
    assert config.dataset == "fmnist" and config.epochs == 2
    with pytest.raises(ConfigError, match="but dataset 'cifar10' differs"):
        from_saved(saved, {"dataset": "cifar10"})
    # a resumable setting given again replaces a saved value this version no longer accepts
    assert from_saved({**saved, "device": "tpu"}, {"device": "cpu"}).device == "cpu"
    assert from_saved(saved, {"download": False, "data_root": "/mnt/x"}).download is False


def test_messages_keep_braces_and_survive_pickling():
    import pickle

    error = ConfigError("{out} runs/{x} already holds a run; choose another {out}", "out")
    assert str(error) == "out runs/{x} already holds a run; choose another out"
    assert error.render(flag) == "--out runs/{x} already holds a run; choose another --out"
    again = pickle.loads(pickle.dumps(error))
    assert again.render(flag) == error.render(flag) and str(again) == str(error)
    with pytest.raises(ConfigError) as e:
        TrainConfig(dataset="{x}")
    assert "got '{x}'" in e.value.render(flag)


def test_notes_name_settings_as_the_reader_knows_them():
    (note,) = combination_notes(TrainConfig(epochs=1))
    assert str(note).startswith("warmup_epochs 1 >= epochs 1")
    assert note.render(flag).startswith("--warmup-epochs 1 >= --epochs 1")


def test_defaults_that_cannot_fit_small_data_are_fitted_to_it():
    config = TrainConfig(dataset="folder:/x", epochs=2)  # batch 256, queue 16384, warm-up 5
    fitted, notes = fit_data(config, 480, given={"dataset", "epochs"})
    assert (fitted.batch_size, fitted.queue_size, fitted.warmup_epochs) == (240, 480, 0)
    said = [n.render(lambda name: "--" + name.replace("_", "-")) for n in notes]
    assert said[0].startswith("--batch-size 240 (default 256)")
    assert said[1].startswith("--queue-size 480 (default 16384)")
    assert said[2].startswith("--warmup-epochs 0 (default 5)")


def test_settings_the_user_gave_are_kept_even_when_they_do_not_fit():
    config = TrainConfig(dataset="folder:/x", epochs=2, queue_size=4096, warmup_epochs=3)
    fitted, notes = fit_data(
        config, 480, given={"dataset", "epochs", "queue_size", "warmup_epochs"}
    )
    assert (fitted.queue_size, fitted.warmup_epochs) == (4096, 3)
    assert fitted.batch_size == 240 and len(notes) == 1
    assert check_data(config, 480, 1)  # the queue is still warned about


def test_the_recipes_at_their_own_sizes_keep_their_defaults():
    for dataset, images in (("fashion-mnist", 60000), ("cifar10", 50000), ("stl10", 105000)):
        config = TrainConfig(dataset=dataset)
        fitted, notes = fit_data(config, images, given={"dataset"})
        assert fitted == config and notes == [], dataset


def test_a_fitted_batch_is_shared_evenly_by_the_processes_and_fills_a_symmetric_queue():
    config = TrainConfig(dataset="folder:/x", epochs=100, symmetric=True)
    fitted, _ = fit_data(config, 1000, given={"dataset"}, world_size=4)
    assert fitted.batch_size % 4 == 0 and fitted.batch_size <= 250
    assert fitted.queue_size % (2 * fitted.batch_size) == 0 and fitted.queue_size <= 1000
    tiny, _ = fit_data(TrainConfig(dataset="folder:/x"), 100, given={"dataset"})
    assert tiny.batch_size == 100 and tiny.queue_size == 100  # batch 256 > 100 images: one step
