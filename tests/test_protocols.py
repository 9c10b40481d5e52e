"""The paper's protocols: teacher BatchNorm statistics, warm-up from 0, the weight-decay rule,
the paper's linear evaluation; older checkpoints continue as they began."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import run_cli

from ressl import TrainConfig, load_checkpoint, train
from ressl.config.resuming import from_saved
from ressl.data.sources import TensorImages
from ressl.eval.paper_linear import paper_linear_eval
from ressl.models.network import ReSSL
from ressl.runs.checkpoint import read_metadata
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


def _brightness_classes(n: int, seed: int) -> TensorImages:
    """Two classes told apart by brightness, which no crop or flip changes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    level = torch.where(labels == 1, 190, 60).view(n, 1, 1, 1)
    noise = torch.randint(-40, 40, (n, 3, 16, 16), generator=g)
    return TensorImages((level + noise).clamp(0, 255).to(torch.uint8), labels)


def test_the_papers_linear_evaluation_learns_a_known_answer():
    train_set, test_set = _brightness_classes(64, 0), _brightness_classes(32, 1)

    def pooled(x: torch.Tensor) -> torch.Tensor:  # a frozen "backbone": the channel means
        return x.mean(dim=(2, 3))

    seen = []
    result = paper_linear_eval(
        pooled,
        train_set,
        test_set,
        2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        image_size=16,
        epochs=5,
        lr=0.3,
        batch_size=16,
        progress=seen.append,
    )
    assert (
        result["top1"] == 100.0 and len(result["top1_per_epoch"]) == 5 and seen == [1, 2, 3, 4, 5]
    )
    assert result["best_top1"] == max(result["top1_per_epoch"]) and 1 <= result["best_epoch"] <= 5
    again = paper_linear_eval(
        pooled,
        train_set,
        test_set,
        2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        image_size=16,
        epochs=5,
        lr=0.3,
        batch_size=16,
    )
    assert again["top1_per_epoch"] == result["top1_per_epoch"]  # seeded
    with pytest.raises(ValueError, match="epochs must be an integer >= 1"):
        paper_linear_eval(
            pooled,
            train_set,
            test_set,
            2,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            image_size=16,
            epochs=0,
        )


def test_eval_linear_with_the_papers_protocol_records_the_final_epoch(
    capsys, tmp_path, tiny_settings
):
    run = tmp_path / "run"
    train(**dict(tiny_settings, out=str(run), epochs=1))
    code, out, err = run_cli(
        capsys,
        "eval",
        "linear",
        run,
        "--protocol",
        "paper",
        "--epochs",
        "2",
        "--probe-batch-size",
        "8",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "(final epoch); best" in out and "selected on the test set" in out
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert row["protocol"] == "linear-paper" and row["lr"] == 0.3 and row["epochs"] == 2
    assert row["top1"] == row["top1_per_epoch"][-1] and "best_epoch" in row
    assert read_metadata(run / "last.safetensors")["epoch"] == "1"
