"""``ressl.data.imagefiles``: the one decode (served, embedded and training pixels bit for bit
equal), a resize whose cost the output bounds, and only regular files read as images."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from ressl.export.images import image_files, load_image, to_batch

from ressl.data.decode import decode_image
from ressl.data.imagefiles import (
    TooManyPixels,
    decode_to_size,
    images_under,
    opened_image,
    resize_center_crop,
)


def _whole_resize_crop(image: Image.Image, size: int) -> Image.Image:
    """The evaluation resize as ressl had it: the whole image resized, then the centre cut."""
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


@contextmanager
def _deadline(seconds: int):
    """Fail (not hang) when the block takes longer: a read that blocks is the fault tested."""

    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- the resize


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_resize_equals_the_whole_resize_for_ordinary_shapes(mode):
    rng = np.random.default_rng(0)
    for w, h, size in [
        (40, 30, 28),
        (300, 200, 32),
        (28, 28, 28),
        (20, 14, 28),
        (64, 257, 32),
        (5, 9, 28),
        (100, 40, 64),
        (224, 500, 224),
    ]:
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        got, want = resize_center_crop(image, size), _whole_resize_crop(image, size)
        assert got.size == (size, size)
        assert np.array_equal(np.asarray(got), np.asarray(want)), (w, h, size)


def test_resize_of_thin_images_reads_the_box_and_matches_to_one_level():
    rng = np.random.default_rng(1)
    differing = total = 0
    for w, h, size in [(3, 400, 28), (400, 2, 32), (1, 300, 28), (7, 90, 64), (250, 9, 28)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
        got = np.asarray(resize_center_crop(image, size), dtype=np.int16)
        want = np.asarray(_whole_resize_crop(image, size), dtype=np.int16)
        assert got.shape == (size, size)
        assert np.abs(got - want).max() <= 1
        differing, total = differing + int((got != want).sum()), total + got.size
    assert differing <= 0.01 * total


def test_resize_bomb_costs_what_the_output_costs():
    # The whole resize would build 28 x 56,000,000 pixels (1.5 GB) for this image.
    for shape in [(1, 2_000_000), (2_000_000, 1)]:
        image = Image.new("L", shape, 200)
        out = resize_center_crop(image, 28)
        assert out.size == (28, 28) and np.asarray(out).min() == 200


@pytest.mark.slow
def test_resize_bomb_png_peak_memory_is_that_of_a_small_image(tmp_path):
    """Peak RSS decoding a 1 x 2,000,000 PNG (3 kB on disk) within 50 MB of a 28 x 28 one."""
    Image.new("L", (1, 2_000_000), 7).save(tmp_path / "bomb.png")
    Image.new("L", (28, 28), 7).save(tmp_path / "small.png")
    script = textwrap.dedent(
        """
        import resource, sys
        from ressl.export.images import load_image
        load_image(sys.argv[1], 28, 1)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    peak = {}
    for name in ("small.png", "bomb.png"):
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / name)],
            capture_output=True,
            text=True,
            check=True,
        )
        peak[name] = int(out.stdout.strip()) / 1024  # MB
    assert peak["bomb.png"] - peak["small.png"] < 50, peak


# ---------------------------------------------------------------- one decode, four callers


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _gif(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "GIF")
    return buf.getvalue()


def _photo(w: int, h: int, mode: str = "RGB") -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack(
        [(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) * 7) % 256], axis=-1
    ).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return _jpeg(_photo(160, 96), exif=exif.tobytes())


