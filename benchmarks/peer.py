"""ressl against the strongest peer-style ReSSL loop on a CPU, the same network and batch,
in one run; and against the network's bare compute.

peer: a ReSSL loop built from the most used SSL library, lightly, as a user would build
one. It uses:
- its view transform (``SimCLRViewTransform`` with MoCo v2's strengths) for the student,
  and torchvision's crop + flip for the teacher;
- its ``MoCoProjectionHead``, ``MemoryBankModule`` (the queue) and ``update_momentum``
  (the EMA);
- a torch DataLoader over uint8 images held in memory;
- bf16 autocast and channels-last;
- the best of 0 and 2 DataLoader workers.

ressl: ``ressl.train`` on the same images (a CIFAR-10-format folder).

bare: the same network's forward and backward, the teacher's forward and the SGD step on
pre-made normalised tensors (bf16, channels-last): the ceiling for any ReSSL step.

Both networks are ressl's: the small CNN (width 32) and ResNet-18 with the small-image
stem. Images are random 32 px RGB (speed does not depend on their content); batch 256.
Prints a markdown table; ``--write`` puts it in docs/benchmarks.md. Needs lightly::

    pip install lightly && python benchmarks/peer.py --write
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from common import cpu_model, write_block
from lightly.models.modules.heads import MoCoProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.simclr_transform import SimCLRViewTransform
from PIL import Image
from throughput import CIFAR_MEAN, CIFAR_STD, bench_ressl, write_fake_cifar10

from ressl import build_backbone


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, transform: Any) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        return self.transform(Image.fromarray(self.images[i]))


def _network(backbone: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    net = build_backbone(backbone, 3, 32, width=32)
    head = MoCoProjectionHead(net.ressl_build.feature_dim, 512, 128)
    return net, head


def bench_peer(images: np.ndarray, backbone: str, batch: int, steps: int, workers: int) -> float:
    """Images/s of the lightly-built loop over ``steps`` timed steps (one untimed first)."""
    torch.manual_seed(0)
    norm = {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}
    strong = SimCLRViewTransform(
        input_size=32, cj_strength=0.5, min_scale=0.2, gaussian_blur=0.0, normalize=norm
    )  # MoCo v2: jitter 0.4,0.4,0.4,0.1
    weak = T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.2, 1.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(CIFAR_MEAN, CIFAR_STD),
        ]
    )
    loader = torch.utils.data.DataLoader(
        _Images(images, MultiViewTransform([strong, weak])),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    net, head = _network(backbone)
    student = torch.nn.Sequential(net, head).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    teacher = copy.deepcopy(student)
    deactivate_requires_grad(teacher)
    bank = MemoryBankModule(size=(4096, 128), feature_dim_first=False)
    opt = torch.optim.SGD(student.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    stamps = []
    for i, (x_s, x_t) in enumerate(loader):
        if i > steps:
            break
        x_s = x_s.contiguous(memory_format=torch.channels_last)
        x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_s = F.normalize(student(x_s).float(), dim=1)
            update_momentum(student, teacher, 0.99)
            with torch.no_grad():
                z_t = F.normalize(teacher(x_t).float(), dim=1)
            _, queue = bank(z_t, update=True)  # the queue before this batch joins it
            p_t = F.softmax(z_t @ queue.T / 0.04, dim=1)
            loss = -(p_t * F.log_softmax(z_s @ queue.T / 0.1, dim=1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return batch * steps / (stamps[-1] - stamps[0])


def bench_bare(backbone: str, batch: int, steps: int) -> float:
    """Forward/backward, teacher forward and SGD step on pre-made tensors: the ceiling."""
    torch.manual_seed(0)
    net, head = _network(backbone)
    student = torch.nn.Sequential(net, head).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    teacher = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    stamps = []
    for _ in range(steps + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = student(x).float().square().mean()
            with torch.no_grad():
                teacher(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    return batch * steps / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 / 4)")
    parser.add_argument("--write", action="store_true", help="put the table in docs/benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    header = [
        "network",
        "bare step (ceiling)",
        "ressl `train`",
        "peer loop, 0 workers",
        "peer loop, 2 workers",
        "ressl / best peer",
        "ressl / bare",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for backbone, default_steps in (("small", 20), ("resnet18", 4)):
            steps = args.steps or default_steps
            n = args.batch * (steps + 1)
            data = write_fake_cifar10(root / backbone, n)
            images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            bare = bench_bare(backbone, args.batch, steps)
            ours = bench_ressl(data, args.batch, steps, backbone, root / f"run-{backbone}")
            peers = [bench_peer(images, backbone, args.batch, steps, w) for w in (0, 2)]
            lines.append(
                f"| {backbone} | {bare:,.0f} | {ours:,.0f} | {peers[0]:,.0f} | {peers[1]:,.0f} | "
                f"{ours / max(peers):.2f}x | {ours / bare:.2f} |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines) + (
        f"\n\nimages/s, batch {args.batch}, 32 px RGB, bf16 autocast and channels-last everywhere, "
        f"{torch.get_num_threads()} threads of {cpu_model()}, one run; "
        "`pip install lightly && python benchmarks/peer.py --write`."
    )
    print(table)
    if args.write:
        print(write_block("peer", table, "ressl against a peer-style loop (CPU)"))


if __name__ == "__main__":
    main()
