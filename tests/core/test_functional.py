import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ressl import (
    cosine_lr,
    ema_update_,
    momentum_schedule,
    queue_push_,
    random_queue,
    relation,
    relation_loss,
    sharpen,
    symmetric_relation_loss,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference_loss(zs, zt, q, ts, tt):
    # Straight from RESSL.md, in float64.
    zs, zt, q = zs.double(), zt.double(), q.double()
    p_t = torch.softmax(zt @ q.T / tt, dim=1)
    log_p_s = torch.log_softmax(zs @ q.T / ts, dim=1)
    return -(p_t * log_p_s).sum(1).mean()


def test_sharpen_hand_values():
    p = sharpen(torch.tensor([math.log(3.0), 0.0]), 1.0)
    torch.testing.assert_close(p, torch.tensor([0.75, 0.25]))
    # Halving the temperature squares the odds: 3:1 -> 9:1.
    p = sharpen(torch.tensor([math.log(3.0), 0.0]), 0.5)
    torch.testing.assert_close(p, torch.tensor([0.9, 0.1]))


def test_sharpen_is_fp32_for_bf16_input():
    assert sharpen(torch.randn(4, 8).bfloat16(), 0.1).dtype == torch.float32


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_temperature_validation(bad):
    with pytest.raises(ValueError, match="temperature"):
        sharpen(torch.zeros(3), bad)
    with pytest.raises(ValueError, match="teacher_temperature"):
        relation_loss(unit(2, 4), unit(2, 4), unit(8, 4), teacher_temperature=bad)


def test_relation_matches_softmax_and_log():
    z, q = unit(3, 5), unit(7, 5, seed=1)
    p = relation(z, q, 0.2)
    torch.testing.assert_close(p, torch.softmax(z @ q.T / 0.2, dim=1))
    torch.testing.assert_close(
        relation(z, q, 0.2, log=True), torch.log_softmax(z @ q.T / 0.2, dim=1)
    )
    torch.testing.assert_close(p.sum(1), torch.ones(3))


def test_relation_shape_errors_name_arguments():
    with pytest.raises(ValueError, match="queue has dim 4 but z has dim 5"):
        relation(unit(2, 5), unit(8, 4), 0.1)
    with pytest.raises(ValueError, match=r"z must have shape \(B, D\)"):
        relation(unit(5), unit(8, 5), 0.1)
    with pytest.raises(ValueError, match="queue must have shape"):
        relation(unit(2, 5), unit(5), 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_relation_loss_matches_reference(device):
    zs, zt, q = unit(6, 16, seed=1), unit(6, 16, seed=2), unit(32, 16, seed=3)
    got = relation_loss(zs.to(device), zt.to(device), q.to(device), 0.1, 0.04)
    want = reference_loss(zs, zt, q, 0.1, 0.04)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_relation_loss_is_kl_plus_teacher_entropy():
    zs, zt, q = unit(4, 8, seed=1), unit(4, 8, seed=2), unit(16, 8, seed=3)
    p_t = torch.softmax(zt @ q.T / 0.04, dim=1)
    p_s = torch.softmax(zs @ q.T / 0.1, dim=1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    entropy = -(p_t * p_t.log()).sum(1).mean()
    assert relation_loss(zs, zt, q).item() == pytest.approx((kl + entropy).item(), rel=1e-5)
    # Identical relations: the loss is exactly the entropy (KL = 0) and is the minimum over students.
    same = relation_loss(zt, zt, q, 0.04, 0.04)
    ent = -(p_t * p_t.log()).sum(1).mean()
    assert same.item() == pytest.approx(ent.item(), rel=1e-5)
    assert relation_loss(zs, zt, q, 0.04, 0.04).item() > same.item()


def test_relation_loss_gradient_is_analytic_and_teacher_has_none():
    zs = unit(5, 8, seed=1).requires_grad_(True)
    zt = unit(5, 8, seed=2).requires_grad_(True)
    q = unit(12, 8, seed=3)
    relation_loss(zs, zt, q, 0.1, 0.04).backward()
    assert zt.grad is None  # the teacher side is a target, not trained through the loss
    with torch.no_grad():
        p_t = torch.softmax(zt @ q.T / 0.04, dim=1)
        p_s = torch.softmax(zs @ q.T / 0.1, dim=1)
        expected = (p_s - p_t) @ q / 0.1 / zs.shape[0]  # d CE / d z_s
    torch.testing.assert_close(zs.grad, expected, rtol=1e-4, atol=1e-6)


def test_multi_view_loss_is_mean_of_single_views():
    views = [unit(4, 8, seed=s) for s in (1, 2, 3)]
    zt, q = unit(4, 8, seed=9), unit(16, 8, seed=10)
    singles = torch.stack([relation_loss(v, zt, q) for v in views]).mean()
    torch.testing.assert_close(relation_loss(views, zt, q), singles)
    torch.testing.assert_close(relation_loss(torch.stack(views), zt, q), singles)
    with pytest.raises(ValueError, match="batch size 3 but z_teacher has 4"):
        relation_loss([unit(3, 8)], zt, q)
    with pytest.raises(ValueError, match="at least one view"):
        relation_loss([], zt, q)


def test_multicrop_loss_reuses_one_teacher_relation_with_gradients_per_crop():
    crops = [unit(4, 8, seed=s).requires_grad_() for s in (1, 2, 3, 4, 5)]
    zt, q = unit(4, 8, seed=9), unit(16, 8, seed=10)
    loss = relation_loss(crops, zt, q, 0.1, 0.04)
    separately = sum(reference_loss(c.detach(), zt, q, 0.1, 0.04) for c in crops) / len(crops)
    torch.testing.assert_close(loss.double(), separately, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in crops)


def test_symmetric_loss_is_the_mean_of_its_crossed_halves():
    s_a, s_b, t_a, t_b = (unit(6, 8, seed=s) for s in (1, 2, 3, 4))
    q = unit(32, 8, seed=5)
    halves = 0.5 * (reference_loss(s_a, t_b, q, 0.1, 0.04) + reference_loss(s_b, t_a, q, 0.1, 0.04))
    torch.testing.assert_close(
        symmetric_relation_loss((s_a, s_b), (t_a, t_b), q).double(), halves, rtol=1e-5, atol=1e-6
    )
    # crossed, not matched: pairing a with a gives another value
    matched = 0.5 * (
        reference_loss(s_a, t_a, q, 0.1, 0.04) + reference_loss(s_b, t_b, q, 0.1, 0.04)
    )
    assert not torch.isclose(halves, matched)
    with pytest.raises(ValueError, match="two crops per side"):
        symmetric_relation_loss((s_a,), (t_a, t_b), q)


def test_relation_loss_under_bf16_autocast_is_close_and_fp32():
    zs, zt, q = unit(8, 32, seed=1), unit(8, 32, seed=2), unit(64, 32, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = relation_loss(zs, zt, q)
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(relation_loss(zs, zt, q).item(), rel=2e-2)


def test_relation_loss_under_torch_compile():
    zs, zt, q = unit(8, 16, seed=1), unit(8, 16, seed=2), unit(32, 16, seed=3)
    compiled = torch.compile(relation_loss, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(zs, zt, q), relation_loss(zs, zt, q))


def test_queue_push_wraps_like_a_ring_buffer():
    q = torch.zeros(5, 2)
    keys = torch.arange(6.0).view(3, 2)  # rows 0,1,2
    ptr = queue_push_(q, 0, keys)
    assert ptr == 3
    ptr = queue_push_(q, ptr, keys + 10)  # rows 10,11,12 -> positions 3,4,0
    assert ptr == 1
    torch.testing.assert_close(q[:, 0], torch.tensor([14.0, 2.0, 4.0, 10.0, 12.0]))


def test_queue_push_tensor_pointer_matches_int_pointer():
    q_int, q_t = torch.zeros(7, 3), torch.zeros(7, 3)
    p_int, p_t = 0, torch.zeros((), dtype=torch.long)
    for i in range(5):
        keys = unit(3, 3, seed=i)
        p_int = queue_push_(q_int, p_int, keys)
        p_t = queue_push_(q_t, p_t, keys)
    assert isinstance(p_t, torch.Tensor) and int(p_t) == p_int == (5 * 3) % 7
    torch.testing.assert_close(q_t, q_int)


def test_queue_push_casts_and_detaches():
    q = torch.zeros(4, 2, dtype=torch.bfloat16)
    keys = torch.ones(2, 2, requires_grad=True)
    queue_push_(q, 0, keys)
    assert not q.requires_grad and q[:2].float().eq(1).all()


def test_queue_push_errors():
    with pytest.raises(ValueError, match="cannot push 5 keys into a queue of size 4"):
        queue_push_(torch.zeros(4, 2), 0, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="queue has dim 2 but keys have dim 3"):
        queue_push_(torch.zeros(4, 2), 0, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="ptr must be an int in"):
        queue_push_(torch.zeros(4, 2), 4, torch.zeros(1, 2))


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_ema_update_formula_and_buffers():
    teacher, student = _net(0), _net(1)
    student[1].running_mean.fill_(0.5)
    teacher[1].running_mean.fill_(0.25)
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    # the official code: parameters only; the teacher's statistics stay its own
    torch.testing.assert_close(teacher[1].running_mean, torch.full((4,), 0.25))
    ema_update_(teacher, student, 0.9, copy_buffers=True)  # ressl < 0.2
    torch.testing.assert_close(teacher[1].running_mean, torch.full((4,), 0.5))


def test_ema_update_extremes_and_errors():
    teacher, student = _net(0), _net(1)
    frozen = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), frozen))
    ema_update_(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    with pytest.raises(ValueError, match="momentum must be in"):
        ema_update_(teacher, student, 1.5)
    with pytest.raises(ValueError, match="share an architecture"):
        ema_update_(teacher, nn.Linear(3, 4), 0.9)


def test_momentum_schedule():
    assert momentum_schedule(50, 100, 0.99) == 0.99
    assert momentum_schedule(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_schedule(50, 100, 0.99, "cosine") == pytest.approx(0.995)
    assert momentum_schedule(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule must be"):
        momentum_schedule(0, 10, 0.9, "linear")  # type: ignore[arg-type]


def test_cosine_lr_warmup_and_decay():
    lrs = [cosine_lr(s, 100, 1.0, warmup_steps=10) for s in range(101)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[9] == pytest.approx(0.9)
    old = [cosine_lr(s, 100, 1.0, warmup_steps=10, warmup_from_zero=False) for s in range(10)]
    assert old[0] == pytest.approx(0.1) and old[9] == pytest.approx(1.0)  # ressl < 0.2
    assert (
        lrs[10] == pytest.approx(1.0)
        and lrs[55] == pytest.approx(0.5)
        and lrs[100] == pytest.approx(0.0)
    )
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warm-up
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_lr(0, 10, 1.0, warmup_steps=11)


def test_random_queue_rows_are_unit_and_seeded():
    a = random_queue(16, 8, generator=torch.Generator().manual_seed(3))
    b = random_queue(16, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(16))
