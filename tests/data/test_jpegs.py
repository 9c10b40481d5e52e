"""JPEGs decoded on the training device (``decode="device"``), against PIL in the workers.

On a CPU the "device" is the CPU: the workers read bytes and the main process decodes
them with ``torchvision.io.decode_jpeg`` and cuts the crops with torch. A GPU runs the
same Python, but torchvision's CUDA decoder (nvjpeg, a side stream) is not exercised
here; the CUDA tests at the end run where a GPU exists. Every test starts with fresh
decoders (``decoder_for``), so the counts of where files were decoded are its own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY
from PIL import Image
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ressl import train
from ressl.data import jpegs
from ressl.data.decode import cut_crops
from ressl.data.jpegs import (
    MAX_RESIZE_FACTOR,
    collate_encoded,
    decode_on_device,
    decode_place,
    decoder_for,
    read_for_device,
    resize_box,
)
from ressl.data.sources import FolderImages, epoch_order
from ressl.runs.checkpoint import load_checkpoint

CROPS = [(24, (0.2, 1.0)), (12, (0.05, 0.3))]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_decoders(monkeypatch):
    """Each test its own decoders: probes and counts start afresh."""
    monkeypatch.setattr(jpegs, "_DECODERS", {})


def _photo(seed: int, size: tuple[int, int] = (60, 45)) -> np.ndarray:
    """Smooth colour fields with noise: JPEG-like content (what the codec is made for)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, b, c = rng.uniform(0.05, 0.2, size=3)
    base = np.stack([np.sin(xx * a + seed), np.cos(yy * b), np.sin((xx + yy) * c)], axis=-1)
    pixels = base * 90 + 128 + rng.normal(0, 8, size=(h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _folder(root: Path, n: int = 8) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        path = root / f"{i}.jpg"
        Image.fromarray(_photo(i, (60 + 4 * i, 45 + 3 * i))).save(path, quality=92)
        files.append(path)
    return files


def _batches(files: list[Path], decode: str, channels: int = 3, workers: int = 0) -> list:
    source = FolderImages(files, [0] * len(files), 24, channels=channels)
    return list(source.crop_batches(4, CROPS, epoch=1, seed=3, decode=decode, num_workers=workers))


@pytest.mark.parametrize("channels", [3, 1])
def test_device_decoding_cuts_the_crops_the_workers_cut(tmp_path, channels):
    files = _folder(tmp_path)
    pil, dev = _batches(files, "workers", channels), _batches(files, "device", channels)
    assert len(pil) == len(dev) == 2
    for (views_p, y_p), (views_d, y_d) in zip(pil, dev):
        assert torch.equal(y_p, y_d)
        for a, b in zip(views_p, views_d):
            assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape
            assert a.shape[1] == channels
            diff = (a.float() - b.float()).abs()
            # the same boxes: other boxes would differ by tens of levels on these images
            assert diff.mean() < 1.5 and diff.max() <= 40, (diff.mean(), diff.max())
    counts = decoder_for(CPU).counts
    assert (counts.device, counts.fallback, counts.workers, counts.failed) == (8, 0, 0, 0)


def test_device_decoding_is_the_same_for_any_number_of_workers(tmp_path):
    files = _folder(tmp_path)
    zero, two = _batches(files, "device"), _batches(files, "device", workers=2)
    for (views0, y0), (views2, y2) in zip(zero, two):
        assert torch.equal(y0, y2) and all(map(torch.equal, views0, views2))


def test_other_files_are_decoded_in_the_workers_exactly(tmp_path):
    """PNG, CMYK JPEG and an EXIF-rotated JPEG take the PIL path: identical crops."""
    files = _folder(tmp_path, 1)
    Image.fromarray(_photo(10)).save(tmp_path / "a.png")
    Image.fromarray(_photo(11)).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=92)
    rotated = Image.fromarray(_photo(12))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    rotated.save(tmp_path / "rotated.jpg", exif=exif, quality=92)
    others = [tmp_path / "a.png", tmp_path / "cmyk.jpg", tmp_path / "rotated.jpg"]
    g = torch.Generator().manual_seed(0)
    for path in others:
        assert read_for_device(str(path), CROPS, g).data is None  # decoded in the worker
    source = FolderImages(others + files, [0] * 4, 24)
    order = epoch_order(4, seed=0, epoch=0).tolist()  # the files in the batch's rows
    ((pil, _),) = source.crop_batches(4, CROPS, epoch=0, seed=0, decode="workers")
    ((dev, _),) = source.crop_batches(4, CROPS, epoch=0, seed=0, decode="device")
    for k in range(len(CROPS)):
        for row, index in enumerate(order):
            same = torch.equal(pil[k][row], dev[k][row])
            assert same == (index < 3), (index, k)  # the JPEG: close, by another decoder
    counts = decoder_for(CPU).counts
    assert (counts.device, counts.workers, counts.fallback) == (1, 3, 0)


def test_a_damaged_jpeg_falls_back_without_losing_the_batch(tmp_path, caplog):
    files = _folder(tmp_path, 4)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # header intact, scan cut: PIL fails too
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    read = [read_for_device(str(f), CROPS, gen) for f, gen in zip(files, g)]
    assert all(r.data is not None for r in read)
    with caplog.at_level(logging.WARNING, logger="ressl.data.jpegs"):
        views = decode_on_device(read, [24, 12], torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24), (4, 3, 12, 12)]
    for i in (0, 2, 3):  # the good files as if decoded alone
        alone = decode_on_device([read[i]], [24, 12], torch.device("cpu"))
        assert all(torch.equal(v[i], a[0]) for v, a in zip(views, alone))
    assert all(not v[1].any() for v in views)  # neither nvjpeg/libjpeg nor PIL: black
    assert "could not decode" in caplog.text and "1.jpg" in caplog.text
    assert decoder_for(CPU).works is None  # it decoded the others: no probe, not broken
    counts = decoder_for(CPU).counts
    assert (counts.device, counts.fallback, counts.failed) == (3 + 3, 0, 1)


