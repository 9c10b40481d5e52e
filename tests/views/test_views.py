"""Tests for ressl.views: shapes, determinism, torchvision-equal maths and distributions."""

from __future__ import annotations

import collections
import colorsys
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from ressl.views import (
    adjust_brightness,
    adjust_colors,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    multicrop_scales,
    normalize,
    random_grayscale,
    random_resized_crop,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    sample_jitter_params,
    strong_view,
    weak_view,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]
CHANNELS = [1, 3]
VIEWS = [weak_view, strong_view]
IDENTITY = {1: ([0.0], [1.0]), 3: ([0.0] * 3, [1.0] * 3)}  # mean, std: output = pixels / 255


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def uint8_images(b: int, c: int, h: int, w: int, seed: int = 0, device: str = "cpu"):
    return torch.randint(0, 256, (b, c, h, w), generator=gen(seed), dtype=torch.uint8).to(device)


def float_images(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=gen(seed))


def ramp_images(b: int, c: int, size: int) -> torch.Tensor:
    """Float images whose value is 0.5 x / (W - 1) + 0.5 y / (H - 1) in every channel."""
    ramp = torch.linspace(0.0, 0.5, size)
    return (ramp[None, :] + ramp[:, None]).expand(b, c, size, size).contiguous()


def recover_crops(out: torch.Tensor, size: int, image_size: int) -> tuple[torch.Tensor, ...]:
    """Crop (h, w) and flip per image from a resampled ramp image (interior slopes)."""
    u0, u1 = size // 4, 3 * size // 4  # interior: no clamping at the crop borders there
    per_px = 0.5 / (image_size - 1)
    dx = (out[:, 0, :, u1] - out[:, 0, :, u0]).mean(1) / (u1 - u0)  # = per_px * w / size
    dy = (out[:, 0, u1, :] - out[:, 0, u0, :]).mean(1) / (u1 - u0)
    w, h = (dx.abs() * size / per_px).round(), (dy * size / per_px).round()
    return h, w, dx < 0


def torchvision_boxes(n: int, height: int, width: int, scale, seed: int = 0) -> torch.Tensor:
    image = torch.empty(1, height, width)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.tensor(
            [RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
            dtype=torch.float64,
        )


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("view", VIEWS)
def test_shape_dtype_and_normalisation(view, c, device):
    x = uint8_images(8, c, 28, 28, device=device)
    mean, std = [0.3, 0.5, 0.7][:c], [0.2, 0.25, 0.5][:c]
    out = view(x, size=20, mean=mean, std=std, generator=gen(1, device))
    raw = view(x, size=20, mean=[0.0] * c, std=[1.0] * c, generator=gen(1, device))
    assert out.shape == (8, c, 20, 20) and out.dtype == torch.float32
    assert out.device.type == device
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    m, s = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    torch.testing.assert_close(out, (raw - m.view(1, c, 1, 1)) / s.view(1, c, 1, 1))


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("view", VIEWS)
def test_float_input_equals_uint8_input(view, c):
    x = uint8_images(8, c, 16, 16)
    mean, std = IDENTITY[c]
    a = view(x, size=16, mean=mean, std=std, generator=gen(3))
    b = view(x.float() / 255, size=16, mean=mean, std=std, generator=gen(3))
    h = view(x.to(torch.bfloat16) / 255, size=16, mean=mean, std=std, generator=gen(3))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert h.dtype == torch.float32  # low-precision input, float32 views
    assert (h - a).abs().max() < 0.02


@pytest.mark.parametrize("view", VIEWS)
def test_input_and_global_rng_untouched(view):
    x = float_images(8, 3, 16, 16)
    before, rng = x.clone(), torch.get_rng_state()
    extra = {"blur_p": 0.5} if view is strong_view else {}
    view(x, size=16, mean=[0.5] * 3, std=[0.5] * 3, generator=gen(), **extra)
    assert torch.equal(x, before)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("view", VIEWS)
def test_determinism(view, c, device):
    x = uint8_images(16, c, 16, 16, device=device)
    mean, std = IDENTITY[c]
    a = view(x, size=16, mean=mean, std=std, generator=gen(5, device))
    b = view(x, size=16, mean=mean, std=std, generator=gen(5, device))
    d = view(x, size=16, mean=mean, std=std, generator=gen(6, device))
    assert torch.equal(a, b)
    assert not torch.allclose(a, d)


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("view", VIEWS)
def test_identical_images_get_independent_views(view, c):
    x = uint8_images(1, c, 16, 16).expand(32, -1, -1, -1)
    mean, std = IDENTITY[c]
    out = view(x, size=16, mean=mean, std=std, generator=gen(2)).flatten(1)
    distinct = torch.cdist(out, out) + torch.eye(32) > 1e-4
    assert distinct.all()  # no two of the 32 copies got the same crop/flip/jitter


def test_strong_view_without_color_ops_is_the_weak_view():
    # Both draw the crop, then the flip, first: so this carries every crop test below
    # over to the strong view.
    x = uint8_images(32, 3, 24, 24)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.4]
    weak = weak_view(x, size=16, mean=mean, std=std, generator=gen(9))
    strong = strong_view(
        x, size=16, mean=mean, std=std, generator=gen(9), jitter_p=0.0, grayscale_p=0.0
    )
    torch.testing.assert_close(strong, weak, atol=1e-5, rtol=0)


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("c", CHANNELS)
def test_precropped_input_is_only_flipped_then_colored(view, c):
    x = uint8_images(64, c, 12, 12)
    mean, std = IDENTITY[c]
    kw = dict(mean=mean, std=std, crop=False)
    if view is strong_view:
        kw.update(jitter_p=0.0, grayscale_p=0.0)
    out = view(x, size=12, generator=gen(3), **kw)
    pixels = x.float() / 255
    flipped = torch.isclose(out, pixels.flip(3), atol=1e-6).flatten(1).all(1)
    same = torch.isclose(out, pixels, atol=1e-6).flatten(1).all(1)
    assert bool((flipped | same).all()) and 16 < int((flipped & ~same).sum()) < 48
    with pytest.raises(ValueError, match="already be 8x8"):
        view(x, size=8, generator=gen(0), **kw)