FILES = {
    "rgb.jpg": lambda: _jpeg(_photo(300, 200)),  # draft: decoded at 1/4
    "grey.jpg": lambda: _jpeg(_photo(112, 112, "L")),
    "large.jpg": lambda: _jpeg(_photo(2000, 1500)),  # draft: 1/8
    "small.jpg": lambda: _jpeg(_photo(20, 14)),
    "exif-rotated.jpg": _rotated_jpeg,
    "rgb8.png": lambda: _png(_photo(90, 60)),
    "grey16.png": lambda: _png(
        Image.fromarray(np.arange(50 * 70, dtype=np.uint16).reshape(50, 70) * 13)
    ),
    "palette.gif": lambda: _gif(_photo(64, 48)),
}


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("channels", [1, 3])
def test_served_embedded_and_training_pixels_are_bitwise_equal(tmp_path, name, channels):
    from ressl.export.server import EmbeddingService

    data = FILES[name]()
    path = tmp_path / name
    path.write_bytes(data)
    size = 32
    embedded = load_image(path, size, channels)  # Embedder / ressl embed
    service = SimpleNamespace(  # the server's decode, with only what it reads
        embedder=SimpleNamespace(info=SimpleNamespace(image_size=size, channels=channels)),
        settings=SimpleNamespace(max_pixels=40_000_000),
    )
    served = EmbeddingService._decode(service, name, data)  # type: ignore[arg-type]
    training = decode_image(path, size, channels)  # in-memory and streamed folders
    assert training is not None
    as_float = training.numpy().astype(np.float32) / np.float32(255)
    assert embedded.shape == (channels, size, size)
    assert np.array_equal(embedded, served)
    assert np.array_equal(embedded, as_float)
    assert np.array_equal(embedded, to_batch(data, size, channels)[0])  # bytes through the API


def test_draft_is_what_makes_them_agree():
    """A JPEG decoded in full, then resized, differs from the reduced-scale decode: the
    server used to skip the draft, so it must now be taken for bytes too."""
    data = _jpeg(_photo(300, 200))
    with Image.open(io.BytesIO(data)) as im:
        full = np.asarray(resize_center_crop(im.convert("RGB"), 32))
    drafted = np.asarray(decode_to_size(data, 32, "RGB"))
    assert not np.array_equal(full, drafted)


def test_pixel_limit_is_checked_before_decoding():
    data = _png(Image.new("L", (3000, 3000)))
    with pytest.raises(TooManyPixels, match="3000x3000 pixels, over the limit of 1,000,000"):
        decode_to_size(data, 28, "L", max_pixels=1_000_000)
    # a JPEG is counted as decoded: at 1/8 scale 2400x2400 is 300x300
    small = decode_to_size(_jpeg(Image.new("RGB", (2400, 2400))), 28, "RGB", max_pixels=100_000)
    assert small.size == (28, 28)


# ---------------------------------------------------------------- only regular files


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")


@needs_fifo
def test_a_named_pipe_is_refused_without_blocking(tmp_path):
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    with _deadline(10):
        with pytest.raises(ValueError, match="not a regular file"):
            with opened_image(pipe):
                pass
        assert decode_image(pipe, 28) is None  # training: an unreadable file, skipped
        with pytest.raises(OSError, match="pipe.png: not a readable image"):
            load_image_list([pipe])


def load_image_list(paths):
    return to_batch(paths, 28, 3)


def test_a_folder_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="a folder, not an image file"):
        with opened_image(tmp_path):
            pass


@needs_fifo
def test_folders_list_regular_files_and_follow_links_out(tmp_path):
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(tree / "a.png")
    Image.new("RGB", (8, 8)).save(outside / "far.png")
    os.mkfifo(tree / "pipe.jpg")
    (tree / "link-out.png").symlink_to(outside / "far.png")  # a file link out: followed
    (tree / "dir-out").symlink_to(outside)  # a folder link out: followed once
    (tree / "sub" / "loop").symlink_to(tree)  # a cycle: not followed twice
    (tree / "dangling.png").symlink_to(tmp_path / "missing.png")
    (tree / ".hidden.png").write_bytes(b"")
    with _deadline(10):
        found = images_under(tree)
    names = sorted(p.relative_to(tree).as_posix() for p in found)
    assert names == ["a.png", "dir-out/far.png", "link-out.png"]


def test_an_empty_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="an empty path was given"):
        image_files([""])
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="an empty path was given"):
        image_files([str(tmp_path), " "])


def test_bytes_errors_name_no_object_repr():
    with pytest.raises(OSError) as info:
        to_batch(b"not an image", 28, 3)
    assert "object at 0x" not in str(info.value)
    assert str(info.value).startswith(
        "image bytes: not a readable image (cannot identify image file"
    )


def test_decode_path_reads_a_path_like(tmp_path):
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "x.png")
    out = decode_to_size(Path(tmp_path / "x.png"), 28, "RGB")
    assert out.size == (28, 28) and out.getpixel((0, 0)) == (10, 20, 30)


