"""ressl's training step against the authors' code, step by step (as lightly tests DINO).

The official ReSSL module, its backbone wrapper and head, its loss line and its optimiser
groups are pasted below from the authors' repository at a pinned commit, as they are apart
from the formatter's layout; what cannot run in one CPU process is replaced, each replacement
marked ``# REPLACED:``. Both implementations start from the same weights (student and a
different teacher), the same queue and pointer, and see the same batches; after every step
the test asserts the loss, the student after SGD, the teacher after EMA (and the BatchNorm
statistics of both), and the queue and its pointer after enqueueing.

Where the two order things differently, they are compared where both are complete:

- The official ``forward`` enqueues the teacher's keys inside the forward, before the loss is
  formed and before SGD; ressl enqueues after the SGD step. The official logits use
  ``self.queue.clone().detach()`` taken before the enqueue and the keys do not depend on
  SGD, so both losses see the queue as it was and the queue after a whole step is the same.
- Both update the teacher after the student's forward and before the teacher's forward,
  from the student's weights before this step's SGD.
- The official teacher forward shuffles the batch across GPUs for BatchNorm (shuffle-BN);
  in one process that is a permutation of the batch, whose statistics are the same.

Precision: float32 in both. ressl computes embeddings and softmaxes in float32 by design
(``Encoder.forward`` casts to float32, for bf16 autocast), so float64 is not available on
its side. The implementations differ in rounding only: ``einsum`` against a ``(D, K)`` queue
vs ``matmul`` against ``(K, D)``, ``m * t + (1 - m) * s`` vs ``torch._foreach_lerp_``, the
teacher's batch in a shuffled order, one concatenated cross-entropy vs one per crop. Over
these steps the differences measured at most 1e-6 (the loss) and 5e-7 (weights, BatchNorm
statistics, queue); the tolerances are 5e-6, while changing tau_t by 2.5 % or the EMA
momentum by 0.01 on ressl's side moves the loss and the student's weights by 1e-3 or more
(``test_the_comparison_detects_a_changed_step``).

The official repository has one-crop (``ressl.py``) and multi-crop (``ressl_multi.py``)
training; it has no symmetric ("2x backprop") step. ``symmetric_step`` composes ressl's
documented variant (docs/method.md) from the official pieces: the module's encoders, momentum
update and enqueue, and the official loss line for each pairing.

Source: https://github.com/KyleZheng1997/ReSSL at commit
4d67daaa3fd65e81adeb02017a1cfd4d2e2168cb. The repository has no license file at that commit;
``network/ressl.py`` and ``network/ressl_multi.py`` carry the header "Copyright (c) Facebook,
Inc. and its affiliates. All Rights Reserved" (their MoCo origin). The excerpts are quoted
here only to test ressl against them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import ressl

# ---------------------------------------------------------------------------------------------
# The authors' code.
# ---------------------------------------------------------------------------------------------

# https://github.com/KyleZheng1997/ReSSL/blob/4d67daaa3fd65e81adeb02017a1cfd4d2e2168cb/network/head.py


class ProjectionHead(nn.Module):
    def __init__(self, dim_in=2048, hidden_dim=4096, dim_out=512):
        super().__init__()

        self.linear1 = nn.Linear(dim_in, hidden_dim)
        self.relu1 = nn.ReLU(True)
        self.linear2 = nn.Linear(hidden_dim, dim_out)

    def forward(self, x):
        x = self.linear1(x)
        x = self.relu1(x)
        x = self.linear2(x)
        return x


# https://github.com/KyleZheng1997/ReSSL/blob/4d67daaa3fd65e81adeb02017a1cfd4d2e2168cb/network/backbone.py

WIDTH = 8  # the small CNN's first-stage width: features of 8 * WIDTH = 64

# REPLACED: the ResNets of network/resnet.py -> ressl's small CNN (conv-BN-ReLU), the same
# tiny backbone on both sides, so the test runs in seconds on a CPU
backbone_dict = {
    "small": functools.partial(ressl.SmallCNN, 3, WIDTH),
}

dim_dict = {
    "small": 8 * WIDTH,
}


class BackBone(nn.Module):
    def __init__(self, backbone="resnet50", hidden_dim=4096, dim=512):
        super().__init__()
        dim_in = dim_dict[backbone]
        self.net = backbone_dict[backbone]()
        self.head = ProjectionHead(dim_in=dim_in, hidden_dim=hidden_dim, dim_out=dim)

    def forward(self, x):
        feat = self.net(x)
        embedding = self.head(feat)
        return F.normalize(embedding)


# https://github.com/KyleZheng1997/ReSSL/blob/4d67daaa3fd65e81adeb02017a1cfd4d2e2168cb/network/ressl.py
# Copyright (c) Facebook, Inc. and its affiliates. All Rights Reserved


class ReSSL(nn.Module):
    """
    Build a MoCo model with: a query encoder, a key encoder, and a queue
    https://arxiv.org/abs/1911.05722
    """

    def __init__(self, backbone="resnet50", dim=512, K=65536 * 2, m=0.999):
        """
        dim: feature dimension (default: 512)
        K: queue size; number of negative keys (default: 65536*2)
        m: moco momentum of updating key encoder (default: 0.999)
        """
        super(ReSSL, self).__init__()  # noqa: UP008 (as written)

        self.K = K
        self.m = m

        # create the encoders
        self.encoder_q = BackBone(backbone=backbone, dim=dim)
        self.encoder_k = BackBone(backbone=backbone, dim=dim)

        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)  # initialize
            param_k.requires_grad = False  # not update by gradient

        # create the queue
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = nn.functional.normalize(self.queue, dim=0)

        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """
        Momentum update of the key encoder
        """
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        # gather keys before updating queue
        keys = concat_all_gather(keys)

        batch_size = keys.shape[0]

        ptr = int(self.queue_ptr)
        assert self.K % batch_size == 0  # for simplicity

        # replace the keys at ptr (dequeue and enqueue)
        self.queue[:, ptr : ptr + batch_size] = keys.T
        ptr = (ptr + batch_size) % self.K  # move pointer

        self.queue_ptr[0] = ptr

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        """
        Batch shuffle, for making use of BatchNorm.
        *** Only support DistributedDataParallel (DDP) model. ***
        """
        # gather from all gpus
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        batch_size_all = x_gather.shape[0]

        num_gpus = batch_size_all // batch_size_this

        # random shuffle index
        idx_shuffle = torch.randperm(batch_size_all)  # REPLACED: .cuda() dropped (CPU)

        # broadcast to all gpus
        # REPLACED: torch.distributed.broadcast(idx_shuffle, src=0) dropped (one process)

        # index for restoring
        idx_unshuffle = torch.argsort(idx_shuffle)

        # shuffled index for this gpu
        gpu_idx = 0  # REPLACED: torch.distributed.get_rank() -> 0 (one process)
        idx_this = idx_shuffle.view(num_gpus, -1)[gpu_idx]

        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        """
        Undo batch shuffle.
        *** Only support DistributedDataParallel (DDP) model. ***
        """
        # gather from all gpus
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        batch_size_all = x_gather.shape[0]

        num_gpus = batch_size_all // batch_size_this

        # restored index for this gpu
        gpu_idx = 0  # REPLACED: torch.distributed.get_rank() -> 0 (one process)
        idx_this = idx_unshuffle.view(num_gpus, -1)[gpu_idx]

        return x_gather[idx_this]

    def forward(self, im_q, im_k):
        """
        Input:
            im_q: contrastive augmented image
            im_k: weak augmented image
        Output:
            logitsq, logitsk
        """

        q = self.encoder_q(im_q)

        # compute key features
        with torch.no_grad():  # no gradient to keys
            self._momentum_update_key_encoder()  # update the key encoder

            # shuffle for making use of BN
            im, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = self.encoder_k(im)  # keys: NxC
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)

        logitsq = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logitsk = torch.einsum("nc,ck->nk", [k, self.queue.clone().detach()])

        # dequeue and enqueue
        self._dequeue_and_enqueue(k)

        return logitsq, logitsk


# utils
@torch.no_grad()
def concat_all_gather(tensor):
    """
    Performs all_gather operation on the provided tensors.
    *** Warning ***: torch.distributed.all_gather has no gradient.
    """
    # REPLACED: the all_gather over the ranks -> the tensor itself (one process, world size 1)
    return tensor


# https://github.com/KyleZheng1997/ReSSL/blob/4d67daaa3fd65e81adeb02017a1cfd4d2e2168cb/network/ressl_multi.py
# Its class is network/ressl.py's with this forward (the files differ only here and in one
# comment), so it is pasted as a subclass. REPLACED: the class name ReSSL -> ReSSLMulti.


class ReSSLMulti(ReSSL):
    def forward(self, im_q, im_k):
        """
        Input:
            im_q: list of contrastive augmented image
            im_k: weak augmented image
        Output:
            logitsq, logitsk
        """

        q_list = [self.encoder_q(im) for im in im_q]
        q = torch.cat(q_list)

        # compute key features
        with torch.no_grad():  # no gradient to keys
            self._momentum_update_key_encoder()  # update the key encoder

            # shuffle for making use of BN
            im, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            k = self.encoder_k(im)  # keys: NxC
            k = self._batch_unshuffle_ddp(k, idx_unshuffle)

        logitsq = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logitsk = torch.einsum("nc,ck->nk", [k, self.queue.clone().detach()]).repeat(len(im_q), 1)

        self._dequeue_and_enqueue(k)
        return logitsq, logitsk


# https://github.com/KyleZheng1997/ReSSL/blob/4d67daaa3fd65e81adeb02017a1cfd4d2e2168cb/ressl.py
# (main(): the optimiser; train(): one iteration). ressl_multi.py is the same apart from
# ``model(im_q=img_list[1:], im_k=img_list[0])``.


# REPLACED: main()'s lines as a function of the model and base_lr (DDP wrapper not used)
def official_optimizer(model, base_lr):
    param_dict = {}
    for k, v in model.named_parameters():
        param_dict[k] = v

    bn_params = [v for n, v in param_dict.items() if ("bn" in n or "bias" in n)]
    rest_params = [v for n, v in param_dict.items() if not ("bn" in n or "bias" in n)]

    optimizer = torch.optim.SGD(
        [
            {
                "params": bn_params,
                "weight_decay": 0,
            },
            {"params": rest_params, "weight_decay": 1e-4},
        ],
        lr=base_lr,
        momentum=0.9,
        weight_decay=1e-4,
    )
    return optimizer  # REPLACED: returned from the function


# REPLACED: one iteration of train()'s loop as a function (meters, timing, lr schedule left out)
def official_step(model, optimizer, img1, img2, t):
    # compute output
    logitsq, ligitsk = model(im_q=img1, im_k=img2)
    loss = -torch.sum(  # REPLACED: args.t -> t
        F.softmax(ligitsk.detach() / t, dim=1) * F.log_softmax(logitsq / 0.1, dim=1), dim=1
    ).mean()

    # compute gradient and do SGD step
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()  # REPLACED: losses.update(loss.item(), ...) -> returned


# ---------------------------------------------------------------------------------------------
# Not in the official repository: the symmetric ("2x backprop") step, composed from its pieces.
# ---------------------------------------------------------------------------------------------


def symmetric_step(model, optimizer, crops_q, crops_k, t):
    """ressl's documented symmetric step from the official module's pieces.

    ``crops_q = (strong_a, strong_b)``, ``crops_k = (weak_a, weak_b)``: one momentum update,
    the teacher's keys of both crops (shuffle-BN as the official forward), the official loss
    line for (student a, teacher b) and (student b, teacher a) against the queue as it was,
    their mean, then both keys enqueued (a then b) and one SGD step.
    """
    q_a, q_b = (model.encoder_q(x) for x in crops_q)
    with torch.no_grad():
        model._momentum_update_key_encoder()
        keys = []
        for x in crops_k:
            im, idx_unshuffle = model._batch_shuffle_ddp(x)
            keys.append(model._batch_unshuffle_ddp(model.encoder_k(im), idx_unshuffle))
    k_a, k_b = keys
    queue = model.queue.clone().detach()
    halves = []
    for q, k in ((q_a, k_b), (q_b, k_a)):
        logitsq = torch.einsum("nc,ck->nk", [q, queue])
        ligitsk = torch.einsum("nc,ck->nk", [k, queue])
        halves.append(
            -torch.sum(
                F.softmax(ligitsk.detach() / t, dim=1) * F.log_softmax(logitsq / 0.1, dim=1), dim=1
            ).mean()
        )
    loss = 0.5 * (halves[0] + halves[1])
    model._dequeue_and_enqueue(torch.cat([k_a, k_b]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------------
# The comparison.
# ---------------------------------------------------------------------------------------------

B = 8  # batch
SIDE = 16  # image side (the teacher's crop and the first student crop)
DIM = 16  # embedding size D
K = 8 * B  # queue size, a multiple of every enqueued batch (the official code asserts it)
LR = 0.05  # the official base lr
M = 0.9  # EMA momentum (the official 0.999 moves the teacher too little to see in 3 steps)
STEPS = 3
TOL: dict[str, float] = dict(rtol=5e-6, atol=5e-6)  # float32 rounding; see the module docstring


def _official_state(model: ressl.ReSSL) -> dict[str, Tensor]:
    """ressl's state dict renamed and laid out as the official module's."""
    names = {"student.": "encoder_q.", "teacher.": "encoder_k."}
    parts = {"backbone.": "net.", "head.net.0.": "head.linear1.", "head.net.2.": "head.linear2."}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "queue":
            out[key] = value.T.contiguous()  # (K, D) -> (D, K)
        elif key == "queue_ptr":
            out[key] = value.reshape(1)  # 0-dim -> (1,)
        else:
            top, rest = key.split(".", 1)
            sub = next(p for p in parts if rest.startswith(p))
            out[names[top + "."] + parts[sub] + rest[len(sub) :]] = value
    return out


def _pair(official_cls: type[ReSSL], seed: int, ptr: int) -> tuple[ressl.ReSSL, ReSSL]:
    """ressl's model and the official module holding the same state.

    The teacher is moved away from the student (weights and BatchNorm statistics), so the EMA
    is visible from the first step, and the pointer starts at ``ptr``.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ressl.ReSSL(
        "small",
        in_channels=3,
        image_size=SIDE,
        width=WIDTH,
        hidden_dim=4096,  # the official BackBone's default, which its ReSSL keeps
        embed_dim=DIM,
        queue_size=K,
        generator=g,
    )
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for mod in model.teacher.modules():
            if isinstance(mod, nn.BatchNorm2d):
                assert mod.running_mean is not None and mod.running_var is not None
                mod.running_mean.normal_(0.0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
        model.queue_ptr.fill_(ptr)
    official = official_cls(backbone="small", dim=DIM, K=K, m=M)
    official.load_state_dict(_official_state(model))  # strict: every name and shape matches
    model.train()
    official.train()
    return model, official


def _assert_same(model: ressl.ReSSL, official: ReSSL, step: int) -> None:
    ours, theirs = _official_state(model), official.state_dict()
    assert ours.keys() == theirs.keys()
    _close(ours["queue_ptr"], theirs["queue_ptr"], f"queue pointer, step {step}", rtol=0, atol=0)
    groups = {"student": "encoder_q.", "teacher": "encoder_k.", "queue": "queue"}
    for what, prefix in groups.items():
        for key in (k for k in ours if k.startswith(prefix) and k != "queue_ptr"):
            _close(ours[key], theirs[key], f"{what} {key}, step {step}", **TOL)


def _close(actual: Tensor, expected: Tensor, label: str, *, rtol: float, atol: float) -> None:
    """``assert_close`` whose message starts with what was compared."""
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{label}: {m}"
    )


