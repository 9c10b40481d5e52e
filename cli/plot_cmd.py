"""``ressl plot RUN_DIR``: training curves and a t-SNE of test-set features.

Writes ``curves.png`` (loss and learning rate per progress window from ``steps.jsonl``,
epoch means from ``metrics.jsonl``, the kNN monitor and the evaluations recorded in
``eval.jsonl``, the label-free health measures and the monitor's RankMe, against epochs) and
``tsne.png`` (exact t-SNE of test-set backbone features coloured by class, the
paper's qualitative figure). Needs matplotlib: ``pip install 'ressl[plot]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import torch

from ressl.atomic import write_atomic
from ressl.jsontext import parse_json
from ressl.runs.folder import CHECKPOINT, EVAL_LOG, METRICS, read_run_file

from .common import DataRootOpt, DeviceOpt, Weights, WeightsOpt, fail
from .eval_cmd import load_eval_data, load_source, pick_device


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a run folder's ``metrics.jsonl``; one-line errors for anything else."""
    from ressl.runs.folder import read_metrics

    if not run_dir.exists():
        fail(f"{run_dir}: no such folder")
    if not run_dir.is_dir():
        fail(f"{run_dir} is not a folder; pass a run folder (the --out of ressl train)")
    path = run_dir / METRICS
    if not path.is_file():
        fail(
            f"{run_dir} has no {METRICS}: not a ressl run folder (ressl train --out RUN_DIR writes one)"
        )
    rows = read_metrics(path)
    if not rows:
        fail(f"{path} is empty: the run has not finished an epoch yet")
    if any("epoch" not in row for row in rows):
        fail(f"{path} has a row without an 'epoch' field")
    return rows


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        fail("ressl plot needs matplotlib: pip install 'ressl[plot]'")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run folder's ``eval.jsonl`` that name an epoch and a top-1 accuracy."""
    path = run_dir / EVAL_LOG
    rows = []
    for line in (read_run_file(path) or "").splitlines():
        try:
            row = parse_json(line, str(path))
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("top1"), (int, float)):
            try:
                rows.append({**row, "epoch": float(row.get("epoch"))})  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
    return rows


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically: a link there is replaced, not followed."""
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120), "figure")
    finally:
        plt.close(fig)
    return path


def plot_curves(
    plt: Any,
    rows: list[dict[str, Any]],
    title: str,
    path: Path,
    knn_title: str = "kNN monitor",
    steps: list[dict[str, Any]] | None = None,
    evaluations: list[dict[str, Any]] | None = None,
) -> Path:
    """Loss and learning rate (per progress window from ``steps.jsonl`` when there is one,
    per epoch otherwise) and top-1 accuracy (the kNN monitor, and the evaluations of
    ``eval.jsonl``) against epochs, side by side."""
    steps, evaluations = steps or [], evaluations or []
    knn = [r for r in rows if "knn_top1" in r]
    health = any("std_ratio" in r for r in steps) or any("rankme" in r for r in rows)
    panels = 2 + bool(knn or evaluations) + health
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), constrained_layout=True)
    _loss_panel(axes[0], rows, steps)
    _lr_panel(axes[1], rows, steps)
    if knn or evaluations:
        _accuracy_panel(axes[2], knn, evaluations, knn_title)
    if health:
        _health_panel(axes[-1], rows, steps)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(plt, fig, path)


def _loss_panel(ax: Any, rows: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
    """The loss per progress window (when there are steps) and per epoch."""
    if steps:
        ax.plot(
            [r["epoch"] for r in steps],
            [r.get("loss", float("nan")) for r in steps],
            linewidth=0.8,
            alpha=0.6,
            label="progress window",
        )
    ax.plot(
        [r["epoch"] for r in rows],
        [r.get("loss", float("nan")) for r in rows],
        marker="o" if steps else ("." if len(rows) < 40 else None),
        label="epoch mean",
    )
    ax.set(xlabel="epoch", ylabel="relation loss", title="loss")
    if steps:
        ax.legend(frameon=False)


def _lr_panel(ax: Any, rows: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
    """The learning rate per progress window, or per epoch with markers (a short run shows)."""
    if steps:
        ax.plot(
            [r["epoch"] for r in steps],
            [r.get("lr", float("nan")) for r in steps],
            color="tab:orange",
        )
    else:
        ax.plot(
            [r["epoch"] for r in rows],
            [r.get("lr", float("nan")) for r in rows],
            color="tab:orange",
            marker="o",
        )
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate")


def _accuracy_panel(
    ax: Any, knn: list[dict[str, Any]], evaluations: list[dict[str, Any]], knn_title: str
) -> None:
    """Top-1 of the kNN monitor (a line) and of each evaluation protocol and weights (points).
    Top-5 is near 100% and would flatten the top-1 curve: it stays in metrics.jsonl."""
    if knn:
        ax.plot(
            [r["epoch"] for r in knn],
            [r["knn_top1"] for r in knn],
            marker="o",
            color="tab:green",
            label=knn_title,
        )
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in evaluations:
        label = f"eval {r.get('protocol', '?')} ({r.get('weights', '?')})"
        groups.setdefault(label, []).append(r)
    for label, group in sorted(groups.items()):
        ax.scatter([r["epoch"] for r in group], [r["top1"] for r in group], marker="s", label=label)
    ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    ax.legend(frameon=False, fontsize="small")


#: The label-free measures drawn per progress window (all in [0, 1] or about 1 when healthy).
HEALTH_LINES = {
    "std_ratio": "embedding std / healthy",
    "teacher_entropy_ratio": "target entropy / max",
    "agreement": "student-teacher agreement",
    "queue_similarity": "queue similarity",
}


def _health_panel(ax: Any, rows: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
    """The health measures per progress window, and the monitor's RankMe (right axis)."""
    for key, label in HEALTH_LINES.items():
        points = [(r["epoch"], r[key]) for r in steps if key in r]
        if points:
            ax.plot(*zip(*points), linewidth=0.9, label=label)
    ax.set(xlabel="epoch", ylabel="measure", title="health (no labels)")
    ranks = [(r["epoch"], r["rankme"]) for r in rows if "rankme" in r]
    if ranks:
        right = ax.twinx()
        right.plot(*zip(*ranks), marker="o", color="black", label="RankMe (features)")
        right.set_ylabel("RankMe")
        right.legend(frameon=False, fontsize="small", loc="lower right")
    if steps:
        ax.legend(frameon=False, fontsize="small", loc="upper left")


