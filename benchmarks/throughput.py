"""Training throughput: ressl's pipeline vs. a reference-style pipeline, in one run.

ressl: the real trainer (``ressl.train``) on CIFAR-shaped data held whole in
memory as uint8, batched views on the training device, bf16 autocast where
supported, channels-last.

reference: what the paper's code does — torchvision PIL transforms per sample
in DataLoader workers, fp32 eager, NCHW — around the same ReSSL model and loss.

Both train ResNet-18 (small-image stem) on 32 px RGB images at the same batch
size. The images are synthetic (random uint8; CIFAR cannot be downloaded here):
throughput does not depend on their content. Prints a markdown table and, with
``--write``, puts it in docs/benchmarks.md.

    python benchmarks/throughput.py --steps 10 --write
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
from common import cpu_model, write_block  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from PIL import Image

from ressl import ReSSL, TrainEvent, ema_update_, relation_loss, train
from ressl.data.loading import load_dataset

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def write_fake_cifar10(root: Path, n: int, seed: int = 0) -> Path:
    """A CIFAR-10 folder in the official python-batch format, with random pixels."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    per = -(-n // 5)
    for i in range(5):
        data = rng.integers(0, 256, size=(per, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per).tolist()
        with open(d / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
    with open(d / "test_batch", "wb") as f:
        pickle.dump(
            {
                b"data": rng.integers(0, 256, size=(512, 3072), dtype=np.uint8),
                b"labels": rng.integers(0, 10, size=512).tolist(),
            },
            f,
        )
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return root


def bench_ressl(
    root: Path,
    batch: int,
    steps: int,
    backbone: str,
    out: Path,
    *,
    fastest: bool = False,
    **settings: Any,
) -> float:
    """Images/s of the real trainer: one epoch of ``steps + 1`` steps, the first one untimed (warm-up).

    ``fastest``: the speed of the fastest timed step rather than of all of them together
    (robust to load from other processes on a shared machine).
    """
    stamps: list[float] = []

    def on_event(event: TrainEvent) -> None:
        if event.kind == "step":
            stamps.append(time.perf_counter())

    train(
        out=str(out),
        dataset="cifar10",
        data_root=str(root),
        backbone=backbone,
        batch_size=batch,
        subset=batch * (steps + 1),
        device="cpu",
        epochs=1,
        warmup_epochs=0,
        queue_size=4096,
        download=False,
        progress_every=1,
        callback=on_event,
        **settings,
    )
    if fastest:
        return batch / min(b - a for a, b in zip(stamps, stamps[1:]))
    return batch * steps / (stamps[-1] - stamps[0])


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray) -> None:
        self.images = images  # (N, 32, 32, 3) uint8
        normalize = T.Normalize(CIFAR_MEAN, CIFAR_STD)
        self.weak = T.Compose(
            [
                T.RandomResizedCrop(32, scale=(0.2, 1.0)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                normalize,
            ]
        )
        self.strong = T.Compose(
            [
                T.RandomResizedCrop(32, scale=(0.2, 1.0)),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                normalize,
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.fromarray(self.images[i])
        return self.strong(img), self.weak(img)


def bench_reference(
    images: np.ndarray, batch: int, steps: int, backbone: str, workers: int
) -> float:
    """Images/s of a reference-style loop: PIL transforms in DataLoader workers, fp32 eager, NCHW."""
    torch.manual_seed(0)
    model = ReSSL(backbone, in_channels=3, image_size=32, queue_size=4096)
    opt = torch.optim.SGD(model.student.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        _PairDataset(images), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    model.train()
    stamps = []
    for x_s, x_t in loader:
        z_s = model.student(x_s)
        with torch.no_grad():
            ema_update_(model.teacher, model.student, 0.99)
            z_t = model.teacher(x_t)
        loss = relation_loss(z_s, z_t, model.queue)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.enqueue_(z_t)
        stamps.append(
            time.perf_counter()
        )  # the first step (worker start-up) is the untimed warm-up
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per pipeline")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument(
        "--workers",
        type=lambda t: [int(v) for v in t.split(",")],
        default=[0, 1, 2],
        help="DataLoader worker counts to try for the reference pipeline, e.g. 0,1,2",
    )
    p.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args()

    n = args.batch_size * (args.steps + 1)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_fake_cifar10(Path(tmp), n)
        data = load_dataset("cifar10", root=root, download=False, subset=n)
        hwc = data.train.images.permute(0, 2, 3, 1).contiguous().numpy()  # type: ignore[attr-defined]
        for w in args.workers:
            ips = bench_reference(hwc, args.batch_size, args.steps, args.backbone, w)
            rows.append(
                (f"reference-style: PIL transforms in {w} DataLoader worker(s), fp32, NCHW", ips)
            )
            print(f"{rows[-1][0]}: {ips:.1f} images/s", flush=True)
        variants = [
            ("fp32, NCHW", dict(precision="fp32", channels_last=False)),
            ("bf16 autocast, channels-last", dict(precision="auto", channels_last=True)),
        ]
        for i, (label, settings) in enumerate(variants):
            ips = bench_ressl(
                root, args.batch_size, args.steps, args.backbone, Path(tmp) / f"run{i}", **settings
            )
            rows.append((f"ressl: uint8 in memory, batched views, {label}", ips))
            print(f"{rows[-1][0]}: {ips:.1f} images/s", flush=True)

    ref = max(ips for name, ips in rows if name.startswith("reference"))
    device = f"{cpu_model()}, {torch.get_num_threads()} threads"
    workers = ",".join(str(w) for w in args.workers)
    cmd = f"python benchmarks/throughput.py --steps {args.steps} --batch-size {args.batch_size} --workers {workers}"
    lines = [
        f"Training throughput, {args.backbone} (small-image stem) at 32 px, batch {args.batch_size}, "
        f"{args.steps} timed steps after one warm-up step; {device}; torch {torch.__version__}. "
        "Ratios are against the best reference-style configuration.",
        "",
        "| pipeline | images/s | vs best reference |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ips:,.1f} | {ips / ref:.2f}x |" for name, ips in rows]
    lines += ["", f"Command: `{cmd}`"]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_block("throughput", table, "Training throughput (CPU)")


if __name__ == "__main__":
    main()
