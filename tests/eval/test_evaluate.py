import math
from pathlib import Path

import pytest
import torch

from ressl.data.loading import load_dataset
from ressl.data.sources import ImageData, TensorImages
from ressl.eval.features import split_features
from ressl.eval.knn import knn_accuracy, knn_predict
from ressl.eval.linear import linear_probe
from ressl.eval.tsne import _squared_distances, affinities, tsne

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


# ----------------------------------------------------------------------------- kNN


def test_knn_scores_match_a_hand_computed_vote():
    # bank at 0, 37, 90, 180 degrees; the query at 53 degrees.
    bank = unit([0.0, 36.87, 90.0, 180.0])
    labels = torch.tensor([0, 0, 1, 1])
    query = unit([53.13])
    sims = [0.6, 0.96, 0.8, -0.6]  # cos(53.13 - angle), worked out by hand
    # k=2: the 0.96 (class 0) and 0.8 (class 1) neighbours vote with exp(sim / 0.1).
    scores = knn_predict(bank, labels, query, num_classes=2, k=2, temperature=0.1)
    assert torch.allclose(scores, torch.tensor([[math.exp(9.6), math.exp(8.0)]]), rtol=1e-3)
    # k=3 adds the 0.6 neighbour (class 0).
    scores = knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.1)
    assert torch.allclose(
        scores, torch.tensor([[math.exp(9.6) + math.exp(6.0), math.exp(8.0)]]), rtol=1e-3
    )
    # k larger than the bank is clipped: every entry votes.
    scores = knn_predict(bank, labels, query, num_classes=2, k=200, temperature=0.1)
    want1 = math.exp(8.0) + math.exp(-6.0)
    assert torch.allclose(scores, torch.tensor([[math.exp(9.6) + math.exp(6.0), want1]]), rtol=1e-3)
    assert sims[1] == max(sims)


def test_knn_temperature_decides_a_close_vote():
    # Two weak class-1 neighbours against one strong class-0 neighbour.
    bank = unit([10.0, 60.0, 61.0])
    labels = torch.tensor([0, 1, 1])
    query = unit([0.0])  # sims 0.985, 0.5, 0.485
    sharp = knn_predict(bank, labels, query, 2, k=3, temperature=0.1).argmax(1)
    flat = knn_predict(bank, labels, query, 2, k=3, temperature=10.0).argmax(1)
    assert sharp.item() == 0 and flat.item() == 1


def test_knn_accuracy_top1_and_top5():
    bank = unit([0.0, 90.0, 180.0, 270.0])
    labels = torch.tensor([0, 1, 2, 3])
    queries = unit([5.0, 85.0, 200.0, 100.0])
    truth = torch.tensor([0, 1, 2, 3])  # the last one is closest to class 1: wrong
    acc = knn_accuracy(bank, labels, queries, truth, num_classes=4, k=1)
    assert acc == {"top1": 75.0}  # no top-5 with 5 classes or fewer
    acc = knn_accuracy(bank, labels, queries, truth, num_classes=6, k=1)
    assert acc["top1"] == 75.0 and acc["top5"] == 100.0  # classes 4, 5 have no votes but still rank


def test_knn_rejects_bad_input():
    m, y = unit([0.0, 90.0]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dim 2 but queries have dim 3"):
        knn_predict(m, y, torch.ones(1, 3), 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_predict(m, y, m, 2, k=0)
    with pytest.raises(ValueError, match="query_labels must have shape"):
        knn_accuracy(m, y, m, torch.tensor([0]), 2)


# ----------------------------------------------------------------------------- linear probe


@pytest.mark.parametrize("device", DEVICES)
def test_linear_probe_separates_linearly_separable_features(device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 32, generator=g)
    x = torch.randn(3000, 32, generator=g)
    logits = x @ w.T
    top2 = logits.topk(2, dim=1).values
    x = x[top2[:, 0] - top2[:, 1] > 2.0][
        :1200
    ]  # a linear rule with a margin: separable by construction
    y = (x @ w.T).argmax(1)
    xtr, ytr, xte, yte = x[:1000], y[:1000], x[1000:], y[1000:]
    res = linear_probe(
        xtr.to(device), ytr.to(device), xte, yte, 4, epochs=30, lr=0.5, device=device
    )
    assert res["train_top1"] >= 99.0 and res["top1"] >= 98.0, res


def test_linear_probe_on_shuffled_labels_is_near_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 16, generator=g)
    y = torch.randint(0, 4, (600,), generator=g)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], 4, epochs=10)
    assert res["top1"] < 40.0  # 25% is chance: no signal to find