def test_multicrop_scales_are_the_papers():
    paper = [
        (0.2, 1),
        (0.172, 0.86),
        (0.143, 0.715),
        (0.114, 0.571),
        (0.086, 0.429),
    ]  # RESSL.md, ImageNet
    got = multicrop_scales([224, 192, 160, 128, 96], 224, (0.2, 1.0))
    assert [v for r in got for v in r] == pytest.approx(
        [v for r in paper for v in r], abs=5e-3
    )  # paper rounds
    assert multicrop_scales([32, 16], 32, (0.3, 0.9)) == [(0.3, 0.9), (0.15, 0.45)]
    with pytest.raises(ValueError, match=r"each crop size must be an int in \[1, 32\]"):
        multicrop_scales([48], 32)
    with pytest.raises(ValueError, match="at least one"):
        multicrop_scales([], 32)


# --------------------------------------------------------------------------- crops


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.9, 1.0)])
def test_crop_boxes_follow_torchvision(scale):
    # (0.9, 1) rejects many candidates (w or h > 32): checks first-valid and the fallback.
    n, size = 20000, 32
    boxes = sample_crop_boxes(n, size, size, generator=gen(0), scale=scale).double()
    assert boxes.dtype == torch.float64 and boxes.shape == (n, 4)
    top, left, h, w = boxes.unbind(1)
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (top + h <= size).all()
    assert (left >= 0).all() and (left + w <= size).all()
    area, log_ratio = h * w / size**2, torch.log(w / h)
    # rounding w and h to pixels can move the area fraction and ratio a little
    assert area.min() >= scale[0] - 0.06 and area.max() <= 1.0
    assert log_ratio.abs().max() <= math.log(4 / 3) + 0.09

    ref = torchvision_boxes(3000, size, size, scale)
    ref_area, ref_log_ratio = ref[:, 2] * ref[:, 3] / size**2, torch.log(ref[:, 3] / ref[:, 2])
    assert abs(area.mean() - ref_area.mean()) < 0.015
    assert abs(area.std() - ref_area.std()) < 0.015
    assert abs(log_ratio.mean() - ref_log_ratio.mean()) < 0.02
    assert abs(log_ratio.std() - ref_log_ratio.std()) < 0.02
    full = (h == size) & (w == size)  # includes the central fallback
    assert (
        abs(full.double().mean() - ((ref[:, 2] == size) & (ref[:, 3] == size)).double().mean())
        < 0.03
    )
    # offsets uniform over the valid positions
    room = w < size
    assert abs((left[room] / (size - w[room])).mean() - 0.5) < 0.02