@pytest.mark.slow  # three tiny runs: about 3 s
def test_a_streamed_jpeg_run_decodes_on_the_device_and_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setattr("ressl.data.folders.MAX_IN_MEMORY_BYTES", 0)
    for c in range(2):
        _folder(tmp_path / "jpegs" / "train" / f"c{c}", 8)
    settings = dict(TINY, dataset=f"folder:{tmp_path / 'jpegs'}", decode="device", device="cpu")
    straight = train(out=tmp_path / "a", **settings)
    train(out=tmp_path / "b", **dict(settings, epochs=1))
    resumed = train(resume=tmp_path / "b", epochs=2)
    a, _ = load_checkpoint(straight)
    b, meta = load_checkpoint(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    assert '"decode": "device"' in meta["settings"]
    assert decoder_for(CPU).counts.device > 0 and decoder_for(CPU).counts.fallback == 0
    workers = train(out=tmp_path / "c", **dict(settings, decode="workers"))
    w, _ = load_checkpoint(workers)
    key = "model.student.backbone.features.0.weight"
    assert not torch.equal(w[key], a[key])  # another decoder: close, not the same pixels


def test_a_batch_without_plain_jpegs_needs_no_device_decoder(tmp_path):
    """PNG folders stream through the device path too: every file decoded in the workers."""
    for i in range(4):
        Image.fromarray(_photo(i)).save(tmp_path / f"{i}.png")
    files = sorted(tmp_path.glob("*.png"))
    pil, dev = _batches(files, "workers"), _batches(files, "device")
    for (views_p, _), (views_d, _) in zip(pil, dev):
        assert all(map(torch.equal, views_p, views_d))


def test_a_file_the_worker_cannot_read_gives_black_crops_and_a_full_batch(tmp_path, caplog):
    files = _folder(tmp_path, 3)
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    g = torch.Generator().manual_seed(0)
    read = [read_for_device(str(f), CROPS, g) for f in [*files, tmp_path / "bad.jpg"]]
    assert read[-1].data is None and read[-1].crops is None and read[-1].boxes == []
    with caplog.at_level(logging.WARNING, logger="ressl.data.jpegs"):
        views = decode_on_device(read, [24, 12], torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24), (4, 3, 12, 12)]
    assert all(not v[3].any() for v in views) and "bad.jpg" in caplog.text
    counts = decoder_for(CPU).counts
    assert (counts.device, counts.fallback, counts.failed) == (3, 0, 1)


