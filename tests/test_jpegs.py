"""JPEGs decoded on the training device (``decode="device"``), against PIL in the workers.

On a CPU the "device" is the CPU: the workers read bytes and the main process decodes
them with ``torchvision.io.decode_jpeg`` and cuts the crops with torch. A GPU runs the
same Python, but torchvision's CUDA decoder (nvjpeg, a side stream) is not exercised
here; the CUDA test at the end runs where a GPU exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import TINY
from PIL import Image

from ressl import train
from ressl.checkpoint import load_checkpoint
from ressl.jpegs import decode_on_device, read_for_device
from ressl.sources import FolderImages, epoch_order

CROPS = [(24, (0.2, 1.0)), (12, (0.05, 0.3))]


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
    return list(source.crop_batches(4, CROPS, epoch=1, seed=3, decode=decode,
                                    num_workers=workers))  # fmt: skip


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


def test_a_damaged_jpeg_falls_back_without_losing_the_batch(tmp_path, caplog):
    files = _folder(tmp_path, 4)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # header intact, scan cut: PIL fails too
    g = [torch.Generator().manual_seed(i) for i in range(4)]
    read = [read_for_device(str(f), CROPS, gen) for f, gen in zip(files, g)]
    assert all(r.data is not None for r in read)
    with caplog.at_level(logging.WARNING, logger="ressl.jpegs"):
        views = decode_on_device(read, [24, 12], torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24), (4, 3, 12, 12)]
    for i in (0, 2, 3):  # the good files as if decoded alone
        alone = decode_on_device([read[i]], [24, 12], torch.device("cpu"))
        assert all(torch.equal(v[i], a[0]) for v, a in zip(views, alone))
    assert all(not v[1].any() for v in views)  # neither nvjpeg/libjpeg nor PIL: black
    assert "could not decode" in caplog.text and "1.jpg" in caplog.text


def test_a_streamed_jpeg_run_decodes_on_the_device_and_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setattr("ressl.folders.MAX_IN_MEMORY_BYTES", 0)
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
    with caplog.at_level(logging.WARNING, logger="ressl.jpegs"):
        views = decode_on_device(read, [24, 12], torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24), (4, 3, 12, 12)]
    assert all(not v[3].any() for v in views) and "bad.jpg" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_decodes_what_the_cpu_decodes(tmp_path):
    files = _folder(tmp_path)
    g = [torch.Generator().manual_seed(i) for i in range(len(files))]
    read = [read_for_device(str(f), CROPS, gen) for f, gen in zip(files, g)]
    cpu = decode_on_device(read, [24, 12], torch.device("cpu"))
    cuda = decode_on_device(read, [24, 12], torch.device("cuda"))
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda" and (a.float() - b.cpu().float()).abs().mean() < 1.5