def test_crop_fallback_matches_torchvision():
    # A 10x100 strip: no candidate of area >= 99% fits, so every box is the fallback.
    boxes = sample_crop_boxes(64, 10, 100, generator=gen(), scale=(0.99, 1.0))
    ref = torchvision_boxes(1, 10, 100, (0.99, 1.0))[0].long()
    assert torch.equal(boxes, ref.expand(64, 4))


@pytest.mark.parametrize("c", CHANNELS)
def test_resized_crop_equals_torchvision(c):
    x = uint8_images(24, c, 20, 30)
    boxes = sample_crop_boxes(24, 20, 30, generator=gen(4))
    flip = torch.rand(24, generator=gen(5)) < 0.5
    for size in (7, 16, 33):  # down- and up-sampling
        out = resized_crop(x, boxes, size, flip=flip)
        ref = torch.stack(
            [
                TF.resized_crop(
                    x[i].float() / 255, *boxes[i].tolist(), [size, size], antialias=False
                )
                for i in range(24)
            ]
        )
        ref = torch.where(flip.view(-1, 1, 1, 1), ref.flip(-1), ref)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("c", CHANNELS)
def test_weak_view_crops_and_flips_follow_torchvision(c):
    n, size = 2000, 32
    x = ramp_images(n, c, size)
    mean, std = IDENTITY[c]
    h, w, flipped = recover_crops(
        weak_view(x, size=size, mean=mean, std=std, generator=gen(7)), size, size
    )
    area, log_ratio = h * w / size**2, torch.log(w / h)
    assert area.min() >= 0.14 and area.max() <= 1.0
    assert log_ratio.abs().max() <= math.log(4 / 3) + 0.09
    ref = torchvision_boxes(2000, size, size, (0.2, 1.0))
    assert abs(area.mean() - (ref[:, 2] * ref[:, 3] / size**2).mean()) < 0.03
    assert abs(flipped.float().mean() - 0.5) < 0.05

    for p, expected in ((0.0, 0.0), (1.0, 1.0)):
        out = weak_view(x[:64], size=size, mean=mean, std=std, generator=gen(7), flip_p=p)
        assert recover_crops(out, size, size)[2].float().mean() == expected


def test_random_resized_crop_scale():
    x = ramp_images(500, 1, 32)
    out = random_resized_crop(x, 32, generator=gen(), scale=(0.5, 0.6))
    h, w, _ = recover_crops(out, 32, 32)
    area = h * w / 32**2
    assert out.shape == (500, 1, 32, 32)
    assert area.min() >= 0.45 and area.max() <= 0.65


# --------------------------------------------------------------------------- colour


def constant_images(colors: torch.Tensor, size: int = 8) -> torch.Tensor:
    return colors[:, :, None, None].expand(-1, -1, size, size).contiguous()


@pytest.mark.parametrize("c", CHANNELS)
def test_weak_view_keeps_colors(c):
    colors = torch.randint(0, 256, (16, c), generator=gen(), dtype=torch.uint8)
    out = weak_view(
        constant_images(colors, 16), size=12, mean=[0.0] * c, std=[1.0] * c, generator=gen()
    )
    torch.testing.assert_close(out, constant_images(colors.float() / 255, 12), atol=1e-5, rtol=0)


