"""Data-parallel training across processes: torch.distributed, launched by ``torchrun``.

``ressl.train`` runs distributed when the environment says so (``WORLD_SIZE`` > 1,
as ``torchrun`` sets it) or when a process group is already initialised. Each
process ("rank") trains on its own shard of every global batch; the student is
wrapped in ``DistributedDataParallel``; BatchNorm statistics are computed over
the global batch (``torch.nn.SyncBatchNorm`` under NCCL; ``CrossRankBatchNorm``, which
also runs on CPUs, with gloo: ``batchnorm_for``); teacher embeddings are all-gathered
before they are enqueued, so every rank holds the identical queue.

Everything here is a no-op in a single process.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ressl.errors import ConfigError

__all__ = [
    "World",
    "rank_device",
    "CrossRankBatchNorm",
    "batchnorm_for",
    "convert_batchnorm",
    "wrap_ddp",
    "reset_ddp_",
    "all_gather_cat",
    "all_gather_rows",
    "any_rank",
]

log = logging.getLogger("ressl")


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = (
        False  # this process group was created by ``World.join`` (and is ours to destroy)
    )

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @classmethod
    def join(cls, device: str = "auto") -> World:
        """The current process group, or one created from the torchrun environment.

        Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR`` /
        ``MASTER_PORT`` through the ``env://`` rendezvous) and initialises NCCL when
        this rank will train on a GPU, gloo otherwise. Without those variables (or
        with ``WORLD_SIZE=1``) this is a single process.

        Raises:
            ValueError: on a torchrun environment that is not a whole number.
        """
        if dist.is_available() and dist.is_initialized():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return cls(dist.get_rank(), dist.get_world_size(), local, owns_group=False)
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            int(os.environ.get("RANK", "0"))  # checked here; init_process_group reads it
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise ConfigError(
                "WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them); "
                f"got WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}, RANK={os.environ.get('RANK')!r}"
            ) from None
        if size <= 1:
            return cls()
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        mine = rank_device(device, size, local, _gpus())  # refused before the rendezvous
        gpu = mine.startswith("cuda") and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(mine)
        dist.init_process_group("nccl" if gpu else "gloo", init_method="env://")
        return cls(dist.get_rank(), dist.get_world_size(), local, owns_group=True)

    def device(self, requested: str) -> str:
        """The device this rank trains on (``rank_device``)."""
        return rank_device(requested, self.size, self.local_rank, _gpus())

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing when not distributed)."""
        if self.distributed and dist.is_available() and dist.is_initialized():
            dist.barrier()

    def leave(self) -> None:
        """Destroy the process group if ``join`` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def rank_device(requested: str, world_size: int, local_rank: int, gpus: int) -> str:
    """The device a rank trains on, from the ``device`` setting.

    In one process, the setting itself. In a world of several ranks (torchrun), ``cuda``,
    and ``auto`` where there are GPUs, are the GPU of the rank's ``LOCAL_RANK`` (one GPU per
    process, NCCL between them); ``cpu`` stays the CPU (gloo).

    Raises:
        ConfigError: ``cuda:N`` in a world of several ranks (every rank of the node would
            train on that one GPU), or a ``LOCAL_RANK`` with no GPU of its own.
    """
    if world_size <= 1:
        return requested
    if requested == "auto":
        requested = "cuda" if gpus else "cpu"
    if requested.startswith("cuda:"):
        raise ConfigError(
            f"{{device}} {requested} names one GPU, but {world_size} processes were started "
            "and each would train on it; give {device} cuda, and each process takes the GPU "
            "of its LOCAL_RANK",
            "device",
        )
    if requested != "cuda":
        return requested
    if 0 < gpus <= local_rank:
        raise ConfigError(
            f"{{device}} cuda: this process has LOCAL_RANK {local_rank}, but {gpus} GPU(s) are "
            f"visible; start at most {gpus} processes per node (torchrun --nproc-per-node "
            f"{gpus}), one per GPU",
            "device",
        )
    return f"cuda:{local_rank}"  # without GPUs, select_device says so


class CrossRankBatchNorm(_BatchNorm):
    """BatchNorm over the global batch: statistics all-reduced across ranks, on any device.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm1d/2d/3d``, so
    checkpoints load into a plain model. In training mode with more than one rank,
    the per-channel sums ``sum x`` and ``sum x^2`` and the count are summed over all
    ranks with an autograd-aware all-reduce (gradients flow back across ranks, as
    in ``torch.nn.SyncBatchNorm``); otherwise it is ordinary BatchNorm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        sync = (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )
        if not sync:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = x.new_full(
            (1,), x.numel() / x.shape[1]
        )  # a fill on the device: no host-to-device copy
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])  # (2C + 1,)
        stats = _AllReduceSum.apply(stats)  # summed over ranks, with a backward
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises
        if (
            self.track_running_stats
            and self.running_mean is not None
            and self.running_var is not None
        ):
            with torch.no_grad():
                tracked = self.num_batches_tracked
                if tracked is not None:
                    tracked.add_(1)
                m = float(self.momentum) if self.momentum is not None else 1.0 / float(tracked or 1)
                unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` without per-forward buffer broadcasts.

    ``CrossRankBatchNorm`` and ``nn.SyncBatchNorm`` keep the running statistics identical
    on every rank, so rank 0's buffers need not be re-sent at every forward.
    """
    kwargs: dict[str, Any] = {"device_ids": [device.index] if device.type == "cuda" else None}
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = (
        False
    )
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def batchnorm_for(backend: str) -> type[_BatchNorm]:
    """The BatchNorm over the global batch for a process group's ``backend``.

    NCCL: ``nn.SyncBatchNorm``, whose fused CUDA kernels read the input once in its own
    dtype; ``CrossRankBatchNorm`` makes an fp32 copy and about ten unfused kernels per layer.
    Otherwise (gloo): ``CrossRankBatchNorm``, since ``nn.SyncBatchNorm`` refuses CPU inputs
    (and ``torch.batch_norm_stats`` has no CPU kernel). Both keep plain BatchNorm's tensors
    and state-dict keys, so a checkpoint moves between them.
    """
    return nn.SyncBatchNorm if backend == "nccl" else CrossRankBatchNorm


def reset_ddp_(module: nn.Module) -> None:
    """Make a ``DistributedDataParallel`` module ready for a forward after a backward that
    failed part-way (its gradient hooks had fired for some parameters, so the next forward
    would refuse to start); nothing for any other module."""
    if isinstance(module, nn.parallel.DistributedDataParallel):  # as DDP's own regrouping does
        module._has_rebuilt_buckets = False
        module.reducer._reset_state()


def convert_batchnorm(module: nn.Module, kind: type[_BatchNorm] = CrossRankBatchNorm) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a ``kind`` (``batchnorm_for``) holding the
    same tensors.

    Returns the converted module (``module`` itself unless it is a BatchNorm).
    """
    if isinstance(module, _BatchNorm) and type(module) is not kind:
        new = kind(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        setattr(module, name, convert_batchnorm(child, kind))
    return module


@torch.no_grad()
def all_gather_cat(tensor: Tensor) -> Tensor:
    """``(B, ...)`` from every rank, concatenated in rank order: ``(world * B, ...)``, no grad."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_gather_rows(tensor: Tensor) -> Tensor:
    """Like ``all_gather_cat`` for per-rank row counts that may differ (padded, then trimmed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (a collective: call it on all ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
