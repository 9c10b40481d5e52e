"""Exact t-SNE in torch, for the paper's qualitative figure (a few thousand points).

van der Maaten & Hinton, "Visualizing Data using t-SNE", JMLR 2008. Exact O(N^2)
gradients: fine for ~2,000 test-set features (a few seconds to a minute on a CPU),
and no scikit-learn dependency. The optimiser follows the reference implementation:
Gaussian affinities calibrated to a perplexity by binary search, PCA initialisation,
early exaggeration with momentum 0.5, then momentum 0.8, and per-coordinate gains.

Example:
    >>> feats = torch.randn(500, 64)
    >>> y = tsne(feats, perplexity=30.0, iterations=500)   # (500, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ressl.errors import ConfigError, DataError

__all__ = ["affinities", "tsne"]

#: Gradient steps between two ``progress`` calls of :func:`tsne`.
PROGRESS_EVERY = 10


def _squared_distances(x: Tensor) -> Tensor:
    """``(N, F) -> (N, N)`` squared Euclidean distances, clamped at 0 (round-off)."""
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)


def affinities(
    distances_sq: Tensor, perplexity: float = 30.0, *, tol: float = 1e-5, max_iter: int = 200
) -> Tensor:
    """Conditional Gaussian affinities ``p_{j|i}`` with each row's perplexity set by binary search.

    Row ``i`` is ``exp(-beta_i * d_ij^2)`` normalised over ``j != i``, with the precision
    ``beta_i`` chosen so that the row's entropy is ``log(perplexity)`` (nats). All rows
    are searched at once.

    Args:
        distances_sq: ``(N, N)`` squared distances (the diagonal is ignored).
        perplexity: effective number of neighbours, ``1 <= perplexity < N``.
        tol: stop when every row's entropy is within ``tol`` nats of the target.
        max_iter: bisection steps at most.

    Returns:
        ``(N, N)`` float64 row-stochastic matrix with a zero diagonal.

    Raises:
        ValueError: on a non-square input or a perplexity out of range.
    """
    if distances_sq.ndim != 2 or distances_sq.shape[0] != distances_sq.shape[1]:
        raise ValueError(
            f"distances_sq must be a square (N, N) matrix, got {tuple(distances_sq.shape)}"
        )
    n = distances_sq.shape[0]
    if not 1.0 <= perplexity < n:
        raise ConfigError(f"perplexity must be in [1, N) = [1, {n}), got {perplexity}")
    eye = torch.eye(n, dtype=torch.bool, device=distances_sq.device)
    d = distances_sq.double().masked_fill(eye, math.inf)
    # Shifting a row by its smallest distance changes neither p_{j|i} nor its entropy,
    # but keeps exp() away from underflow for far-apart points.
    d = d - d.min(dim=1, keepdim=True).values
    finite = d.masked_fill(eye, 0.0)
    target = math.log(perplexity)
    beta = 1.0 / finite.sum(1).div(n - 1).clamp_min(1e-12)  # (N,) 1 / mean shifted distance
    lo = torch.zeros_like(beta)
    hi = torch.full_like(beta, math.inf)
    p = torch.empty_like(d)
    for _ in range(max_iter):
        p = torch.exp(-d * beta[:, None])  # (N, N), 0 on the diagonal (exp(-inf))
        z = p.sum(1)
        entropy = torch.log(z) + beta * (finite * p).sum(1) / z
        diff = entropy - target
        if diff.abs().max().item() < tol:
            break
        too_flat = diff > 0  # entropy too high: sharpen (raise beta)
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(
            too_flat, torch.where(hi.isinf(), beta * 2.0, (beta + hi) / 2.0), (beta + lo) / 2.0
        )
    return p / p.sum(1, keepdim=True)


def _pca(x: Tensor, dims: int) -> Tensor:
    xc = x - x.mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    y = u[:, :dims] * s[:dims]  # (N, dims) principal components
    # Fix each component's sign (largest |entry| positive) so the layout is deterministic.
    idx = y.abs().argmax(0)
    signs = torch.sign(y[idx, torch.arange(y.shape[1], device=y.device)])
    y = y * torch.where(signs == 0, torch.ones_like(signs), signs)
    if y.shape[1] < dims:  # fewer features than dims: pad with zeros
        y = torch.cat([y, y.new_zeros(y.shape[0], dims - y.shape[1])], 1)
    return y


def _check_args(
    x: Tensor, dims: int, iterations: int, exaggeration_iterations: int, perplexity: float
) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be a (N, F) tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < 4:
        raise ConfigError(f"t-SNE needs at least 4 points, got {n}")
    if dims < 1:
        raise ConfigError(f"dims must be >= 1, got {dims}")
    if iterations < 1:
        raise ConfigError.invalid("iterations", ">= 1", iterations)
    if exaggeration_iterations < 0:
        raise ConfigError.invalid("exaggeration_iterations", ">= 0", exaggeration_iterations)
    if not perplexity > 0:
        raise ConfigError.invalid("perplexity", "> 0", perplexity)
    if not torch.isfinite(x).all():
        raise DataError("x contains NaN or infinite values")


def _joint_affinities(x: Tensor, perplexity: float) -> Tensor:
    """``(N, F) -> (N, N)`` float32 joint affinities ``P``: symmetric, summing to 1."""
    cond = affinities(_squared_distances(x), perplexity)
    p = cond + cond.T
    return (p / p.sum()).clamp_min(1e-12).float()


def _kl_gradient(y: Tensor, p: Tensor, eye: Tensor) -> Tensor:
    """``(N, dims)`` gradient of KL(P || Q) at the layout ``y``, Q the Student-t kernel's."""
    num = (1.0 + _squared_distances(y)).reciprocal_().masked_fill_(eye, 0.0)  # (N, N)
    q = (num / num.sum()).clamp_min_(1e-12)
    w = (p - q) * num  # (N, N)
    return 4.0 * (w.sum(1, keepdim=True) * y - w @ y)


