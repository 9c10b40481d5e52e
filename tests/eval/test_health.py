"""Label-free health measures (ressl.eval.health) on constructed inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ressl.eval.health import (
    Health,
    alignment,
    embedding_std,
    health,
    healthy_std,
    queue_similarity,
    rankme,
    relation_agreement,
    relation_entropy,
    uniformity,
)
from ressl.functional import random_queue

EPS = 1e-7  # RankMe's default, as in the paper


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=_generator(seed)), dim=1)


def _orthonormal_rows(k: int, d: int, seed: int = 0) -> torch.Tensor:
    """``(k, d)`` orthonormal rows (k <= d), from a QR decomposition in fp64."""
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=_generator(seed), dtype=torch.float64))
    return q.T.contiguous()


def _rankme_closed_form(k: int, m: int, eps: float) -> float:
    """RankMe of a matrix with k equal non-zero singular values out of m = min(N, D)."""
    p_signal, p_null = 1 / k + eps, eps
    entropy = -k * p_signal * math.log(p_signal)
    if m > k and eps > 0:
        entropy -= (m - k) * p_null * math.log(p_null)
    return math.exp(entropy)


# --- a collapsed batch: every row the same vector -----------------------------------------


def test_collapsed_batch_has_rank_one_zero_std_zero_uniformity_and_a_flat_memory():
    v = torch.randn(1, 16, generator=_generator(1))
    z = v.expand(64, 16).contiguous()  # (N, D) = (64, 16): one point
    # RankMe: one non-zero singular value -> exp(0) = 1 exactly without eps; with the paper's
    # eps the 15 null directions add about 15 * eps * log(1/eps) = 2.4e-5 to the entropy
    assert rankme(z, eps=0.0).item() == pytest.approx(1.0, abs=1e-6)
    assert rankme(z).item() == pytest.approx(_rankme_closed_form(1, 16, EPS), rel=1e-6)
    assert _rankme_closed_form(1, 16, EPS) == pytest.approx(1.000024, abs=1e-6)
    assert embedding_std(z).item() == pytest.approx(0.0, abs=1e-7)  # every coordinate constant
    assert uniformity(z).item() == pytest.approx(0.0, abs=1e-6)  # log(mean exp(0)) = log 1 = 0
    assert alignment(z, z).item() == 0.0
    assert queue_similarity(z).item() == pytest.approx(1.0, abs=1e-6)  # every pair cosine 1
    # a relation to a queue of one repeated entry is flat: entropy log K, whatever the temperature
    queue = F.normalize(z[:10], dim=1)
    u = _unit_rows(5, 16)
    assert relation_entropy(u, queue, 0.04).item() == pytest.approx(math.log(10), rel=1e-6)


def test_an_all_zero_matrix_has_rank_one_and_a_non_finite_one_gives_nan():
    assert rankme(torch.zeros(8, 4), eps=0.0).item() == 1.0  # collapse to a point
    bad = torch.randn(8, 4)
    bad[3, 1] = float("nan")
    assert math.isnan(rankme(bad).item())
    bad[3, 1] = float("inf")
    assert math.isnan(rankme(bad).item())


# --- a rank-k batch ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_rankme_of_orthogonal_equal_norm_rows_is_exactly_k(k):
    rows = 3.0 * _orthonormal_rows(k, 32, seed=k)  # (k, 32), every singular value 3
    z = rows.repeat(5, 1)  # (5k, 32): each row five times, singular values all 3 * sqrt(5)
    assert rankme(z, eps=0.0).item() == pytest.approx(k, rel=1e-6)
    m = min(z.shape)
    assert rankme(z).item() == pytest.approx(_rankme_closed_form(k, m, EPS), rel=1e-6)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_rankme_of_a_random_rank_k_batch_is_close_to_k(k):
    basis = _orthonormal_rows(k, 64, seed=k).float()  # (k, 64)
    coefficients = torch.randn(4096, k, generator=_generator(k))  # nearly equal singular values
    r = rankme(coefficients @ basis).item()
    assert k * 0.98 <= r <= k + 1e-3


def test_rankme_agrees_with_numpy_and_is_bounded_by_min_n_d():
    x = torch.randn(40, 12, generator=_generator(3)) * torch.linspace(0.1, 2.0, 12)
    s = np.linalg.svd(x.double().numpy(), compute_uv=False)
    p = s / s.sum() + EPS
    expected = float(np.exp(-(p * np.log(p)).sum()))
    assert rankme(x).item() == pytest.approx(expected, rel=1e-6)
    assert 1.0 <= rankme(x).item() <= 12.0
    wide = torch.randn(5, 50, generator=_generator(4))  # N < D: at most N
    assert 1.0 <= rankme(wide).item() <= 5.0 + 1e-3


# --- an isotropic batch ------------------------------------------------------------------------


def test_isotropic_gaussian_batch_is_healthy():
    d = 64
    z = torch.randn(4096, d, generator=_generator(5))
    assert rankme(z).item() > 0.99 * d  # singular values within +-13% of each other
    assert embedding_std(z).item() == pytest.approx(healthy_std(d), rel=0.02)
    # log E exp(-2 |z_i - z_j|^2) = -4 + 8/D for Gaussian directions (cosine ~ N(0, 1/D))
    assert uniformity(z[:1024]).item() == pytest.approx(-4 + 8 / d, abs=0.02)
    assert healthy_std(d) == 0.125


def test_alignment_and_uniformity_match_wang_and_isola_reference_code():
    # github.com/SsnL/align_uniform (Wang & Isola, ICML 2020), align_uniform/__init__.py
    def align_loss(x, y, alpha=2):
        return (x - y).norm(p=2, dim=1).pow(alpha).mean()

    def uniform_loss(x, t=2):
        return torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()

    x = _unit_rows(200, 8, seed=6)
    y = F.normalize(x + 0.3 * torch.randn(200, 8, generator=_generator(7)), dim=1)
    for alpha in (1.0, 2.0, 3.0):
        assert alignment(x, y, alpha).item() == pytest.approx(
            align_loss(x.double(), y.double(), alpha).item(), rel=1e-5
        )
    for t in (0.5, 2.0, 5.0):
        assert uniformity(x, t).item() == pytest.approx(
            uniform_loss(x.double(), t).item(), abs=1e-5
        )


def test_alignment_has_known_values_and_ignores_scale():
    e = torch.eye(4)
    assert alignment(e, 3 * e).item() == pytest.approx(0.0, abs=1e-7)  # same directions
    assert alignment(e, -e).item() == pytest.approx(4.0)  # opposite: |2u|^2
    assert alignment(e, -e, alpha=1).item() == pytest.approx(2.0)
    assert alignment(e, e.roll(1, dims=0)).item() == pytest.approx(2.0)  # orthogonal: 2 - 2 cos


def test_uniformity_of_two_orthogonal_and_two_opposite_points():
    e = torch.eye(2)
    assert uniformity(e).item() == pytest.approx(-4.0, abs=1e-6)  # |e0 - e1|^2 = 2, -2 * 2
    assert uniformity(torch.stack([e[0], -e[0]])).item() == pytest.approx(-8.0, abs=1e-6)
    assert uniformity(torch.stack([e[0], -e[0]]), t=50.0).item() == pytest.approx(
        -200.0
    )  # no underflow


# --- ReSSL's own: the teacher relation, agreement, the queue -----------------------------------


def test_relation_entropy_is_zero_for_a_one_hot_relation_and_log_k_for_a_flat_one():
    queue = torch.eye(8)  # K = 8 orthonormal entries
    one_hot = relation_entropy(
        queue[[0, 3, 5]], queue, 0.01
    )  # logits 100 vs 0: mass e^-100 elsewhere
    assert one_hot.item() == pytest.approx(0.0, abs=1e-30)
    flat_queue = torch.eye(9)[:8]  # entries e_0..e_7; z = e_8 is orthogonal to all of them
    z = torch.eye(9)[[8, 8]]
    assert relation_entropy(z, flat_queue, 0.04).item() == pytest.approx(math.log(8), rel=1e-6)


def test_relation_entropy_of_a_two_entry_queue_is_the_binary_entropy():
    queue = torch.eye(2)
    for t in (0.5, 1.0, 2.0):
        p = 1 / (1 + math.exp(-1 / t))  # softmax([1/t, 0])[0]
        expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
        assert relation_entropy(queue[:1], queue, t).item() == pytest.approx(expected, rel=1e-6)


def test_sharper_teacher_has_lower_entropy():
    queue = random_queue(256, 32, generator=_generator(8))
    z = _unit_rows(64, 32, seed=9)
    entropies = [relation_entropy(z, queue, t).item() for t in (0.01, 0.04, 0.1, 1.0)]
    assert entropies == sorted(entropies)
    assert 0 < entropies[0] and entropies[-1] < math.log(256)


def test_relation_agreement_is_one_for_identical_embeddings_and_one_over_k_for_independent():
    k = 8
    queue = _orthonormal_rows(k, 64, seed=10).float()  # symmetric cells: each entry wins 1/K
    z = _unit_rows(20000, 64, seed=11)
    assert relation_agreement(z, z, queue).item() == 1.0
    assert relation_agreement(z, 2 * z, queue).item() == 1.0  # top-1 ignores scale
    other = _unit_rows(20000, 64, seed=12)
    # independent rows agree with probability sum_k (1/K)^2 = 1/K; std sqrt(p(1-p)/N) = 0.0023
    assert relation_agreement(z, other, queue).item() == pytest.approx(1 / k, abs=0.01)


def test_relation_agreement_counts_matching_rows():
    queue = torch.eye(4)
    student = torch.eye(4)[[0, 1, 2, 3]]
    teacher = torch.eye(4)[[0, 1, 3, 2]]
    assert relation_agreement(student, teacher, queue).item() == 0.5


def test_queue_similarity_known_values():
    assert queue_similarity(torch.randn(1, 32).expand(100, 32)).item() == pytest.approx(
        1.0, abs=1e-6
    )
    assert queue_similarity(torch.eye(16)).item() == pytest.approx(0.0, abs=1e-7)
    e = torch.eye(2)
    # pairs: (e0, e1) 0, (e0, -e0) -1, (e1, -e0) 0 -> mean -1/3
    assert queue_similarity(torch.stack([e[0], e[1], -e[0]])).item() == pytest.approx(-1 / 3)
    assert queue_similarity(random_queue(4096, 128, generator=_generator(13))).abs().item() < 0.01


def test_queue_similarity_matches_the_pairwise_gram_matrix():
    q = 5 * torch.randn(300, 16, generator=_generator(14)) + 1  # not unit, not centred
    u = F.normalize(q.double(), dim=1)
    gram = u @ u.T
    expected = (gram.sum() - gram.diagonal().sum()) / (300 * 299)
    assert queue_similarity(q).item() == pytest.approx(expected.item(), rel=1e-6)


# --- health(): the step-level measures together -------------------------------------------------


def _step_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z_teacher = _unit_rows(64, 32, seed=seed)
    noise = 0.2 * torch.randn(64, 32, generator=_generator(seed + 1))
    z_student = F.normalize(z_teacher + noise, dim=1)
    return z_student, z_teacher, random_queue(512, 32, generator=_generator(seed + 2))


def test_health_is_the_individual_measures_together():
    z_s, z_t, queue = _step_tensors()
    h = health(z_s, z_t, queue, teacher_temperature=0.04)
    assert isinstance(h, Health)
    expected = {
        "alignment": alignment(z_s, z_t),
        "uniformity": uniformity(z_s),
        "std": embedding_std(z_s),
        "std_ratio": embedding_std(z_s) * math.sqrt(32),
        "teacher_entropy": relation_entropy(z_t, queue, 0.04),
        "teacher_entropy_ratio": relation_entropy(z_t, queue, 0.04) / math.log(512),
        "agreement": relation_agreement(z_s, z_t, queue),
        "queue_similarity": queue_similarity(queue),
    }
    values = h.to_dict()
    assert list(values) == list(expected)
    for name, value in values.items():
        assert value.shape == () and value.dtype == torch.float32, name
        assert value.item() == pytest.approx(expected[name].item(), rel=1e-5, abs=1e-7), name
    assert 0 < h.teacher_entropy_ratio.item() < 1 and 0 < h.agreement.item() <= 1


def test_health_of_a_collapsed_step():
    v = F.normalize(torch.randn(1, 32, generator=_generator(20)), dim=1)
    z = v.expand(64, 32)
    h = health(z, z, v.expand(512, 32), teacher_temperature=0.04)
    assert h.alignment.item() == 0.0 and h.agreement.item() == 1.0
    assert h.std.item() == pytest.approx(0.0, abs=1e-7) and h.std_ratio.item() < 1e-5
    assert h.uniformity.item() == pytest.approx(0.0, abs=1e-6)
    assert h.teacher_entropy_ratio.item() == pytest.approx(1.0, rel=1e-6)  # a flat target
    assert h.queue_similarity.item() == pytest.approx(1.0, abs=1e-6)


def test_health_carries_no_gradient_and_the_measures_do():
    z_s, z_t, queue = _step_tensors(30)
    z_s = z_s.clone().requires_grad_(True)
    assert not any(v.requires_grad for v in health(z_s, z_t, queue).to_dict().values())
    uniformity(z_s).backward()  # Wang & Isola train with it
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()
    with torch.no_grad():
        assert not uniformity(z_s).requires_grad


def test_bf16_inputs_are_measured_in_fp32():
    z_s, z_t, queue = _step_tensors(40)
    h32 = health(z_s, z_t, queue).to_dict()
    h16 = health(z_s.bfloat16(), z_t.bfloat16(), queue.bfloat16()).to_dict()
    for name in h32:
        assert h16[name].dtype == torch.float32, name
        assert h16[name].item() == pytest.approx(h32[name].item(), rel=0.05, abs=0.02), name
    assert rankme(z_s.bfloat16()).dtype == torch.float32


def test_measures_run_on_meta_tensors_so_none_reads_a_value_on_the_host():
    # a meta tensor has no data: .item(), bool() or any value-dependent branch would raise,
    # so running on one shows the measures never sync with the host by themselves
    with pytest.raises(RuntimeError):
        torch.ones((), device="meta").item()
    z = torch.empty(64, 32, device="meta")
    queue = torch.empty(512, 32, device="meta")
    values = {**health(z, z, queue).to_dict(), "rankme": rankme(z)}
    for name, value in values.items():
        assert value.device.type == "meta" and value.shape == (), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_measures_do_not_sync_on_cuda():
    z_s, z_t, queue = (t.cuda() for t in _step_tensors(50))
    health(z_s, z_t, queue)  # warm-up: kernels loaded, allocator primed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync now raises a RuntimeError
    try:
        values = health(z_s, z_t, queue).to_dict()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu = health(z_s.cpu(), z_t.cpu(), queue.cpu()).to_dict()
    for name, value in values.items():
        assert value.device.type == "cuda", name
        assert value.item() == pytest.approx(cpu[name].item(), rel=1e-4, abs=1e-5), name
    assert rankme(z_s).device.type == "cuda"


# --- bad input ---------------------------------------------------------------------------------


def test_bad_shapes_and_arguments_are_named():
    z = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"features must have shape \(N, D\).*\(8,\)"):
        rankme(torch.randn(8))
    with pytest.raises(TypeError, match="floating-point"):
        rankme(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        embedding_std([[1.0, 2.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps must be a number in"):
        rankme(z, eps=-1.0)
    with pytest.raises(ValueError, match=r"z_a has shape \(8, 4\) but z_b has \(7, 4\)"):
        alignment(z, z[:7])
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        alignment(z, z, alpha=0)
    with pytest.raises(ValueError, match=r"N >= 2"):
        uniformity(z[:1])
    with pytest.raises(ValueError, match=r"N >= 2"):
        embedding_std(z[:1])
    with pytest.raises(ValueError, match="t must be a number > 0"):
        uniformity(z, t=-2)
    with pytest.raises(ValueError, match="queue has dim 5 but the embeddings have dim 4"):
        relation_agreement(z, z, torch.randn(10, 5))
    with pytest.raises(ValueError, match="queue has dim 5 but z has dim 4"):
        relation_entropy(z, torch.randn(10, 5), 0.04)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        relation_entropy(z, torch.randn(10, 4), 0.0)
    with pytest.raises(ValueError, match=r"queue must have shape \(N, D\) with N >= 2"):
        queue_similarity(torch.randn(1, 4))
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        healthy_std(0)
    with pytest.raises(ValueError, match=r"queue must have shape \(N, D\) with N >= 2"):
        health(z, z, torch.randn(1, 4))
