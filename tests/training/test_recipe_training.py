"""The paper's training protocol: teacher BatchNorm statistics, warm-up from 0, the weight-decay
rule; older checkpoints continue as they began."""

from __future__ import annotations

import json

import pytest
import torch

from ressl import TrainConfig, load_checkpoint, train
from ressl.config.resuming import from_saved
from ressl.models.network import ReSSL
from ressl.training.build import param_groups


def _bn_buffers(tensors: dict, net: str) -> dict:
    return {
        k.split(f"model.{net}.", 1)[1]: v
        for k, v in tensors.items()
        if k.startswith(f"model.{net}.") and "running_mean" in k
    }


def test_a_trained_teacher_has_batchnorm_statistics_of_its_own(tmp_path, tiny_settings):
    ckpt = train(**dict(tiny_settings, out=str(tmp_path / "run"), epochs=1))
    tensors, _ = load_checkpoint(ckpt)
    student, teacher = _bn_buffers(tensors, "student"), _bn_buffers(tensors, "teacher")
    assert not any(torch.equal(student[k], teacher[k]) for k in student)
    assert all(v.abs().sum() > 0 for v in teacher.values())  # moved by its own forward passes


@pytest.mark.parametrize("rule", ["own", "student"])
def test_the_teacher_statistics_follow_its_own_forward_unless_copied(rule):
    from ressl.training.step import training_step

    model = ReSSL("small", width=4, image_size=16, hidden_dim=16, embed_dim=8, queue_size=32)
    for m in model.student.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(100.0)  # far from anything the images give
    opt = torch.optim.SGD(model.student.parameters(), lr=0.0)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    training_step(model, opt, [x], [x], momentum=0.99, teacher_bn=rule)
    first = next(m for m in model.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    if rule == "own":  # zeros, moved once by the teacher's batch (BatchNorm momentum 0.1)
        assert first.running_mean.abs().max() < 1.0
    else:  # the student's (about 90 after its own forward), moved once more
        assert first.running_mean.min() > 50


def test_warmup_starts_at_zero(tmp_path, tiny_settings):
    train(
        **dict(
            tiny_settings, out=str(tmp_path / "run"), epochs=2, warmup_epochs=1, progress_every=1
        )
    )
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    ]
    base = 0.06 * 8 / 256  # the recipe's lr per 256 images, batch 8
    # 4 steps per epoch: the lr of steps 0..3 is base * (0, 1, 2, 3) / 4 (each row: its window's last step)
    assert [r["lr"] for r in rows[:4]] == pytest.approx([base * s / 4 for s in range(4)])


def test_weight_decay_rules():
    model = ReSSL("resnet18", image_size=32, queue_size=8)
    names = dict(model.student.named_parameters())
    index = {id(p): n for n, p in names.items()}

    def exempt(rule: str) -> set[str]:
        decay, none = param_groups(model.student, 5e-4, rule)
        assert none["weight_decay"] == 0.0 and len(decay["params"]) + len(none["params"]) == len(
            names
        )
        return {index[id(p)] for p in none["params"]}

    one_d = exempt("1d")
    by_name = exempt("names")
    assert "backbone.bn1.weight" in one_d and "backbone.bn1.weight" in by_name
    assert "head.net.0.bias" in one_d and "head.net.0.bias" in by_name
    # the official ImageNet rule goes by names: a downsample BatchNorm ("layer2.0.downsample.1")
    # has no "bn" in its name, so its weight is decayed there
    assert "backbone.layer2.0.downsample.1.weight" in one_d - by_name
    assert TrainConfig(dataset="imagenet:/x").decay_exempt == "names"
    assert TrainConfig(dataset="cifar10").decay_exempt == "1d"


def test_a_checkpoint_from_before_the_settings_continues_as_it_began():
    saved = TrainConfig(dataset="imagenet:/x").to_dict()
    for key in ("teacher_bn", "warmup_start", "decay_exempt", "blur_mode"):
        del saved[key]
    old = from_saved(saved)
    assert (old.teacher_bn, old.warmup_start, old.decay_exempt, old.blur_mode) == (
        "student",
        "one-step",
        "1d",
        "relative",
    )
    new = TrainConfig(dataset="imagenet:/x")
    assert (new.teacher_bn, new.warmup_start, new.decay_exempt, new.blur_mode) == (
        "own",
        "zero",
        "names",
        "pil",
    )
