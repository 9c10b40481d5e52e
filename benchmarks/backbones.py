"""Backbones end to end: each trained, exported (ONNX, checked against PyTorch), exported as
plain weights, and embedded, on this machine's CPU.

For each backbone: ``ressl.train`` for ``--epochs`` on the first ``--subset``
Fashion-MNIST training images at 32 px (1 channel, so every model also gets its
1-channel first layer), batch 64, bf16 autocast where the CPU has it, no kNN
monitor; then ``export_onnx`` (verified by onnxruntime against PyTorch on batches
of 1 and 5), ``save_backbone_weights`` (loaded back with the backbone's own
library through the code in the file's metadata and compared with ressl's
features), and ``Embedder.embed_files`` on 64 PNGs. images/s is training's own
(``metrics.jsonl``, the whole ReSSL step: views, student, teacher, loss, EMA,
enqueue), from the last epoch (the first warms up). Prints a markdown table; ``--write`` puts it in
docs/benchmarks.md.

    python benchmarks/backbones.py --write
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_model, write_block
from PIL import Image
from ressl.export.embedder import Embedder
from ressl.export.exporter import export_onnx
from safetensors import safe_open
from torch import nn

from ressl import load_encoder, train
from ressl.runs.weights import save_backbone_weights


class MyNet(nn.Module):
    """A user's own module, given through the API: two conv blocks and pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


BACKBONES = [
    "small",
    "resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0",
    "torchvision:convnext_tiny",
    "torchvision:vit_b_16",
    "timm:resnet18",
    "timm:test_vit",
    "custom:MyNet",
]


def _pngs(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(path)
        files.append(path)
    return files


def _weights_parity(run: Path, out: Path, module: nn.Module | None) -> str:
    saved = save_backbone_weights(run, out, backbone=module)
    if saved.build.library == "custom":
        return "n/a (own module)"
    with safe_open(str(out), "pt") as f:
        code = f.metadata()["code"].replace("'backbone.safetensors'", repr(str(out)))
    scope: dict = {}
    exec(code, scope)  # the library's own constructor, the stated changes, the weights
    encoder, _ = load_encoder(run, backbone=module)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        diff = (scope["net"].eval()(x) - encoder.features(x)).abs().max().item()
    return f"{diff:.1e}"


def measure(spec: str, root: Path, args: argparse.Namespace, files: list[Path]) -> list[str]:
    module = MyNet() if spec == "custom:MyNet" else None
    run = root / spec.replace(":", "-")
    t0 = time.perf_counter()
    train(
        dataset="fashion-mnist",
        subset=args.subset,
        epochs=args.epochs,
        batch_size=64,
        backbone=module if module is not None else spec,
        queue_size=1024,
        knn_every=-1,
        warmup_epochs=0,
        device="cpu",
        out=str(run),
        num_workers=0,
        image_size=32,
    )
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    encoder, _ = load_encoder(run, backbone=module)
    params = sum(p.numel() for p in encoder.backbone.parameters())
    dim = encoder.backbone.ressl_build.feature_dim
    try:
        source = encoder if module is not None else run
        kw = (
            dict(image_size=28, channels=1, mean=(0.286,), std=(0.353,))
            if module is not None
            else {}
        )
        report = export_onnx(source, root / "m.onnx", **kw)
        parity = f"{report.verification.max_abs_diff:.1e}"
        embedded = Embedder(root / "m.onnx", device="cpu").embed_files(files)
        embed = f"{len(embedded.paths)}/{len(files)}"
    except Exception as e:  # noqa: BLE001 - the table says why a model did not export
        parity, embed = f"not exported: {str(e).splitlines()[0][:60]}", "-"
    weights = _weights_parity(run, root / "backbone.safetensors", module)
    return [
        f"`{spec}`",
        f"{params / 1e6:.2f} M",
        str(dim),
        f"{rows[-1]['images_per_second']:.0f}",
        f"{seconds:.0f} s",
        parity,
        weights,
        embed,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="backbones to run (default: all)")
    parser.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = parser.parse_args()
    header = [
        "backbone",
        "parameters",
        "F",
        "train img/s (CPU)",
        "train time",
        "ONNX vs PyTorch (max abs diff)",
        "weights in own library (max abs diff)",
        "embedded",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "png").mkdir()
        files = _pngs(root / "png", 64)
        for spec in args.only or BACKBONES:
            row = measure(spec, root, args, files)
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + (
        f"\n\n{args.epochs} epoch(s) on {args.subset} Fashion-MNIST images (1 x 32 x 32), "
        f"batch 64, {torch.get_num_threads()} threads of {cpu_model()}; "
        "`python benchmarks/backbones.py --write`."
    )
    print(table)
    if args.write:
        print(write_block("backbones", table, "Backbones end to end"))


if __name__ == "__main__":
    main()