@pytest.mark.parametrize("c", CHANNELS)
def test_strong_view_brightness_range_and_jitter_p(c):
    mean, std = IDENTITY[c]
    x = torch.full((2000, c, 8, 8), 0.5)
    out = strong_view(
        x, size=8, mean=mean, std=std, generator=gen(), jitter=(0.4, 0.0, 0.0, 0.0), grayscale_p=0.0
    )
    factor = out.flatten(1) / 0.5
    assert (factor.std(1) < 1e-5).all()  # a constant image stays constant
    factor = factor[:, 0]
    untouched = (factor - 1).abs() < 1e-6
    assert abs(untouched.float().mean() - 0.2) < 0.03  # jitter_p = 0.8
    assert factor.min() >= 0.6 - 1e-5 and factor.max() <= 1.4 + 1e-5
    assert factor.min() < 0.62 and factor.max() > 1.38


def test_color_jitter_factor_ranges():
    n = 2000
    kw = {"generator": gen()}
    # contrast on a two-level image: the gap between the levels scales by the factor
    two = torch.full((n, 1, 4, 4), 0.4)
    two[..., 2:] = 0.6
    out = color_jitter(two, jitter=(0.0, 0.4, 0.0, 0.0), **kw)
    f = (out[:, 0, 0, 3] - out[:, 0, 0, 0]) / 0.2
    assert f.min() >= 0.6 - 1e-4 and f.max() <= 1.4 + 1e-4 and f.min() < 0.62 and f.max() > 1.38
    # saturation on a colour: the distance to its grey scales by the factor
    color = constant_images(torch.tensor([[0.6, 0.4, 0.5]]).expand(n, 3), 2)
    gray = rgb_to_grayscale(color)
    out = color_jitter(color, jitter=(0.0, 0.0, 0.4, 0.0), **kw)
    f = ((out - gray)[:, 0] / (color - gray)[:, 0]).flatten(1)[:, 0]
    assert f.min() >= 0.6 - 1e-4 and f.max() <= 1.4 + 1e-4 and f.min() < 0.62 and f.max() > 1.38
    # hue: the HSV hue moves by at most 0.1 turn, and keeps saturation and value
    out = color_jitter(color, jitter=(0.0, 0.0, 0.0, 0.1), **kw)[:, :, 0, 0]
    h0, s0, v0 = colorsys.rgb_to_hsv(0.6, 0.4, 0.5)
    hsv = torch.tensor([colorsys.rgb_to_hsv(*rgb) for rgb in out.tolist()])
    shift = (hsv[:, 0] - h0 + 0.5) % 1.0 - 0.5
    assert shift.abs().max() <= 0.1 + 1e-4 and shift.abs().max() > 0.095
    assert abs(shift.mean()) < 0.01  # uniform in [-0.1, 0.1]
    torch.testing.assert_close(hsv[:, 1:], torch.tensor([s0, v0]).expand(n, 2), atol=1e-4, rtol=0)


def test_jitter_params_follow_torchvision():
    n = 24000
    factors, order = sample_jitter_params(n, generator=gen(), jitter=(0.4, 0.2, 0.8, 0.1))
    lo, hi = torch.tensor([0.6, 0.8, 0.2, -0.1]), torch.tensor([1.4, 1.2, 1.8, 0.1])
    assert (factors >= lo).all() and (factors <= hi).all()
    torch.testing.assert_close(factors.mean(0), (lo + hi) / 2, atol=0.01, rtol=0)
    torch.testing.assert_close(factors.std(0), (hi - lo) / math.sqrt(12), atol=0.01, rtol=0)
    # strength 1: torchvision clips the lower end at 0
    assert sample_jitter_params(100, generator=gen(), jitter=(1.0, 0, 0, 0))[0][:, 0].min() >= 0
    # each row a permutation, all 24 equally likely
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.unique(codes, return_counts=True)[1]
    assert len(counts) == 24 and (counts - n / 24).abs().max() < 0.15 * n / 24


def test_color_jitter_is_adjust_colors_of_sampled_params():
    x = float_images(32, 3, 6, 6)
    g = gen(4)
    factors, order = sample_jitter_params(32, generator=g)
    apply = torch.rand(32, generator=g) < 0.7
    expected = adjust_colors(x, factors, order, apply=apply)
    torch.testing.assert_close(color_jitter(x, generator=gen(4), p=0.7), expected)
    assert 0 < apply.sum() < 32