@torch.no_grad()
def tsne(
    x: Tensor,
    *,
    dims: int = 2,
    perplexity: float = 30.0,
    iterations: int = 1000,
    early_exaggeration: float = 12.0,
    exaggeration_iterations: int = 250,
    learning_rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Embed ``(N, F)`` points in ``dims`` dimensions with exact t-SNE.

    Deterministic: PCA initialisation (scaled to std 1e-4 on the first axis), no
    random numbers. Runs on ``x``'s device.

    Args:
        x: ``(N, F)`` points, e.g. backbone features of test images; N >= 4.
        dims: output dimensions (2 for a figure).
        perplexity: effective neighbours per point; clipped to ``(N - 1) / 3``.
        iterations: gradient steps in total.
        early_exaggeration: factor on P for the first ``exaggeration_iterations`` steps.
        exaggeration_iterations: steps with exaggeration and momentum 0.5 (then 0.8).
        learning_rate: step size; default ``max(N / early_exaggeration / 4, 50)``
            (Belkina et al. 2019, scikit-learn's "auto").
        progress: called with the gradient steps done, every ``PROGRESS_EVERY`` and at the
            end (no host sync).

    Returns:
        ``(N, dims)`` float32 embedding, centred.

    Raises:
        ValueError: on a bad shape or argument.
    """
    _check_args(x, dims, iterations, exaggeration_iterations, perplexity)
    n = x.shape[0]
    x = x.float()
    p = _joint_affinities(x, min(perplexity, max((n - 1) / 3.0, 1.0)))
    lr = learning_rate if learning_rate is not None else max(n / early_exaggeration / 4.0, 50.0)

    y = _pca(x, dims)
    y = y / y[:, 0].std().clamp_min(1e-12) * 1e-4
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    for it in range(iterations):
        early = it < exaggeration_iterations
        grad = _kl_gradient(y, p * early_exaggeration if early else p, eye)
        flipped = update * grad < 0  # heading against the last step: grow the gain
        gains = torch.where(flipped, gains + 0.2, gains * 0.8).clamp_min_(0.01)
        update = (0.5 if early else 0.8) * update - lr * gains * grad  # momentum 0.5, then 0.8
        y = y + update
        if progress is not None and ((it + 1) % PROGRESS_EVERY == 0 or it + 1 == iterations):
            progress(it + 1)
    return y - y.mean(0, keepdim=True)