def plot_tsne(
    plt: Any, points: torch.Tensor, labels: torch.Tensor, classes: list[str], title: str, path: Path
) -> Path:
    """Scatter of a 2-d embedding coloured by class, with the class names in the legend (one
    colour when there are no classes)."""
    cmap = plt.get_cmap(
        "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo"
    )
    fig, ax = plt.subplots(figsize=(7.2, 6.4), constrained_layout=True)
    pts, ys = points.cpu().numpy(), labels.cpu().numpy()
    if not classes:  # images without labels: one colour
        ax.scatter(pts[:, 0], pts[:, 1], s=5, color="tab:blue", alpha=0.8, linewidths=0)
    for c, name in enumerate(classes):
        sel = ys == c
        if sel.any():
            color = cmap(c if len(classes) <= 20 else c / max(len(classes) - 1, 1))
            ax.scatter(
                pts[sel, 0], pts[sel, 1], s=5, color=color, label=name, alpha=0.8, linewidths=0
            )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    if 0 < len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, frameon=False)
    return _save(plt, fig, path)


RunDirArg = Annotated[
    Path, typer.Argument(metavar="RUN_DIR", help="A run folder (the --out of ressl train).")
]
PlotOutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Folder for the PNGs (default: RUN_DIR).")
]
TsneOpt = Annotated[
    bool, typer.Option("--tsne/--no-tsne", help="Also draw the t-SNE of test-set features.")
]
TsnePointsOpt = Annotated[int, typer.Option(help="Test images in the t-SNE (random, fixed seed).")]
PerplexityOpt = Annotated[float, typer.Option(help="t-SNE perplexity.")]
IterationsOpt = Annotated[int, typer.Option(help="t-SNE gradient steps.")]
TsneDatasetOpt = Annotated[
    str | None, typer.Option(help="Dataset for the t-SNE (default: the run's).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed for the choice of t-SNE points.")]