def _batches(g: torch.Generator, sides: tuple[int, ...]) -> list[Tensor]:
    return [torch.randn(B, 3, s, s, generator=g) for s in sides]


def _run(
    official_cls: type[ReSSL],
    official_fn: Callable[..., Tensor],
    *,
    teacher_sides: tuple[int, ...],
    student_sides: tuple[int, ...],
    symmetric: bool = False,
    teacher_temperature: float = 0.04,
    momentum: float = M,
    ptr: int = K - B,
) -> None:
    """``STEPS`` steps of each implementation on the same batches, compared after every step."""
    model, official = _pair(official_cls, seed=0, ptr=ptr)
    # the official weight-decay rule (names with "bn" or "bias"), ressl's --decay-exempt names
    ours_opt = official_optimizer(model.student, LR)
    theirs_opt = official_optimizer(official, LR)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x_teacher = _batches(g, teacher_sides)
        x_student = _batches(g, student_sides)
        theirs = official_fn(official, theirs_opt, x_student, x_teacher, teacher_temperature)
        ours = ressl.training_step(
            model,
            ours_opt,
            x_teacher,
            x_student,
            momentum=momentum,
            teacher_temperature=teacher_temperature,
            symmetric=symmetric,
        )
        _close(ours, theirs, f"loss, step {step}", **TOL)
        _assert_same(model, official, step)