def test_jitter_leaves_gray_images_gray_on_one_channel():
    # saturation and hue are no-ops on one channel, contrast on a constant image
    x = torch.full((64, 1, 4, 4), 0.3)
    out = color_jitter(x, jitter=(0.0, 0.4, 0.4, 0.1), generator=gen())
    assert torch.equal(out, x)


@pytest.mark.parametrize("c", CHANNELS)
def test_adjust_colors_equals_torchvision_in_every_order(c):
    perms = torch.tensor(list(itertools.permutations(range(4))))  # (24, 4)
    order = torch.cat([perms, perms])  # (48, 4)
    x = float_images(48, c, 10, 10)
    g = gen(1)
    factors = torch.rand(48, 4, generator=g) * 0.8 + 0.6
    factors[:, 3] = torch.rand(48, generator=g) * 0.2 - 0.1
    apply = torch.arange(48) % 5 != 0
    out = adjust_colors(x, factors, order, apply=apply)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(48):
        ref = x[i]
        if apply[i]:
            for op in order[i].tolist():
                ref = ops[op](ref, factors[i, op].item())
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
    assert torch.equal(out[~apply], x[~apply])  # not jittered: untouched, exactly


@pytest.mark.parametrize("c", CHANNELS)
def test_single_color_ops_equal_torchvision(c):
    x = float_images(16, c, 9, 9)
    x[:4] = x[:4].round()  # saturated and grey pixels: the HSV edge cases
    x[4:8, :, :, :4] = x[4:8, :1, :, :4]
    f = torch.rand(16, generator=gen(2)) * 1.5
    h = torch.rand(16, generator=gen(3)) - 0.5
    pairs = [
        (adjust_brightness, TF.adjust_brightness, f),
        (adjust_contrast, TF.adjust_contrast, f),
        (adjust_saturation, TF.adjust_saturation, f),
        (adjust_hue, TF.adjust_hue, h),
    ]
    for ours, theirs, factor in pairs:
        ref = torch.stack([theirs(x[i], factor[i].item()) for i in range(16)])
        torch.testing.assert_close(ours(x, factor), ref, atol=1e-5, rtol=0)
    gray = rgb_to_grayscale(x)
    assert gray.shape == (16, 1, 9, 9)
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_grayscale_probability():
    colors = torch.tensor([[0.8, 0.2, 0.4]]).expand(2000, 3)
    out = strong_view(
        constant_images(colors),
        size=8,
        mean=[0.0] * 3,
        std=[1.0] * 3,
        generator=gen(),
        jitter_p=0.0,
    )
    gray = (out.amax(1) - out.amin(1)).amax((1, 2)) < 1e-6
    assert abs(gray.float().mean() - 0.2) < 0.03
    expected = 0.2989 * 0.8 + 0.587 * 0.2 + 0.114 * 0.4
    torch.testing.assert_close(out[gray], torch.full_like(out[gray], expected), atol=1e-5, rtol=0)
    # the building block on its own, and its no-op on one channel
    x = float_images(1000, 3, 2, 2)
    out = random_grayscale(x, generator=gen(), p=0.5)
    gray = (out.amax(1) - out.amin(1)).flatten(1).amax(1) < 1e-6
    assert abs(gray.float().mean() - 0.5) < 0.06
    assert torch.equal(out[~gray], x[~gray])
    one = float_images(10, 1, 2, 2)
    assert torch.equal(random_grayscale(one, generator=gen(), p=1.0), one)


# --------------------------------------------------------------------------- blur


