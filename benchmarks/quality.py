"""Quality benchmark: ReSSL vs raw pixels vs a random-init CNN on Fashion-MNIST, one protocol.

Two suites. ``--suite headline`` (the default) is one long run of the tuned recipe;
``--suite questions`` asks the paper's research questions at a small fixed budget
(every row trains ``--epochs`` epochs, default 20, about 5 CPU minutes each):

* baselines: raw pixels and a random-init encoder (no training);
* ReSSL at the default recipe, and again with another seed (the seed-to-seed noise);
* RQ2, weak vs strong teacher augmentation (``teacher_view="strong"``);
* RQ3, queue size K 1024 / 4096 (default) / 16384;
* the teacher temperature tau_t 0.04 (default) / 0.07 / 0.1.

It writes ``OUT/questions.json`` after every row (a rerun skips the rows already
there with the same epochs; ``--only ID,...`` reruns some, ``--fresh`` starts over) and
the table between ``<!-- MARKER:begin -->`` / ``<!-- MARKER:end -->`` in
``docs/results.md`` (``--marker``, default ``questions``; ``--render`` only rewrites the
table from ``OUT/questions.json``). ``--eval-device cuda`` extracts features and trains
the probes on a GPU (training uses the GPU whenever there is one).

The headline suite:

1. trains ReSSL with the tuned Fashion-MNIST recipe (``RECIPE`` below) for a wall-clock
   budget (``--minutes``, converted to whole epochs from a short throughput calibration,
   because the cosine schedule is tied to ``epochs``) or a fixed ``--epochs``;
2. evaluates, under ONE protocol, three (four) feature extractors on the train -> test split:
   raw pixels (normalised, flattened), a random-init small CNN of the same architecture
   (backbone features), and the trained ReSSL student (and EMA teacher) backbone;
   each row gets the weighted kNN monitor (k=200, t=0.1, cosine on L2-normalised
   features) and a linear probe on the same frozen features (same epochs / lr for all rows);
3. prints a markdown table and writes it into ``docs/results.md`` between the markers
   ``<!-- quality:begin -->`` / ``<!-- quality:end -->`` (the rest of the file is kept).

Usage:
    python benchmarks/quality.py --minutes 15 --out runs/quality --seed 0
    python benchmarks/quality.py --epochs 2 --out /tmp/q   # a quick smoke run
    python benchmarks/quality.py --suite questions --epochs 20 --out runs/questions   # ~1 hour on 2 idle cores
    python benchmarks/quality.py --suite questions --epochs 20 --eval-device cuda \
        --out runs/questions-gpu --marker questions-gpu                             # ~10 min on one H100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from ressl import extract_features, knn_accuracy, linear_probe, load_dataset, load_encoder, train  # noqa: E402
from ressl.models.network import ReSSL  # noqa: E402

# The winning Fashion-MNIST / small-CNN recipe of the search in docs/results.md ("Recipe search").
RECIPE: dict[str, Any] = dict(
    dataset="fashion-mnist",
    backbone="small",
    width=32,
    batch_size=256,
    crop_scale=(0.2, 1.0),
    jitter=(0.8, 0.8, 0.4, 0.1),
    teacher_temperature=0.04,
    student_temperature=0.1,
    lr=0.15,
    queue_size=4096,
    ema_momentum=0.99,
    warmup_epochs=1,
)

KNN_K, KNN_T = 200, 0.1
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"

# The research questions: (id, question, setting, overrides of RECIPE / train()).
QUESTIONS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("default", "-", "default: weak teacher view, K 4096, tau_t 0.04", {}),
    (
        "teacher-strong",
        "RQ2",
        "teacher view strong (same as the student's)",
        {"teacher_view": "strong"},
    ),
    ("queue-1024", "RQ3", "queue K 1024", {"queue_size": 1024}),
    ("queue-16384", "RQ3", "queue K 16384", {"queue_size": 16384}),
    ("tau-t-0.07", "tau_t", "teacher temperature 0.07", {"teacher_temperature": 0.07}),
    (
        "tau-t-0.1",
        "tau_t",
        "teacher temperature 0.1 (= tau_s: no sharpening)",
        {"teacher_temperature": 0.1},
    ),
    ("default-seed1", "noise", "default recipe, seed 1", {"seed": 1}),
    (
        "multicrop",
        "multi-crop",
        "student crops 28,24,20,16,12 (teacher: one 28 px crop)",
        {"crops": (28, 24, 20, 16, 12)},
    ),
    (
        "symmetric",
        "2x backprop",
        "symmetric: crops a and b, each through both networks",
        {"symmetric": True},
    ),
]


def cli_command(recipe: dict[str, Any], epochs: int, out: str, seed: int) -> str:
    """The equivalent ``ressl train`` command line."""
    parts = ["ressl", "train"]
    for key, value in recipe.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):  # a flag: present or absent
            parts += [flag] if value else []
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        parts += [flag, str(value)]
    parts += ["--epochs", str(epochs), "--seed", str(seed), "--out", out]
    return " ".join(shlex.quote(p) for p in parts)


def calibrate(recipe: dict[str, Any], seed: int) -> float:
    """Training images/s of the recipe, from one short epoch on a 10240-image subset."""
    tmp = Path(tempfile.mkdtemp(prefix="ressl-calib-"))
    try:
        train(
            **{**recipe, "warmup_epochs": 0},
            epochs=1,
            subset=10240,
            knn_every=0,
            seed=seed,
            out=str(tmp / "run"),
        )
        rows = [
            json.loads(line)
            for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()
            if line
        ]
        return float(rows[-1]["images_per_second"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate(
    fn: Any, data: Any, probe_epochs: int, probe_lr: float, seed: int, device: str = "cpu"
) -> dict[str, float]:
    """kNN (k=200, t=0.1) and linear-probe top-1 of a feature function, train -> test, fp32."""
    kw = dict(mean=data.mean, std=data.std, batch_size=512, device=device)
    t0 = time.perf_counter()
    mem_f, mem_y = extract_features(fn, data.labelled, **kw)  # L2-normalised
    test_f, test_y = extract_features(fn, data.test, **kw)
    knn = knn_accuracy(mem_f, mem_y, test_f, test_y, len(data.classes), KNN_K, KNN_T)
    lin = linear_probe(
        mem_f, mem_y, test_f, test_y, len(data.classes), epochs=probe_epochs, lr=probe_lr, seed=seed
    )
    return {
        "dim": mem_f.shape[1],
        "knn_top1": knn["top1"],
        "knn_top5": knn.get("top5"),
        "linear_top1": lin["top1"],
        "linear_train_top1": lin["train_top1"],
        "eval_seconds": time.perf_counter() - t0,
    }


def markdown(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"Fashion-MNIST, train (60k) -> test (10k). Generated by `benchmarks/quality.py` on {r['date']}.",
        "",
        "| features | dim | kNN top-1 | linear top-1 | training wall time | train images/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        wall = (
            f"{row['train_seconds'] / 60:.1f} min ({row['train_seconds']:.0f} s)"
            if row.get("train_seconds")
            else "-"
        )
        ips = f"{row['images_per_second']:.0f}" if row.get("images_per_second") else "-"
        lines.append(
            f"| {row['name']} | {row['dim']} | {row['knn_top1']:.2f} | {row['linear_top1']:.2f} | {wall} | {ips} |"
        )
    lines += [
        "",
        f"- Protocol: kNN k={KNN_K}, t={KNN_T}, cosine on L2-normalised features, train split as memory; "
        f"linear probe (`ressl.linear_probe`) on the same frozen, L2-normalised features, standardised, "
        f"SGD lr {r['probe_lr']} (batch 256), {r['probe_epochs']} epochs, cosine, wd 0, seed {r['seed']}. "
        "Features in fp32, networks in eval mode (BN running statistics; for the random-init CNN these are "
        "the initial 0 / 1).",
        f"- ReSSL training: {r['epochs']} epochs ({r['epochs_from']}), {r['steps']} steps, wall time includes "
        f"the kNN monitor every {r['knn_every']} epochs; images/s is the mean of the per-epoch figures "
        f"(min {r['ips_min']:.0f}, max {r['ips_max']:.0f}).",
        f"- Hardware: {r['cpu']}, {r['cpu_count']} logical CPUs, torch {r['torch']} with "
        f"{r['threads']} threads, {r['precision']}.",
        f"- Command: `{r['command']}`",
        f"- Equivalent training command: `{r['train_command']}`",
        "- Recipe: `train("
        + ", ".join(f"{k}={v!r}" for k, v in r["recipe"].items())
        + f", epochs={r['epochs']}, seed={r['seed']})`",
    ]
    return "\n".join(lines)


def write_doc(
    path: Path, table: str, begin: str = BEGIN, end: str = END, heading: str = "Benchmark"
) -> None:
    block = f"{begin}\n{table}\n{end}"
    if path.exists():
        text = path.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1]
            path.write_text(head + block + tail)
            return
        path.write_text(text.rstrip() + f"\n\n## {heading}\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Results\n\n## {heading}\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--suite",
        choices=["headline", "questions"],
        default="headline",
        help="headline: one long run of the recipe; questions: the paper's research questions",
    )
    p.add_argument("--only", default=None, help="questions suite: comma-separated row ids to run")
    p.add_argument(
        "--fresh", action="store_true", help="questions suite: ignore rows already measured"
    )
    p.add_argument(
        "--eval-device",
        default="cpu",
        help="questions suite: device for feature extraction and probe",
    )
    p.add_argument(
        "--marker",
        default="questions",
        help="questions suite: the table goes between <!-- MARKER:begin --> and <!-- MARKER:end -->",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="questions suite: only rewrite the table from OUT/questions.json, run nothing",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="training budget in minutes (default 15), converted to whole epochs",
    )
    budget.add_argument(
        "--epochs", type=int, default=None, help="train exactly this many epochs instead"
    )
    p.add_argument(
        "--out",
        default=None,
        help="run folder (replaced); default runs/quality, or runs/questions holding one folder per row",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--knn-every", type=int, default=10, help="kNN monitor interval during training")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--probe-lr", type=float, default=0.1)
    p.add_argument(
        "--results", default=str(ROOT / "docs" / "results.md"), help="markdown file to update"
    )
    p.add_argument("--no-doc", action="store_true", help="only print the table")
    args = p.parse_args(argv)
    minutes = 15.0 if args.minutes is None and args.epochs is None else args.minutes

    command = "python " + " ".join(
        shlex.quote(a)
        for a in [
            sys.argv[0] if argv is None else "benchmarks/quality.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    if args.suite == "questions":
        if args.minutes is not None:
            p.error("--suite questions trains a fixed --epochs per row (default 20), not --minutes")
        return questions(args, command)
    data = load_dataset("fashion-mnist")
    n_train = len(data.train)

    if args.epochs is not None:
        epochs, epochs_from = args.epochs, "--epochs"
    else:
        ips = calibrate(RECIPE, args.seed)
        # budget minus the kNN monitors (~3 s each) and a 3% margin for noise
        n_monitor = max(1, math.ceil(minutes * 60 * ips / n_train / max(args.knn_every, 1)))
        usable = max(minutes * 60 * 0.97 - 3.0 * n_monitor, 1.0)
        epochs = max(
            1, int(usable * ips // (n_train // RECIPE["batch_size"] * RECIPE["batch_size"]))
        )
        epochs_from = f"--minutes {minutes:g} at a calibrated {ips:.0f} images/s"
    print(f"training {epochs} epochs ({epochs_from})", flush=True)

    out = Path(args.out or "runs/quality")
    if (out / "last.safetensors").exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    ckpt = train(**RECIPE, epochs=epochs, seed=args.seed, out=str(out), knn_every=args.knn_every)
    train_seconds = time.perf_counter() - t0
    metrics = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line
    ]
    ips_list = [m["images_per_second"] for m in metrics]
    steps = metrics[-1]["step"]

    rows: list[dict[str, Any]] = []

    def add(name: str, fn: Any, **extra: Any) -> None:
        print(f"evaluating {name} ...", flush=True)
        res = evaluate(fn, data, args.probe_epochs, args.probe_lr, args.seed)
        rows.append({"name": name, **res, **extra})
        print(f"  kNN {res['knn_top1']:.2f}  linear {res['linear_top1']:.2f}", flush=True)

    add("raw pixels (normalised, flattened)", lambda x: x.flatten(1))

    torch.manual_seed(args.seed)  # the same initialisation train() starts from
    init = ReSSL(
        RECIPE["backbone"],
        in_channels=data.channels,
        image_size=data.image_size,
        hidden_dim=512,
        embed_dim=128,
        queue_size=RECIPE["queue_size"],
        width=RECIPE["width"],
        generator=torch.Generator().manual_seed(args.seed + 1),
    ).student.eval()
    add(f"random-init small CNN (width {RECIPE['width']})", init.features)

    with torch.no_grad():
        student, _ = load_encoder(ckpt, weights="student")
        teacher, _ = load_encoder(ckpt, weights="teacher")
    add(
        f"ReSSL student, {epochs} epochs",
        student.eval().features,
        train_seconds=train_seconds,
        images_per_second=sum(ips_list) / len(ips_list),
    )
    add(
        f"ReSSL teacher (EMA), {epochs} epochs",
        teacher.eval().features,
        train_seconds=train_seconds,
        images_per_second=sum(ips_list) / len(ips_list),
    )

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
        "epochs": epochs,
        "epochs_from": epochs_from,
        "steps": steps,
        "seed": args.seed,
        "knn_every": args.knn_every,
        "probe_epochs": args.probe_epochs,
        "probe_lr": args.probe_lr,
        "ips_min": min(ips_list),
        "ips_max": max(ips_list),
        "train_seconds": train_seconds,
        "monitor": [
            {k: m[k] for k in ("epoch", "loss", "knn_top1") if k in m}
            for m in metrics
            if "knn_top1" in m
        ],
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "precision": "bf16 autocast" if "bf16" in str(_amp_name()) else "fp32",
        "command": command,
        "train_command": cli_command(RECIPE, epochs, str(out), args.seed),
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in RECIPE.items()},
    }
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    print(table)
    if not args.no_doc:
        write_doc(Path(args.results), table)
        print(f"wrote {args.results}")
    return result


def _hardware() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    bf16 = torch.cuda.is_bf16_supported() if gpu else _amp_name() == "bf16"
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "precision": "bf16 autocast" if bf16 else "fp32",
    }


def _eval_commands(run: str, device: str = "cpu") -> str:
    return f"ressl eval knn {run} --device {device}; ressl eval linear {run} --device {device}"


def questions_markdown(r: dict[str, Any]) -> str:
    """The research-question table: one row per setting, each with its time; commands listed below."""
    rows = r["rows"]
    base = next((x for x in rows if x["id"] == "default"), None)
    hw = r["hardware"]
    done = sum(1 for x in rows if x["id"] in r["planned"])
    lines = [
        f"Fashion-MNIST, train (60k) -> test (10k), small CNN (width 32), {r['epochs']} epochs per ReSSL row, "
        f"one seed unless stated. Generated by `benchmarks/quality.py --suite questions` on {r['date']}"
        + (
            "."
            if done == len(r["planned"])
            else f" (partial: {done} of {len(r['planned'])} rows so far)."
        ),
        "",
        "| id | question | setting | kNN top-1 | linear top-1 | kNN vs default | linear vs default "
        "| train time | train img/s | eval time | load avg |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def delta(x: dict[str, Any], key: str) -> str:
        if base is None or x["id"] == "default" or x.get("kind") != "ressl":
            return "-"
        return f"{x[key] - base[key]:+.2f}"

    for x in rows:
        train_t = f"{x['train_seconds'] / 60:.1f} min" if x.get("train_seconds") else "-"
        ips = f"{x['images_per_second']:.0f}" if x.get("images_per_second") else "-"
        lines.append(
            f"| {x['id']} | {x['question']} | {x['setting']} | {x['knn_top1']:.2f} | {x['linear_top1']:.2f} "
            f"| {delta(x, 'knn_top1')} | {delta(x, 'linear_top1')} | {train_t} | {ips} "
            f"| {x['eval_seconds']:.0f} s | {x['load_avg']:.1f} |"
        )
    if hw.get("gpu"):
        where = (
            f"one {hw['gpu']} GPU for training ({hw['precision']}) and for evaluation "
            f"(fp32, on {r.get('eval_device', 'cpu')}), {hw['cpu_count']} logical CPUs, torch {hw['torch']}. "
            '"load avg" is the host\'s 1-minute load average when the row finished.'
        )
    else:
        where = (
            f"{hw['cpu']}, {hw['cpu_count']} logical CPUs, torch {hw['torch']} with "
            f"{hw['threads']} threads, {hw['precision']} for training, fp32 for evaluation. **The machine was "
            'shared with other jobs while this ran**: times and images/s are inflated by them; "load avg" is '
            "the 1-minute load average when the row finished (2 means two busy processes on the 2 cores, ours "
            "included). Accuracies depend on the epochs, not on the load."
        )
    lines += [
        "",
        f"- Hardware, every row: {where}",
        f"- Protocol, every row: features of the student backbone (fp32, eval mode, L2-normalised) for the train "
        f"and test splits, extracted once; kNN k={KNN_K}, t={KNN_T}; linear probe SGD lr {r['probe_lr']} "
        f'(batch 256), {r["probe_epochs"]} epochs, cosine, wd 0, seed 0. "eval time" covers extraction, kNN '
        "and probe.",
        f"- ReSSL rows: the tuned recipe (`RECIPE` in `benchmarks/quality.py`; also the `ressl train` defaults "
        f"for Fashion-MNIST) changed in one setting each, {r['epochs']} epochs, kNN monitor every "
        f"{r['knn_every']} epochs (counted in the train time).",
        f"- Whole table: `{r['command']}`; the rows' train and eval times add up to "
        f"{r['total_seconds'] / 60:.0f} min.",
        "- Each row on its own (equivalent commands; evaluation as `ressl eval`):",
    ]
    for x in rows:
        lines.append(f"  - `{x['id']}`: `{x['command']}`")
    return "\n".join(lines)


def questions(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run the research-question suite (see the module docstring); returns the result dict."""
    epochs = args.epochs or 20
    out = Path(args.out or "runs/questions")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "questions.json"
    begin, end = f"<!-- {args.marker}:begin -->", f"<!-- {args.marker}:end -->"
    if args.render:
        table = questions_markdown(json.loads(state_path.read_text()))
        print(table)
        if not args.no_doc:
            write_doc(Path(args.results), table, begin, end, "Research questions")
        return {}
    wanted = set(args.only.split(",")) if args.only else None
    ids = ["pixels", "random-init"] + [q[0] for q in QUESTIONS]
    if wanted is not None and wanted - set(ids):
        raise SystemExit(
            f"--only: unknown row id(s) {sorted(wanted - set(ids))}; valid: {', '.join(ids)}"
        )
    old: dict[str, dict[str, Any]] = {}
    if state_path.exists() and not args.fresh:
        prev = json.loads(state_path.read_text())
        if prev.get("epochs") == epochs:
            old = {x["id"]: x for x in prev["rows"]}
    result: dict[str, Any] = {
        "epochs": epochs,
        "knn_every": args.knn_every,
        "probe_epochs": args.probe_epochs,
        "probe_lr": args.probe_lr,
        "hardware": _hardware(),
        "eval_device": args.eval_device,
        "command": command,
        "planned": ids,
        "rows": [],
        "total_seconds": 0.0,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    data = load_dataset("fashion-mnist")

    def save() -> None:
        done = {x["id"]: x for x in result["rows"]}
        result["rows"] = [done[i] for i in ids if i in done]
        result["total_seconds"] = sum(
            x.get("train_seconds", 0) + x["eval_seconds"] for x in result["rows"]
        )
        state_path.write_text(json.dumps(result, indent=2))
        table = questions_markdown(result)
        if not args.no_doc:
            write_doc(Path(args.results), table, begin, end, "Research questions")
        return None

    def measure(row_id: str, fn: Any, extra: dict[str, Any]) -> None:
        print(f"[{row_id}] evaluating ...", flush=True)
        res = evaluate(fn, data, args.probe_epochs, args.probe_lr, 0, args.eval_device)
        row = {"id": row_id, **extra, **res, "load_avg": os.getloadavg()[0]}
        result["rows"].append(row)
        print(
            f"[{row_id}] kNN {res['knn_top1']:.2f}  linear {res['linear_top1']:.2f}  "
            f"eval {res['eval_seconds']:.0f} s",
            flush=True,
        )
        save()

    for row_id in ids:
        if row_id in old and (wanted is None or row_id not in wanted):
            result["rows"].append({**old[row_id], "reused": True})
            continue
        if wanted is not None and row_id not in wanted:
            continue
        if row_id == "pixels":
            measure(
                row_id,
                lambda x: x.flatten(1),
                {
                    "kind": "baseline",
                    "question": "baseline",
                    "setting": "raw pixels (normalised, flattened, 784-d)",
                    "command": f"python benchmarks/quality.py --suite questions --only pixels --epochs {epochs}",
                },
            )
            continue
        if row_id == "random-init":
            torch.manual_seed(0)  # the initialisation train(seed=0) starts from
            init = (
                ReSSL(
                    RECIPE["backbone"],
                    in_channels=data.channels,
                    image_size=data.image_size,
                    hidden_dim=512,
                    embed_dim=128,
                    queue_size=RECIPE["queue_size"],
                    width=RECIPE["width"],
                    generator=torch.Generator().manual_seed(1),
                )
                .student.eval()
                .to(args.eval_device)
            )
            measure(
                row_id,
                init.features,
                {
                    "kind": "baseline",
                    "question": "baseline",
                    "setting": f"random-init small CNN (width {RECIPE['width']}, 256-d)",
                    "command": f"python benchmarks/quality.py --suite questions --only random-init --epochs {epochs}",
                },
            )
            continue
        _, question, setting, overrides = next(q for q in QUESTIONS if q[0] == row_id)
        seed = int(overrides.get("seed", 0))
        recipe = {**RECIPE, **{k: v for k, v in overrides.items() if k != "seed"}}
        run = out / row_id
        if run.exists():
            shutil.rmtree(run)
        print(f"[{row_id}] training {epochs} epochs: {setting}", flush=True)
        t0 = time.perf_counter()
        ckpt = train(**recipe, epochs=epochs, seed=seed, out=str(run), knn_every=args.knn_every)
        train_seconds = time.perf_counter() - t0
        metrics = [
            json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line
        ]
        ips = [m["images_per_second"] for m in metrics]
        with torch.no_grad():
            student, _ = load_encoder(ckpt, weights="student")
        measure(
            row_id,
            student.eval().to(args.eval_device).features,
            {
                "kind": "ressl",
                "question": question,
                "setting": setting,
                "train_seconds": train_seconds,
                "images_per_second": sum(ips) / len(ips),
                "monitor": [
                    {k: m[k] for k in ("epoch", "knn_top1") if k in m}
                    for m in metrics
                    if "knn_top1" in m
                ],
                "command": cli_command(recipe, epochs, str(run), seed)
                + "; "
                + _eval_commands(str(run), args.eval_device),
            },
        )
    save()
    print(questions_markdown(result))
    if not args.no_doc:
        print(f"wrote {args.results}")
    return result


def _amp_name() -> str:
    from ressl.device import autocast_dtype

    dtype = autocast_dtype("auto", torch.device("cpu"))
    return "bf16" if dtype == torch.bfloat16 else "fp32"


if __name__ == "__main__":
    main()