def _smooth(size: int, seed: int = 0) -> torch.Tensor:
    """A ``(3, size, size)`` uint8 image of smooth colour (a 40-px noise image, upscaled)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    big = small.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(big)).permute(2, 0, 1).contiguous()


def _read(paths: list[Path]) -> list[jpegs.EncodedFile]:
    generators = [torch.Generator().manual_seed(i) for i in range(len(paths))]
    return [read_for_device(str(p), CROPS, g) for p, g in zip(paths, generators)]


def test_a_batch_crosses_from_the_workers_as_a_few_tensors(tmp_path):
    """One byte tensor, one crop stack per crop and the labels, not a tensor per file:
    each tensor a worker hands over holds a shared-memory file descriptor."""
    Image.fromarray(_photo(10)).save(tmp_path / "a.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    read = _read([*_folder(tmp_path, 3), tmp_path / "a.png", tmp_path / "bad.jpg"])
    batch = collate_encoded([(r, i) for i, r in enumerate(read)])
    assert len([batch.data, *batch.crops, batch.labels]) == 2 + len(CROPS)
    assert batch.crop_rows == [3] and [c.shape[0] for c in batch.crops] == [1, 1]
    assert torch.equal(batch.labels, torch.arange(5))
    for r, f in zip(read, batch.files):
        assert (f.path, f.boxes) == (r.path, r.boxes)
        assert (f.data is None) == (r.data is None) and (f.crops is None) == (r.crops is None)
        if r.data is not None:  # a view into the batch's bytes
            assert torch.equal(f.data, r.data)
            assert f.data.untyped_storage().data_ptr() == batch.data.untyped_storage().data_ptr()
        if r.crops is not None:
            assert all(map(torch.equal, f.crops, r.crops))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd (Linux)")
def test_a_device_decode_epoch_holds_a_few_file_descriptors(tmp_path):
    """The main process's open descriptors while 2 workers prefetch batches of 64 files:
    a few per batch in flight. One tensor per file held 76 at batch 32 and 268 at 128."""
    paths = _folder(tmp_path, 8) * 32  # 256 files: 4 batches of 64
    source = FolderImages(paths, [0] * len(paths), 24)
    before = len(os.listdir("/proc/self/fd"))
    held = []
    for _ in source.crop_batches(64, CROPS, epoch=0, seed=0, decode="device", num_workers=2):
        time.sleep(0.1)  # the workers fill their prefetch
        held.append(len(os.listdir("/proc/self/fd")) - before)
    assert len(held) == 4 and max(held) < 32, held  # 2 workers x 2 batches x 64 files before


class _FloatSizes(TorchDispatchMode):
    """Records the size of every float tensor the ops run inside it make."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.sizes.append(t.numel())
        return out


def test_only_the_box_is_converted_to_float():
    image = _smooth(400)
    with _FloatSizes() as floats:
        crop = resize_box(image, (10, 20, 50, 60), 24)
    assert max(floats.sizes) == 3 * 50 * 60  # never the (3, 400, 400) image
    box = image[None, :, 10:60, 20:80].float()
    direct = F.interpolate(box, size=(24, 24), mode="bilinear", antialias=True)[0]
    assert torch.equal(crop, direct)


def _spy_pooling(monkeypatch) -> list[tuple[int, int]]:
    """The sizes ``resize_box`` area-averages to."""
    sizes: list[tuple[int, int]] = []
    pool = F.adaptive_avg_pool2d

    def spy(x, size):
        sizes.append(tuple(size))
        return pool(x, size)

    monkeypatch.setattr(F, "adaptive_avg_pool2d", spy)
    return sizes