def _one_crop(model, optimizer, x_student, x_teacher, t):
    (img1,), (img2,) = x_student, x_teacher
    return official_step(model, optimizer, img1, img2, t)


def _multi_crop(model, optimizer, x_student, x_teacher, t):
    # ressl_multi.py: model(im_q=img_list[1:], im_k=img_list[0])
    return official_step(model, optimizer, list(x_student), x_teacher[0], t)


def _symmetric(model, optimizer, x_student, x_teacher, t):
    return symmetric_step(model, optimizer, x_student, x_teacher, t)


@pytest.mark.parametrize("teacher_temperature", [0.04, 0.07])
def test_one_crop_step_equals_the_official(teacher_temperature: float) -> None:
    _run(
        ReSSL,
        _one_crop,
        teacher_sides=(SIDE,),
        student_sides=(SIDE,),
        teacher_temperature=teacher_temperature,
    )


def test_multi_crop_step_equals_the_official() -> None:
    # crops of decreasing sides, as the official 224, 192, 160, 128, 96
    _run(ReSSLMulti, _multi_crop, teacher_sides=(SIDE,), student_sides=(SIDE, 12, 8))


def test_symmetric_step_equals_the_official_pieces() -> None:
    # 2B keys per step: the pointer starts at a multiple of 2B, so the official slice fits
    _run(
        ReSSL,
        _symmetric,
        teacher_sides=(SIDE, SIDE),
        student_sides=(SIDE, SIDE),
        symmetric=True,
        ptr=K - 2 * B,
    )