# ---------------------------------------------------------------- the image-file fuzz


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def _fuzz_files(root: Path) -> list[Path]:
    """Files of every family the hostile report lacked: aspect ratios, pixel counts, modes,
    formats, damaged bytes, non-regular files and links out of the tree."""
    rng = np.random.default_rng(7)
    files: list[tuple[str, bytes]] = []
    for w, h in [
        (1, 1),
        (1, 50_000),
        (50_000, 1),
        (2, 3),
        (3, 20_000),
        (4000, 3),
        (1, 28),
        (28, 1),
        (27, 29),
        (600, 400),
    ]:
        for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
            if fmt == "WEBP" and max(w, h) > 16383:
                continue  # WebP's own limit
            files.append(
                (f"{w}x{h}.{fmt.lower()}", _encoded(Image.new("RGB", (w, h), (9, 99, 199)), fmt))
            )
    pixels = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for mode, fmt in [
        ("1", "PNG"),
        ("L", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("CMYK", "TIFF"),
        ("YCbCr", "JPEG"),
    ]:
        files.append((f"mode-{mode}.{fmt.lower()}", _encoded(pixels.convert(mode), fmt)))
    sixteen = Image.fromarray(rng.integers(0, 65535, (30, 40), dtype=np.uint16))
    files.append(("mode-I16.png", _encoded(sixteen, "PNG")))
    good = _encoded(_photo(120, 80), "JPEG")
    for cut in (0, 1, 10, 100, len(good) // 2, len(good) - 2):
        files.append((f"truncated-{cut}.jpg", good[:cut]))
    for i in range(8):
        noise = rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes()
        files.append((f"noise-{i}.png", noise))
        files.append((f"png-head-{i}.png", b"\x89PNG\r\n\x1a\n" + noise))
    paths = []
    for name, data in files:
        (root / name).write_bytes(data)
        paths.append(root / name)
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    (outside / "far.png").write_bytes(_encoded(_photo(50, 40), "PNG"))
    (root / "link-out.png").symlink_to(outside / "far.png")
    (root / "dangling.png").symlink_to(outside / "missing.png")
    (root / "folder.png").mkdir()
    paths += [root / "link-out.png", root / "dangling.png", root / "folder.png"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe.png")
        paths.append(root / "pipe.png")
    if os.path.exists("/dev/zero"):
        (root / "zero.png").symlink_to("/dev/zero")  # a device never ends
        paths.append(root / "zero.png")
    return paths


#: What PIL and the regular-file check raise on a file that is not a readable image.
CLEAN = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def test_image_file_fuzz_decodes_to_size_or_fails_cleanly(tmp_path):
    from ressl.export.server import EmbeddingService

    root = tmp_path / "fuzz"
    root.mkdir()
    paths = _fuzz_files(root)
    decoded = refused = 0
    with _deadline(120):
        for path in paths:
            for channels in (1, 3):
                training = decode_image(path, 28, channels)
                try:
                    embedded = load_image(path, 28, channels)
                except CLEAN:
                    embedded = None
                assert (training is None) == (embedded is None), path
                if path.is_file() and not path.is_symlink() or path.name == "link-out.png":
                    data = path.read_bytes()
                    service = SimpleNamespace(
                        embedder=SimpleNamespace(
                            info=SimpleNamespace(image_size=28, channels=channels)
                        ),
                        settings=SimpleNamespace(max_pixels=40_000_000),
                    )
                    try:
                        served = EmbeddingService._decode(service, path.name, data)  # type: ignore[arg-type]
                    except Exception as e:  # the server's refusal: BadInput, 4xx
                        assert type(e).__name__ == "BadInput" and 400 <= e.status < 500, (path, e)
                        assert "object at 0x" not in str(e)
                        served = None
                    assert (served is None) == (embedded is None), path
                    if served is not None:
                        assert np.array_equal(served, embedded), path
                if embedded is None:
                    refused += 1
                else:
                    assert embedded.shape == (channels, 28, 28) and embedded.dtype == np.float32
                    assert np.array_equal(embedded, training.numpy() / np.float32(255))
                    decoded += 1
    print(
        f"\nimage-file fuzz: {len(paths)} files x 2 channel counts: {decoded} decoded to 28x28, "
        f"{refused} refused cleanly, 0 tracebacks, 0 hangs"
    )
    assert decoded > 100 and refused > 30
