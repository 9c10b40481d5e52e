"""``ressl train``: one option per :class:`ressl.config.settings.TrainConfig` field, generated from it.

Each field's flag (``batch_size`` -> ``--batch-size``), type, default, help text and
``--help`` section come from the config, so an option can never drift from the
setting it sets. Only the options the user typed are passed on; everything else
takes the config's own default (or, on ``--resume``, the checkpoint's value).
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

from ressl.config.settings import TrainConfig, settings
from ressl.data.registry import DATASETS, find
from ressl.errors import flag
from ressl.rules import Setting

from .common import Interrupted, checkpoint_file, explicit_options, fail, launch_rank

__all__ = ["cli_default", "train_cmd"]


def show(value: Any) -> str:
    """A setting's value as it is typed on the command line: ``0.2,1.0``, ``0.04``, ``weak``."""
    if isinstance(value, tuple):
        return ",".join(":".join(map(show, v)) if isinstance(v, tuple) else show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def recipe_default(name: str) -> str:
    """What a recipe field defaults to, per dataset: ``per dataset: 0.15 fashion-mnist; ...``."""
    by_value: dict[str, list[str]] = {}
    for entry in DATASETS.values():
        by_value.setdefault(show(entry.recipe[name]), []).append(entry.name)
    if len(by_value) == 1:
        return f"per dataset: {next(iter(by_value))}"
    return "per dataset: " + "; ".join(f"{v} {', '.join(names)}" for v, names in by_value.items())


def cli_default(default: Any) -> Any:
    """The config default as the option's default (tuples as their command-line text)."""
    return show(default) if isinstance(default, tuple) else default


def _option(name: str, default: Any, meta: Setting, kind: Any) -> inspect.Parameter:
    base = kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None -> X
        base = next(a for a in typing.get_args(kind) if a is not type(None))
    if meta.parse is not None or typing.get_origin(base) in (tuple, typing.Literal):
        base = str  # checked (and parsed: "0.2,1.0" -> (0.2, 1.0)) by the config
    decls = [f"{flag(name)}/--no-{flag(name)[2:]}" if base is bool else flag(name)]
    if meta.short:
        decls.append(meta.short)
    help_text = meta.help
    if meta.recipe:
        help_text += f" (default {recipe_default(name)})"
    if meta.resumable:
        help_text += " (may change on --resume)"
    option = typer.Option(
        *decls,
        help=help_text,
        rich_help_panel=meta.panel,
        metavar=meta.metavar or (" | ".join(meta.rule.choices) or None),
        show_default=not meta.recipe and default is not None,
    )
    kind = base if default is not None else base | None
    annotation: Any = Annotated[kind, option]  # type: ignore[valid-type]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=cli_default(default), annotation=annotation
    )


def _parameters() -> list[inspect.Parameter]:
    kinds = typing.get_type_hints(TrainConfig)
    resume = Annotated[
        Path | None,
        typer.Option(help="Run folder or checkpoint to continue.", rich_help_panel="Run"),
    ]
    return [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(_option(name, default, meta, kinds[name]) for name, default, meta in settings()),
        inspect.Parameter(
            "resume", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=resume
        ),
    ]


def train_cmd(ctx: typer.Context, **options: Any) -> None:
    """Pre-train an encoder with ReSSL; writes RUN/last.safetensors and RUN/metrics.jsonl."""
    resume: Path | None = options.pop("resume")
    given = {name: options[name] for name in explicit_options(ctx) if name in options}
    if resume is not None:
        checkpoint_file(resume, flag="--resume")
    else:  # settings and the data's folder are checked before torch is imported (seconds)
        _check_folder(TrainConfig.from_keywords(**given).dataset)

    from ressl.training.loop import train
    from ressl.training.stopping import Stopped

    from .progress import TrainProgress

    try:
        if launch_rank() != 0:  # under torchrun, rank 0 alone draws progress and prints
            logging.getLogger("ressl").setLevel(logging.ERROR)
            train(resume=resume, **given)
            return
        with TrainProgress() as progress:
            path = train(resume=resume, callback=progress, **given)
    except Stopped as e:  # exit 128 + the signal, so a job script can requeue on 143
        saved = f"saved {e.checkpoint}" if e.checkpoint else "aborted without saving"
        message = f"interrupted by {e.signal_name}; {saved}"
        raise Interrupted(e.signum, message) from None
    typer.echo(str(path))


def _check_folder(dataset: str) -> None:
    """A ``folder:PATH`` dataset's folder exists (the rest is checked when it is read)."""
    _, path = find(dataset)
    if path is not None and not Path(path).expanduser().exists():
        fail(f"image folder {path} does not exist")


train_cmd.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- docs

README_BEGIN, README_END = "<!-- train-options:begin -->", "<!-- train-options:end -->"


def options_summary() -> str:
    """The README's list of ``ressl train`` options, one line per ``--help`` section."""
    panels: dict[str, list[str]] = {}
    for name, _, meta in settings():
        panels.setdefault(meta.panel, []).append(f"`{flag(name)}`")
    panels["Run"].append("`--resume`")
    resumable = ", ".join(f"`{flag(name)}`" for name, _, meta in settings() if meta.resumable)
    lines = [f"- {panel}: {', '.join(flags)}" for panel, flags in panels.items()]
    return "\n".join(
        [*lines, f"- May change on `--resume` (the rest comes from the checkpoint): {resumable}"]
    )


def options_table() -> str:
    """``docs/options.md``: every ``ressl train`` option with its default, range and help."""
    lines = [
        "# `ressl train` options",
        "",
        "Generated from `ressl.config.settings.TrainConfig` by `python -m ressl.cli.train_cmd`; a test",
        "keeps it current. Each option is also a keyword of `ressl.train()` and a field of",
        "`TrainConfig` (the name without dashes, `-` as `_`). *recipe*: the dataset's recipe",
        "fills it (`ressl.data.registry`); *resume*: `--resume` may change it.",
        "",
        "| option | default | valid | help |",
        "|---|---|---|---|",
    ]
    for name, default, meta in settings():
        if meta.recipe:
            shown = recipe_default(name).replace("per dataset: ", "recipe: ")
        else:
            shown = "none" if default is None else f"`{show(default)}`"
        tags = " *(resume)*" if meta.resumable else ""
        lines.append(f"| `{flag(name)}`{tags} | {shown} | {meta.rule.expect} | {meta.help} |")
    lines.append("| `--resume` | none | a run folder or checkpoint | Continue that run. |")
    return "\n".join([*lines, "", datasets_table()]) + "\n"


def datasets_table() -> str:
    """The datasets ``--dataset`` (and ``ressl eval --dataset``) accepts, from the registry."""
    lines = [
        "## Datasets",
        "",
        "`--dataset` takes a name or an alias, in any case, `_` for `-` (`fashion_mnist`,",
        "`CIFAR-10`); generated from `ressl.data.registry.DATASETS`.",
        "",
        "| dataset | also accepted | what | channels | default size |",
        "|---|---|---|---|---|",
    ]
    for d in DATASETS.values():
        aliases = ", ".join(f"`{a}`" for a in d.aliases) or "-"
        lines.append(f"| `{d.spec}` | {aliases} | {d.summary} | {d.channels} | {d.image_size} |")
    return "\n".join(lines)


def write_docs(root: Path) -> None:
    """Rewrite ``docs/options.md`` and the README's option list from the config."""
    (root / "docs" / "options.md").write_text(options_table())
    readme = root / "README.md"
    text = readme.read_text()
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{options_summary()}\n{README_END}{tail}")


if __name__ == "__main__":
    write_docs(Path.cwd())