def test_pooling_starts_above_the_bound_and_keeps_a_flat_image_flat(monkeypatch):
    sizes = _spy_pooling(monkeypatch)
    bound = 32 * MAX_RESIZE_FACTOR  # box pixels along an axis for a 32-px crop
    image = torch.full((3, bound + 1, 40), 77, dtype=torch.uint8)
    flat = torch.tensor(77.0)
    assert torch.allclose(resize_box(image, (0, 0, bound, 40), 32), flat) and sizes == []
    crop = resize_box(image, (0, 0, bound + 1, 40), 32)  # halved: 513 rows
    assert sizes == [((bound + 2) // 2, 40)] and torch.allclose(crop, flat)


@pytest.mark.parametrize("box", [(0, 0, 4000, 4000), (100, 200, 3001, 2999)])
def test_a_4000_px_box_is_pooled_to_32_px_close_to_the_direct_resize_and_pil(box, monkeypatch):
    """CUDA's antialiased resize refuses a downscale of 125 (about 94 at most), the CPU's
    takes it: the pooled path against the CPU's direct resize and PIL's."""
    image = _smooth(4000)
    sizes = _spy_pooling(monkeypatch)
    crop = resize_box(image, box, 32)
    assert len(sizes) == 1 and max(sizes[0]) <= 32 * MAX_RESIZE_FACTOR
    top, left, h, w = box
    whole = image[None, :, top : top + h, left : left + w].float()
    direct = F.interpolate(whole, size=(32, 32), mode="bilinear", antialias=True)[0]
    diff = (crop - direct).abs()
    assert diff.mean() < 0.25 and diff.max() < 1.5, (diff.mean(), diff.max())
    pil_image = Image.fromarray(image.permute(1, 2, 0).numpy())
    pil = torch.from_numpy(
        np.array(
            pil_image.resize(
                (32, 32), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
            )
        )
    )
    pil_diff = (crop - pil.permute(2, 0, 1).float()).abs()  # PIL reads past the box's edge
    assert pil_diff.mean() < 1.5, pil_diff.mean()


def _broken_decoder(monkeypatch) -> list[int]:
    """``decode_jpeg`` replaced by one that always fails (a torchvision without nvjpeg);
    returns the list its calls are appended to."""
    calls: list[int] = []

    def decode_jpeg(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no JPEG decoder on this device")

    monkeypatch.setattr("torchvision.io.decode_jpeg", decode_jpeg)
    return calls


def test_auto_decodes_on_the_device_where_its_decoder_passes_the_probe(monkeypatch):
    assert decode_place("auto", CPU) == "workers"  # on CPUs: nothing probed
    assert decode_place("device", CPU) == "device" and decode_place("workers", CPU) == "workers"
    assert decoder_for(CPU).works is None
    monkeypatch.setattr(jpegs, "AUTO_DEVICE_TYPES", ("cpu",))  # the CPU stands in for CUDA
    assert decode_place("auto", CPU) == "device" and decoder_for(CPU).works is True


def test_auto_falls_back_to_the_workers_with_one_line_when_the_probe_fails(monkeypatch, caplog):
    calls = _broken_decoder(monkeypatch)
    monkeypatch.setattr(jpegs, "AUTO_DEVICE_TYPES", ("cpu",))
    with caplog.at_level(logging.WARNING, logger="ressl.data.jpegs"):
        places = [decode_place("auto", CPU) for _ in range(3)]  # three epochs
    assert places == ["workers"] * 3 and len(calls) == 1  # probed once
    assert len(caplog.records) == 1 and "decodes the JPEGs in the DataLoader workers" in caplog.text
    assert "RuntimeError: no JPEG decoder on this device" in caplog.text  # why, in the line


def test_the_probe_checks_the_color_it_decodes(monkeypatch):
    """A decoder that returns black images fails the probe too."""
    black = [torch.zeros(3, 16, 16, dtype=torch.uint8)]
    monkeypatch.setattr("torchvision.io.decode_jpeg", lambda data, **kwargs: black)
    assert not decoder_for(CPU).probe() and "mean [0.0, 0.0, 0.0]" in decoder_for(CPU).failure


def test_a_broken_decoder_is_tried_on_one_batch_only(tmp_path, monkeypatch, caplog):
    """``--decode device`` with a decoder that fails: the first batch tries it (the batch,
    each file, the probe), the next go to PIL at once; the crops are PIL's either way."""
    read = _read(_folder(tmp_path, 4))
    calls = _broken_decoder(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ressl.data.jpegs"):
        first = decode_on_device(read, [24, 12], CPU)
        tried = len(calls)
        second = decode_on_device(read, [24, 12], CPU)
    assert tried == 1 + 4 + 1 and len(calls) == tried
    assert caplog.text.count("decoded none of a batch") == 1 and "no JPEG decoder" in caplog.text
    counts = decoder_for(CPU).counts
    assert (counts.device, counts.fallback, counts.failed) == (0, 8, 0)
    for i, f in enumerate(read):
        with Image.open(f.path) as im:
            want = cut_crops(im.convert("RGB"), [24, 12], f.boxes)
        assert all(torch.equal(v[i], w) for v, w in zip(first, want))
    assert all(map(torch.equal, first, second))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_decodes_what_the_cpu_decodes(tmp_path):
    files = _folder(tmp_path)
    g = [torch.Generator().manual_seed(i) for i in range(len(files))]
    read = [read_for_device(str(f), CROPS, gen) for f, gen in zip(files, g)]
    cpu = decode_on_device(read, [24, 12], CPU)
    cuda = decode_on_device(read, [24, 12], torch.device("cuda"))
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda" and (a.float() - b.cpu().float()).abs().mean() < 1.5
    # nvjpeg decoded them all: a PIL fallback copied over would pass the comparison too
    counts = decoder_for("cuda").counts
    assert (counts.device, counts.fallback, counts.failed) == (len(files), 0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_passes_the_probe_and_auto_decodes_on_the_gpu():
    assert decode_place("auto", "cuda") == "device" and decoder_for("cuda").works is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resizes_a_4000_px_box_to_32_px():
    image = _smooth(4000).cuda()
    crop = resize_box(image, (0, 0, 4000, 4000), 32)
    direct = resize_box(image.cpu(), (0, 0, 4000, 4000), 32)
    assert (crop.cpu() - direct).abs().max() < 0.5
