import json
import signal

import pytest
import torch

from ressl import TrainConfig, load_checkpoint, load_encoder, train
from ressl.errors import CheckpointError

TIMING = {"images_per_second", "epoch_seconds"}


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def state(path):
    tensors, meta = load_checkpoint(path)
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}, meta


def assert_same_state(a, b):
    ta, ma = state(a)
    tb, mb = state(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert ma["step"] == mb["step"] and ma["epoch"] == mb["epoch"]


def test_run_writes_checkpoint_and_metrics(tmp_path, tiny_settings):
    path = train(out=tmp_path / "run", **tiny_settings)
    assert path == tmp_path / "run" / "last.safetensors"
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert {"epoch", "step", "loss", "lr", "images_per_second", "knn_top1"} <= r.keys()
        assert r["loss"] > 0 and r["images_per_second"] > 0
    assert rows[-1]["step"] == 2 * (36 // 8)
    _, meta = load_checkpoint(path)
    settings = json.loads(meta["settings"])
    assert (
        settings["queue_size"] == 32 and settings["channels"] == 3 and settings["image_size"] == 16
    )


def test_train_learns_color_classes(tmp_path, tiny_settings):
    # Three classes of distinct colours: a few epochs must beat chance (33%) by far under kNN.
    s = dict(tiny_settings, epochs=4, knn_every=4)
    train(out=tmp_path / "run", **s)
    assert metrics(tmp_path / "run")[-1]["knn_top1"] >= 75.0


def test_resume_is_bitwise_exact(tmp_path, tiny_settings):
    straight = train(out=tmp_path / "a", **tiny_settings)
    train(out=tmp_path / "b", **dict(tiny_settings, epochs=1))
    resumed = train(resume=tmp_path / "b", epochs=2)
    assert_same_state(straight, resumed)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(tmp_path, tiny_settings):
    straight = train(out=tmp_path / "a", **tiny_settings)

    def interrupt_at_step_6(event):
        if event.kind == "step" and event.step == 6:  # epoch 2, batch 2 of 4
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(out=tmp_path / "b", callback=interrupt_at_step_6, **tiny_settings)
    _, meta = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert (meta["epoch"], meta["batch_in_epoch"]) == ("1", "2")
    resumed = train(resume=tmp_path / "b" / "last.safetensors")
    assert_same_state(straight, resumed)
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_load_encoder_reproduces_student_features(tmp_path, tiny_settings):
    path = train(out=tmp_path / "run", **dict(tiny_settings, epochs=1))
    encoder, settings = load_encoder(path)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        z = encoder(x)
    assert z.shape == (2, 8) and settings["backbone"] == "small"
    teacher, _ = load_encoder(path, weights="teacher")
    assert not torch.equal(teacher(x), z)  # EMA weights differ from the student's


def test_existing_run_is_never_overwritten(tmp_path, tiny_settings):
    path = train(out=tmp_path / "run", **dict(tiny_settings, epochs=1))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        train(out=tmp_path / "run", **tiny_settings)
    assert path.read_bytes() == before


def test_batch_larger_than_dataset(tmp_path, tiny_settings):
    with pytest.raises(
        ValueError, match=r"batch_size 64 is larger than the training set \(36 images\)"
    ):
        train(out=tmp_path / "run", **dict(tiny_settings, batch_size=64, queue_size=64))


def test_resume_rejects_conflicting_settings_and_non_checkpoints(tmp_path, tiny_settings):
    train(out=tmp_path / "run", **dict(tiny_settings, epochs=1))
    with pytest.raises(ValueError, match="but queue_size 64 differs from the checkpoint's 32"):
        train(resume=tmp_path / "run", queue_size=64)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        train(resume=junk)


def test_streamed_folder_crops_in_workers_reproducibly(tmp_path, tiny_settings, monkeypatch):
    monkeypatch.setattr("ressl.data.folders.MAX_IN_MEMORY_BYTES", 0)  # force the DataLoader path
    in_process = train(out=tmp_path / "a", **dict(tiny_settings, epochs=1, num_workers=0))
    workers = train(out=tmp_path / "b", **dict(tiny_settings, epochs=1, num_workers=2))
    assert_same_state(in_process, workers)  # crops seeded per (seed, epoch, image), not per worker
    assert metrics(tmp_path / "a")[0]["loss"] > 0


@pytest.mark.parametrize(
    "extra", [dict(crops=(16, 12, 8)), dict(symmetric=True)], ids=["multicrop", "symmetric"]
)
def test_streamed_folder_multicrop_and_symmetric(tmp_path, tiny_settings, monkeypatch, extra):
    import sys

    monkeypatch.setattr(
        "ressl.data.folders.MAX_IN_MEMORY_BYTES", 0
    )  # crops cut in the DataLoader workers
    crops_module = sys.modules["ressl.views.compose"]  # StrongView calls strong_view here
    sides = []
    real = crops_module.strong_view

    def spy(images, **kw):
        assert kw["crop"] is False and images.dtype == torch.uint8
        sides.append(images.shape[-1])
        return real(images, **kw)

    monkeypatch.setattr(crops_module, "strong_view", spy)
    train(out=tmp_path / "run", **dict(tiny_settings, epochs=1, **extra))
    assert sides[:3] == ([16, 12, 8] if "crops" in extra else [16, 16, 16])
    assert metrics(tmp_path / "run")[0]["loss"] > 0


def test_streamed_folder_resumes_bitwise(tmp_path, tiny_settings, monkeypatch):
    monkeypatch.setattr("ressl.data.folders.MAX_IN_MEMORY_BYTES", 0)
    straight = train(out=tmp_path / "a", **tiny_settings)
    train(out=tmp_path / "b", **dict(tiny_settings, epochs=1))
    assert_same_state(straight, train(resume=tmp_path / "b", epochs=2))


def test_knn_every_minus_one_never_runs_the_monitor(tmp_path, tiny_settings):
    train(out=tmp_path / "run", **dict(tiny_settings, knn_every=-1))
    assert all("knn_top1" not in row for row in metrics(tmp_path / "run"))
    with pytest.raises(ValueError, match="knn_every must be an integer >= -1"):
        TrainConfig.from_keywords(**dict(tiny_settings, knn_every=-2))


def test_unlabelled_flat_folder_trains_without_monitor(tmp_path, tiny_settings, image_folder):
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted((image_folder / "train").rglob("*.png"))):
        shutil.copy(f, flat / f"{i}.png")
    train(out=tmp_path / "run", **dict(tiny_settings, dataset=f"folder:{flat}", epochs=1))
    (row,) = metrics(tmp_path / "run")
    assert "knn_top1" not in row and row["loss"] > 0


def test_strong_view_options_reach_the_augmentation(tmp_path, tiny_settings, monkeypatch):
    import sys

    seen = []
    train_module = sys.modules["ressl.views.compose"]  # StrongView calls strong_view here

    real = train_module.strong_view

    def spy(images, **kw):
        seen.append({k: kw[k] for k in ("jitter", "jitter_p", "grayscale_p", "blur_p", "scale")})
        return real(images, **kw)

    monkeypatch.setattr(train_module, "strong_view", spy)
    train(
        out=tmp_path / "run",
        **dict(
            tiny_settings,
            epochs=1,
            jitter=(0.8, 0.8, 0.0, 0.0),
            jitter_p=1.0,
            grayscale_p=0.0,
            blur=0.5,
            crop_scale=(0.3, 0.9),
        ),
    )
    assert seen and all(
        k
        == {
            "jitter": (0.8, 0.8, 0.0, 0.0),
            "jitter_p": 1.0,
            "grayscale_p": 0.0,
            "blur_p": 0.5,
            "scale": (0.3, 0.9),
        }
        for k in seen
    )


def test_multicrop_and_symmetric_runs_train_and_resume(tmp_path, tiny_settings):
    for name, extra in (("multi", dict(crops=(16, 12, 8))), ("sym", dict(symmetric=True))):
        s = dict(tiny_settings, **extra)
        straight = train(out=tmp_path / f"{name}-a", **s)
        train(out=tmp_path / f"{name}-b", **dict(s, epochs=1))
        assert_same_state(straight, train(resume=tmp_path / f"{name}-b", epochs=2))
        rows = metrics(tmp_path / f"{name}-a")
        assert all(r["loss"] > 0 for r in rows)
        _, meta = load_checkpoint(straight)
        assert json.loads(meta["settings"])["symmetric"] is (name == "sym")


def test_symmetric_enqueues_both_teacher_batches(tmp_path, tiny_settings):
    s = dict(tiny_settings, symmetric=True, queue_size=48, epochs=1)
    tensors, _ = load_checkpoint(train(out=tmp_path / "run", **s))
    steps = 36 // 8
    assert int(tensors["model.queue_ptr"]) == (steps * 2 * 8) % 48


def test_multicrop_student_sees_every_crop_size(tmp_path, tiny_settings, monkeypatch):
    import sys

    crops_module = sys.modules["ressl.views.compose"]  # StrongView calls strong_view here
    sizes, scales = [], []
    real = crops_module.strong_view

    def spy(images, **kw):
        sizes.append(kw["size"])
        scales.append(kw["scale"])
        return real(images, **kw)

    monkeypatch.setattr(crops_module, "strong_view", spy)
    train(out=tmp_path / "run", **dict(tiny_settings, epochs=1, crops=(16, 12, 8)))
    assert sizes[:3] == [16, 12, 8]
    assert [v for r in scales[:3] for v in r] == pytest.approx([0.2, 1.0, 0.15, 0.75, 0.1, 0.5])


def test_crop_larger_than_image_is_refused_at_start(tmp_path, tiny_settings):
    with pytest.raises(ValueError, match=r"crops must be sides in \[8, 16\]"):
        train(out=tmp_path / "run", **dict(tiny_settings, crops=(24, 16)))


def test_nesterov_reaches_the_optimiser(tmp_path, tiny_settings):
    plain = train(out=tmp_path / "plain", **dict(tiny_settings, epochs=1))
    nesterov = train(out=tmp_path / "nesterov", **dict(tiny_settings, epochs=1, nesterov=True))
    (a, meta_a), (b, meta_b) = load_checkpoint(plain), load_checkpoint(nesterov)
    groups = json.loads(meta_b["optimizer"])["param_groups"]
    assert (
        all(g["nesterov"] for g in groups)
        and not json.loads(meta_a["optimizer"])["param_groups"][0]["nesterov"]
    )
    assert not torch.equal(
        a["model.student.head.net.0.weight"], b["model.student.head.net.0.weight"]
    )
    with pytest.raises(ValueError, match="nesterov needs sgd_momentum > 0"):
        TrainConfig(nesterov=True, sgd_momentum=0.0)


def test_a_config_object_trains_like_the_keywords(tmp_path, tiny_settings):
    by_keywords = train(out=tmp_path / "a", **dict(tiny_settings, epochs=1))
    config = TrainConfig(**dict(tiny_settings, epochs=1, out=str(tmp_path / "b")))
    assert_same_state(by_keywords, train(config))
    with pytest.raises(TypeError, match="either config or keyword settings"):
        train(config, epochs=3)


def test_a_stop_between_window_ends_keeps_every_loss(tmp_path, tiny_settings, monkeypatch):
    from ressl.training.stopping import StopAgreement

    calls = []

    def stop_at_second_step(self):  # as if Ctrl-C came after the window check of step 2
        calls.append(1)
        if len(calls) == 2:
            self.requested = self.stopping = True
        return self.stopping

    monkeypatch.setattr(StopAgreement, "after_step", stop_at_second_step)
    with pytest.raises(KeyboardInterrupt):
        train(out=tmp_path / "run", **dict(tiny_settings, progress_every=10))
    _, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert (meta["batch_in_epoch"], meta["epoch_loss_count"]) == ("2", "2")
    assert float(meta["epoch_loss_sum"]) > 0


@pytest.mark.parametrize("kernel", ["fused", "foreach", "default"])
def test_the_sgd_kernel_setting_picks_the_update(kernel):
    from ressl.distributed import World
    from ressl.training.build import sgd

    p = torch.zeros(3, requires_grad=True)
    opt = sgd([{"params": [p], "weight_decay": 0.0}], 0.1, TrainConfig(sgd_kernel=kernel), World())
    group = opt.param_groups[0]
    assert (group["fused"], group["foreach"]) == {
        "fused": (True, None),
        "foreach": (None, True),
        "default": (None, None),
    }[kernel]


def test_fused_sgd_falls_back_to_foreach_where_it_has_no_kernel(caplog):
    """PyTorch refuses fused SGD for such parameters only at the first step; ressl checks
    before it builds the optimiser."""
    from ressl.distributed import World
    from ressl.training.build import sgd

    p = torch.zeros(3, device="meta", requires_grad=True)
    with caplog.at_level("WARNING", logger="ressl"):
        opt = sgd([{"params": [p], "weight_decay": 0.0}], 0.1, TrainConfig(), World())
    assert opt.param_groups[0]["foreach"] and not opt.param_groups[0]["fused"]
    assert "fused SGD has no kernel for torch.float32 meta parameters" in caplog.text


@pytest.mark.slow
def test_resume_repairs_a_damaged_metrics_file_from_the_checkpoint(tmp_path, tiny_settings, caplog):
    """A cut line used to make --resume refuse although the checkpoint holds the row."""
    run = tmp_path / "run"
    train(out=run, **dict(tiny_settings, epochs=1))
    saved = metrics(run)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": 2.2, \n')
    with caplog.at_level("WARNING", logger="ressl"):
        train(resume=run, epochs=2)
    assert "metrics.jsonl line 1 is not valid JSON; dropping it" in caplog.text
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == saved[0]


@pytest.mark.slow
def test_resume_says_when_the_folder_changed(tmp_path, tiny_settings, image_folder, caplog):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(image_folder, folder)
    run = tmp_path / "run"
    train(out=run, **dict(tiny_settings, dataset=f"folder:{folder}", epochs=1))
    settings = json.loads(load_checkpoint(run / "last.safetensors")[1]["settings"])
    assert settings["data_files"] == 36 and len(settings["data_digest"]) == 16
    with caplog.at_level("WARNING", logger="ressl"):
        train(resume=run, epochs=2)  # unchanged: nothing said
    assert "changed since" not in caplog.text
    for i in range(8):
        shutil.copy(folder / "train/class_0/0.png", folder / f"train/class_0/extra{i}.png")
    with caplog.at_level("WARNING", logger="ressl"):
        train(resume=run, epochs=3)
    assert "changed since" in caplog.text and "44 image files where it trained on 36" in caplog.text
    caplog.clear()
    (folder / "train/class_0/extra0.png").rename(folder / "train/class_1/extra0.png")
    with caplog.at_level("WARNING", logger="ressl"):
        train(resume=run, epochs=4)  # same count, another class: still said
    assert "44 image files, as before, but not the same ones" in caplog.text
