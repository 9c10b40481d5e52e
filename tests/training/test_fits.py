"""What fits in memory: the estimate counts weights, queue and activations; what cannot fit is
refused before allocating."""

from __future__ import annotations

import dataclasses

import pytest
from cli_helpers import assert_one_line_error, run_cli, tiny_args


def test_memory_estimate_counts_weights_queue_and_activations():
    from ressl import ReSSL
    from ressl.config.specs import ModelSpec
    from ressl.training.fits import training_memory

    spec = ModelSpec("small", 4, 16, 8, 32, channels=3, image_size=16)
    wide = dataclasses.replace(spec, queue_size=64)
    one = training_memory(spec, batch_per_process=8, student_sides=[16], autocast=False)
    two = training_memory(wide, batch_per_process=16, student_sides=[16], autocast=False)
    model = ReSSL("small", in_channels=3, image_size=16, hidden_dim=16, embed_dim=8, width=4)
    params = sum(p.numel() for p in model.student.parameters())
    buffers = sum(b.numel() for b in model.student.buffers())
    assert one.parts["queue"][0] == 4 * 32 * 8 and two.parts["queue"][0] == 4 * 64 * 8
    assert one.parts["weights and optimiser state"][0] == 4 * (4 * params + 2 * buffers)
    step = "activations of a step"
    assert two.parts[step][0] == 2 * one.parts[step][0]  # linear in the batch
    half = training_memory(spec, batch_per_process=8, student_sides=[16], autocast=True)
    assert half.parts[step][0] < one.parts[step][0]


@pytest.mark.parametrize(
    "option,value,setting",
    [("--queue-size", 10**12, "--queue-size"), ("--width", 100000, "--width")],
)
def test_options_that_cannot_fit_are_refused_before_allocating(
    capsys, tmp_path, image_folder, option, value, setting
):
    args = tiny_args(image_folder, tmp_path / "run", **{option[2:].replace("-", "_"): value})
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "these settings need about")
    assert f"lower {setting}" in err and "memory" in err
    assert not (tmp_path / "run").exists()


def test_resizing_a_dataset_beyond_memory_is_refused(monkeypatch):
    import ressl.data.loading
    from ressl.errors import ConfigError

    monkeypatch.setattr(ressl.data.loading, "device_memory", lambda device: 10**6)
    with pytest.raises(
        ConfigError,
        match=r"60000 images of 1x64x64 need 234.4 MB of memory, more "
        r"than this machine's 976.6 KB; lower image_size",
    ):
        ressl.data.loading.check_images_fit(60000, 1, 64)
    ressl.data.loading.check_images_fit(10, 1, 64)  # 40 KB fits