@pytest.mark.parametrize(
    "change", [dict(teacher_temperature=0.041), dict(momentum=M + 0.01)], ids=["tau_t", "momentum"]
)
def test_the_comparison_detects_a_changed_step(change: dict) -> None:
    """The tolerances are tight enough to see a small change on ressl's side only."""

    def changed(model, optimizer, x_student, x_teacher, t):
        return _one_crop(model, optimizer, x_student, x_teacher, 0.04)

    with pytest.raises(AssertionError, match="^loss, step 0"):
        _run(ReSSL, changed, teacher_sides=(SIDE,), student_sides=(SIDE,), **change)


@pytest.mark.parametrize(
    "part, change",
    [
        (
            "student encoder_q.net.features.0.weight",
            lambda m: m.student.backbone.features[0].weight,
        ),
        ("teacher encoder_k.head.linear2.bias", lambda m: m.teacher.head.net[2].bias),
        (
            "teacher encoder_k.net.features.1.running_var",
            lambda m: m.teacher.backbone.features[1].running_var,
        ),
        ("queue queue", lambda m: m.queue),
    ],
    ids=["student", "teacher", "teacher-bn", "queue"],
)
def test_the_state_comparison_sees_each_part(part: str, change: Callable) -> None:
    """A change of 1e-4 in one tensor of ressl's state fails the comparison, naming it."""
    model, official = _pair(ReSSL, seed=0, ptr=0)
    _assert_same(model, official, 0)
    with torch.no_grad():
        change(model).view(-1)[3] += 1e-4
    with pytest.raises(AssertionError, match=f"^{part}, step 0"):
        _assert_same(model, official, 0)


def test_the_state_comparison_sees_the_pointer() -> None:
    model, official = _pair(ReSSL, seed=0, ptr=0)
    model.queue_ptr.fill_(B)
    with pytest.raises(AssertionError, match="^queue pointer, step 0"):
        _assert_same(model, official, 0)