def test_linear_probe_rejects_bad_input():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"train_labels must be in \[0, 3\), got values in \[0, 5\]"
    ):
        linear_probe(x, torch.tensor([0] * 9 + [5]), x, y, 3)
    with pytest.raises(ValueError, match="dim 4 but test features have dim 5"):
        linear_probe(x, y, torch.randn(10, 5), y, 3)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        linear_probe(x, y, x, y, 3, epochs=0)
    with pytest.raises(ValueError, match="lr must be a number > 0"):
        linear_probe(x, y, x, y, 3, lr=-1.0)


# ----------------------------------------------------------------------------- split features


def test_split_features_on_a_folder(image_folder: Path):
    data = load_dataset(f"folder:{image_folder}", image_size=8)
    tr_f, tr_y, te_f, te_y = split_features(lambda x: x.flatten(1), data, batch_size=5)
    assert tr_f.shape == (36, 3 * 8 * 8) and te_f.shape == (12, 3 * 8 * 8)
    assert torch.allclose(tr_f.norm(dim=1), torch.ones(36), atol=1e-5)
    assert tr_y.tolist() == data.labelled.labels.tolist() and sorted(set(te_y.tolist())) == [
        0,
        1,
        2,
    ]
    # the folder's classes are distinct colours: kNN on raw pixels gets them all
    assert knn_accuracy(tr_f, tr_y, te_f, te_y, 3, k=5)["top1"] == 100.0


def test_split_features_needs_labels_and_a_test_split():
    images = TensorImages(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.full((4,), -1))
    unlabelled = ImageData("folder:x", images, None, None, (0.5,), (0.5,), 1, 8, [])
    with pytest.raises(ValueError, match="has no labels"):
        split_features(lambda x: x.flatten(1), unlabelled)
    no_test = ImageData("folder:x", images, images, None, (0.5,), (0.5,), 1, 8, ["a"])
    with pytest.raises(ValueError, match="no labelled test split"):
        split_features(lambda x: x.flatten(1), no_test)


# ----------------------------------------------------------------------------- t-SNE


def blobs(n_per: int = 40, dim: int = 20, k: int = 4, spread: float = 8.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * spread
    x = torch.cat([c + torch.randn(n_per, dim, generator=g) for c in centres])
    return x, torch.arange(k).repeat_interleave(n_per)


def neighbour_agreement(points: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    d = _squared_distances(points.float())
    d.fill_diagonal_(float("inf"))
    nn = d.topk(k, largest=False).indices  # (N, k)
    return (labels[nn] == labels[:, None]).float().mean().item()


def test_affinities_hit_the_perplexity():
    x, _ = blobs(n_per=30, k=3)
    p = affinities(_squared_distances(x), perplexity=12.0)
    assert torch.allclose(p.sum(1), torch.ones(90, dtype=p.dtype))
    assert (p.diagonal() == 0).all()
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(12.0)), atol=1e-4)


def test_affinities_survive_far_apart_points():
    # squared distances ~1e6: a naive exp(-d) underflows to 0 / 0
    x, _ = blobs(n_per=10, k=2, spread=1000.0)
    p = affinities(_squared_distances(x), perplexity=5.0)
    assert torch.isfinite(p).all() and torch.allclose(p.sum(1), torch.ones(20, dtype=p.dtype))


def test_tsne_keeps_separated_clusters_separated():
    x, y = blobs()
    emb = tsne(x, perplexity=15.0, iterations=400)
    assert emb.shape == (160, 2) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert (
        neighbour_agreement(emb, y) == 1.0
    )  # every point's 5 nearest neighbours share its cluster
    centres = torch.stack([emb[y == c].mean(0) for c in range(4)])
    within = max((emb[y == c] - centres[c]).norm(dim=1).mean().item() for c in range(4))
    between = torch.pdist(centres).min().item()
    assert between > 2 * within
    assert torch.allclose(emb.mean(0), torch.zeros(2), atol=1e-3)


def test_tsne_is_deterministic():
    x, _ = blobs(n_per=10, k=3)
    assert torch.equal(tsne(x, iterations=50), tsne(x, iterations=50))


def test_tsne_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        tsne(torch.randn(10))
    with pytest.raises(ValueError, match="at least 4 points"):
        tsne(torch.randn(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        tsne(torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match="perplexity"):
        affinities(torch.zeros(5, 5), perplexity=5.0)