def plot_cmd(
    run_dir: RunDirArg,
    out: PlotOutOpt = None,
    tsne: TsneOpt = True,
    tsne_points: TsnePointsOpt = 2000,
    perplexity: PerplexityOpt = 30.0,
    iterations: IterationsOpt = 1000,
    dataset: TsneDatasetOpt = None,
    weights: WeightsOpt = Weights.student,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Draw a run's curves (curves.png) and a t-SNE of test-set features coloured by class (tsne.png)."""
    rows = read_metrics(run_dir)
    if tsne_points < 4:
        fail(f"--tsne-points must be >= 4, got {tsne_points}")
    dev = pick_device(device)
    plt = _pyplot()
    out = out or run_dir
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / CHECKPOINT
    typer.echo(str(_run_curves(plt, run_dir, rows, out / "curves.png")))
    if not tsne:
        return
    if not checkpoint.is_file():
        typer.echo(f"no t-SNE: {run_dir} has no {CHECKPOINT}", err=True)
        return
    source = load_source(checkpoint, weights.value, dev)
    data = load_eval_data(source, dataset, data_root)
    path = _tsne_figure(
        plt, source, data, dev, out / "tsne.png", tsne_points, perplexity, iterations, seed
    )
    typer.echo(str(path))


def _run_settings(run_dir: Path) -> dict[str, Any]:
    """The settings stored in the run folder's checkpoint; empty when it has none."""
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        return {}
    from ressl.runs.checkpoint import read_metadata
    from ressl.runs.checks import metadata_json

    return metadata_json(checkpoint, read_metadata(checkpoint), "settings", dict)


def _run_curves(plt: Any, run_dir: Path, rows: list[dict[str, Any]], path: Path) -> Path:
    """``curves.png`` of a run folder, titled with its backbone, dataset and kNN monitor."""
    from ressl.training.steplog import STEPS, read_steps

    settings = _run_settings(run_dir)
    name = run_dir.name
    if settings:
        name += f": {settings.get('backbone', '?')} on {settings.get('dataset', '?')}"
    knn_title = "kNN monitor"
    if "knn_k" in settings:
        knn_title += f" (k {settings['knn_k']}, t {settings['knn_temperature']:g})"
    steps, evaluations = read_steps(run_dir / STEPS), read_evaluations(run_dir)
    return plot_curves(plt, rows, name, path, knn_title, steps, evaluations)


def _tsne_figure(
    plt: Any,
    source: Any,
    data: Any,
    device: torch.device,
    path: Path,
    points: int,
    perplexity: float,
    iterations: int,
    seed: int,
) -> Path:
    """t-SNE of ``points`` random test images' features (of the training images when there
    is no test split), coloured by class when there are classes, drawn to ``path``."""
    import torch

    from ressl.eval.features import extract_features
    from ressl.eval.tsne import tsne as run_tsne

    from .progress import CountProgress

    images, split = (data.test, "test") if data.test is not None else (data.train, "training")
    n = len(images)
    heading = f"extracting {source.description} of {n} {data.name} {split} images on {device}"
    with torch.no_grad(), CountProgress("extract", n, heading=heading) as progress:
        feats, labels = extract_features(
            source.fn, images, mean=source.mean, std=source.std, device=device, progress=progress
        )
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:points].sort().values
    heading = (
        f"t-SNE of {len(idx)} of them: {iterations} gradient steps over all {len(idx)}^2 "
        f"pairs on {feats.device} (exact; fewer --tsne-points or --iterations is faster)"
    )
    with CountProgress("t-SNE", iterations, unit="steps/s", heading=heading) as progress:
        emb = run_tsne(
            feats[idx.to(feats.device)],
            perplexity=perplexity,
            iterations=iterations,
            progress=progress,
        )
    where = f", {source.position}" if source.position else ""
    title = f"t-SNE of {len(idx)} {data.name} {split} images\n{source.description}{where}"
    return plot_tsne(plt, emb, labels[idx.to(labels.device)], data.classes, title, path)