def test_blur_kernel_size():
    assert [blur_kernel_size(s) for s in (28, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]


@pytest.mark.parametrize("c", CHANNELS)
def test_gaussian_blur_equals_torchvision(c):
    x = float_images(8, c, 12, 12)
    sigma = torch.rand(8, generator=gen(1)) * 1.9 + 0.1
    out = gaussian_blur(x, sigma, kernel_size=5)
    ref = torch.stack([TF.gaussian_blur(x[i], [5, 5], [sigma[i].item()] * 2) for i in range(8)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gaussian_blur(x, torch.full((8,), 1e-6), kernel_size=5), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_pil_blur_equals_pil_per_image_at_every_size(channels):
    import numpy as np
    from PIL import Image, ImageFilter

    from ressl.views import pil_gaussian_blur

    rng = np.random.default_rng(channels)
    for height, width in ((8, 8), (13, 20), (32, 32), (64, 48), (96, 96)):
        sigma = torch.tensor([0.1, 0.37, 0.5, 0.99, 1.0, 1.6, 2.0])  # one sigma per image
        pixels = rng.integers(0, 256, (len(sigma), height, width, channels), dtype=np.uint8)
        mode = "L" if channels == 1 else "RGB"
        want = [
            np.asarray(
                Image.fromarray(p.squeeze(-1) if channels == 1 else p, mode).filter(
                    ImageFilter.GaussianBlur(float(s))
                )
            )
            for p, s in zip(pixels, sigma)
        ]
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        got = pil_gaussian_blur(x, sigma)
        for i, w in enumerate(want):
            assert np.array_equal(got[i].permute(1, 2, 0).numpy().reshape(w.shape), w), (height, i)
        # float images in [0, 1] are blurred as PIL holds them: in 8 bits
        floats = pil_gaussian_blur(x.float() / 255, sigma)
        torch.testing.assert_close(floats, got.float() / 255)


def test_pil_blur_with_a_known_bound_is_the_same_blur():
    from ressl.views import pil_gaussian_blur

    x = torch.randint(
        0, 256, (16, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    for top in (2.0, 3.0):  # box radii 0..1 and 0..2
        sigma = torch.rand(16, generator=torch.Generator().manual_seed(1)) * (top - 0.1) + 0.1
        assert torch.equal(pil_gaussian_blur(x, sigma, max_sigma=top), pil_gaussian_blur(x, sigma))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pil_blur_never_waits_for_the_gpu():
    from ressl.views.blur import random_blur

    x = torch.rand(8, 3, 32, 32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    random_blur(x, 0.5, (0.1, 2.0), g, "pil")  # warm-up (allocations, kernels)
    torch.cuda.set_sync_debug_mode("error")  # any host sync now raises a RuntimeError
    try:
        out = random_blur(x, 0.5, (0.1, 2.0), g, "pil")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == x.shape and out.device == x.device


def test_the_strong_view_blurs_as_pil_with_the_papers_sigma_at_small_sizes():
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(
        size=32,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        jitter_p=0.0,
        grayscale_p=0.0,
        flip_p=0.0,
        crop=False,
    )
    sharp = strong_view(x, generator=gen(), blur_p=0.0, **kw)
    pil = strong_view(x, generator=gen(), blur_p=1.0, **kw)
    relative = strong_view(x, generator=gen(), blur_p=1.0, blur_mode="relative", **kw)
    # at 32 px the old 3x3 kernel barely blurs; PIL's sigma 0.1-2 px removes far more detail
    assert pil.var() < relative.var() < sharp.var()
    with pytest.raises(ValueError, match="blur_mode must be one of pil, relative"):
        strong_view(x, generator=gen(), blur_mode="box", **kw)


def test_strong_view_blur_probability():
    x = uint8_images(400, 3, 32, 32)
    kw = {"size": 32, "mean": [0.0] * 3, "std": [1.0] * 3, "jitter_p": 0.0, "grayscale_p": 0.0}
    sharp = strong_view(x, generator=gen(), **kw)
    half = strong_view(x, generator=gen(), blur_p=0.5, **kw)
    every = strong_view(x, generator=gen(), blur_p=1.0, **kw)
    changed = (half - sharp).flatten(1).abs().amax(1) > 1e-5
    # sigma < ~0.2 (5% of U[0.1, 2]) moves no pixel by 1e-5 at all
    assert abs(changed.float().mean() - 0.5 * 0.95) < 0.08
    torch.testing.assert_close(half[~changed], sharp[~changed], atol=1e-5, rtol=0)
    assert ((every - sharp).flatten(1).abs().amax(1) > 1e-5).float().mean() > 0.9
    assert every.var() < 0.9 * sharp.var()  # blurring removes high frequencies


# --------------------------------------------------------------------------- arguments


GOOD = {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}
BAD_ARGUMENTS = [
    ({"images": torch.zeros(2, 3, 8, 8, dtype=torch.int32)}, TypeError, "images"),
    ({"images": torch.zeros(3, 8, 8, dtype=torch.uint8)}, ValueError, "images"),
    ({"images": torch.zeros(2, 2, 8, 8, dtype=torch.uint8)}, ValueError, "images"),
    ({"images": [[1, 2]]}, TypeError, "images"),
    ({"size": 0}, ValueError, "size"),
    ({"size": 8.0}, ValueError, "size"),
    ({"scale": (0.0, 1.0)}, ValueError, "scale"),
    ({"scale": (0.6, 0.2)}, ValueError, "scale"),
    ({"scale": (0.2, 1.5)}, ValueError, "scale"),
    ({"scale": 0.5}, ValueError, "scale"),
    ({"flip_p": 1.5}, ValueError, "flip_p"),
    ({"mean": [0.5]}, ValueError, "mean"),
    ({"std": [0.5, 0.5, 0.0]}, ValueError, "std"),
    ({"std": "abc"}, TypeError, "std"),
    ({"generator": 0}, TypeError, "generator"),
]
STRONG_ONLY = [
    ({"jitter_p": -0.1}, ValueError, "jitter_p"),
    ({"grayscale_p": 2}, ValueError, "grayscale_p"),
    ({"blur_p": float("nan")}, ValueError, "blur_p"),
    ({"blur_sigma": (0.0, 2.0)}, ValueError, "blur_sigma"),
    ({"jitter": (0.4, 0.4, 0.4, 0.6)}, ValueError, "jitter"),
    ({"jitter": (0.4, -0.1, 0.4, 0.1)}, ValueError, "jitter"),
    ({"jitter": (0.4, 0.4, 0.4)}, ValueError, "jitter"),
]


@pytest.mark.parametrize(
    ("view", "override", "error", "name"),
    [(v, *case) for v in VIEWS for case in BAD_ARGUMENTS]
    + [(strong_view, *case) for case in STRONG_ONLY],
)
def test_bad_arguments_name_themselves(view, override, error, name):
    kw = {"images": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "generator": gen(), **GOOD}
    kw.update(override)
    with pytest.raises(error, match=name):
        view(kw.pop("images"), **kw)


def test_bad_arguments_of_building_blocks():
    x = float_images(4, 3, 8, 8)
    with pytest.raises(ValueError, match="scale"):
        sample_crop_boxes(4, 8, 8, generator=gen(), scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="ratio"):
        sample_crop_boxes(4, 8, 8, generator=gen(), ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match="boxes"):
        resized_crop(x, torch.zeros(3, 4, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="factor"):
        adjust_brightness(x, torch.ones(5))
    with pytest.raises(ValueError, match="factors and order"):
        adjust_colors(x, torch.ones(4, 3), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur(x, torch.ones(4), kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size"):
        gaussian_blur(x, torch.ones(4), kernel_size=17)  # reflect padding needs H > 8
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(x, torch.tensor([1.0, 0.0, 1.0, 1.0]), kernel_size=3)
    with pytest.raises(ValueError, match="height"):
        sample_crop_boxes(4, 0, 8, generator=gen())
    with pytest.raises(TypeError, match="images"):
        color_jitter(x.to(torch.uint8), generator=gen())  # jitter works on floats
    with pytest.raises(ValueError, match="p must"):
        color_jitter(x, generator=gen(), p=1.1)
    with pytest.raises(ValueError, match="mean"):
        normalize(x, [0.5], [0.5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_generator_on_another_device():
    x = uint8_images(2, 3, 8, 8)
    with pytest.raises(ValueError, match="generator is on cuda"):
        weak_view(x, generator=gen(device="cuda"), **GOOD)
    with pytest.raises(ValueError, match="generator is on cpu"):
        strong_view(x.cuda(), generator=gen(), **GOOD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_building_blocks_equal_cpu():
    x = float_images(24, 3, 16, 16)
    boxes = sample_crop_boxes(24, 16, 16, generator=gen())
    flip = torch.rand(24, generator=gen(1)) < 0.5
    factors = torch.rand(24, 4, generator=gen(2)) * 0.8 + 0.6
    factors[:, 3] -= 1.0  # hue in [-0.4, 0.4]
    order = torch.argsort(torch.rand(24, 4, generator=gen(3)), dim=1)
    cpu = adjust_colors(resized_crop(x, boxes, 12, flip=flip), factors, order)
    cuda = adjust_colors(
        resized_crop(x.cuda(), boxes.cuda(), 12, flip=flip.cuda()), factors.cuda(), order.cuda()
    )
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=0)


def test_sync_free_hue_path_matches_the_gathered_one():
    # Accelerators run hue densely (no host sync); CPU gathers the due images. Same result.
    from ressl.views import sample_jitter_params
    from ressl.views.color import adjust_colors_

    g = torch.Generator().manual_seed(7)
    x = torch.rand(64, 3, 16, 16, generator=g)
    factors, order = sample_jitter_params(64, generator=g)
    apply = torch.rand(64, generator=g) < 0.8
    gathered = adjust_colors_(x.clone(), factors, order, apply, [True] * 4, gather_hue=True)
    dense = adjust_colors_(x.clone(), factors, order, apply, [True] * 4, gather_hue=False)
    torch.testing.assert_close(dense, gathered, atol=1e-6, rtol=0)
    assert not torch.equal(gathered, x)


def test_view_configs_are_the_view_functions():
    from ressl.views import StrongView, WeakView

    x = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    kw = dict(size=16, mean=(0.5,) * 3, std=(0.25,) * 3, scale=(0.3, 0.9))
    strong = StrongView(jitter=(0.8, 0.8, 0.0, 0.0), jitter_p=1.0, grayscale_p=0.0, blur_p=0.5)
    a = strong(x, generator=torch.Generator().manual_seed(1), **kw)
    b = strong_view(
        x,
        generator=torch.Generator().manual_seed(1),
        jitter=(0.8, 0.8, 0.0, 0.0),
        jitter_p=1.0,
        grayscale_p=0.0,
        blur_p=0.5,
        **kw,
    )
    assert torch.equal(a, b)
    c = WeakView(flip_p=0.0)(x, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(
        c, weak_view(x, generator=torch.Generator().manual_seed(2), flip_p=0.0, **kw)
    )
    with pytest.raises(ValueError, match="jitter_p must be a probability"):
        StrongView(jitter_p=1.5)
    with pytest.raises(ValueError, match="jitter must be"):
        StrongView(jitter=(0.4, 0.4, 0.4, 0.9))
    with pytest.raises(ValueError, match="flip_p must be a probability"):
        WeakView(flip_p=-1)


class Kernels(TorchDispatchMode):
    """Counts the ops that launch a kernel on a GPU, by name (view ops launch none)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view:
            self.names[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("blur_p", "most"), [(0.0, 285), (0.5, 385)])
def test_the_sync_free_views_launch_few_kernels(monkeypatch, blur_p, most):
    # At CIFAR sizes a GPU's time in the views is launches, not arithmetic: one step's views
    # (strong + weak, one crop) on the GPU paths were 439 ops, 699 with PIL blur, when
    # the hue ran at each of the 4 positions and each box pass summed cumulatively; 273 and
    # 372 since.
    import ressl.views.blur
    import ressl.views.color
    import ressl.views.geometry

    for module in (ressl.views.color, ressl.views.blur):
        monkeypatch.setattr(module, "syncs_are_free", lambda device: False)
    monkeypatch.setattr(ressl.views.geometry, "_CPU_CHUNK", 1 << 62)  # no CPU chunks
    x = uint8_images(16, 3, 16, 16)
    kw = dict(size=16, mean=(0.5,) * 3, std=(0.25,) * 3, generator=gen())

    def views() -> None:
        strong_view(x, blur_p=blur_p, **kw)
        weak_view(x, **kw)

    views()  # the first call copies the constants to the device
    with Kernels() as kernels:
        views()
    assert sum(kernels.names.values()) <= most, kernels.names
    assert kernels.names["amax"] == 1  # the hue's max channel: one hue pass over the batch
    assert kernels.names["bitwise_right_shift_"] == (6 if blur_p else 0)  # one per box pass
    assert kernels.names["cumsum"] == 0
