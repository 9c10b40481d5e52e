"""What the trainer notes about a configuration before it runs: legal but probably
unintended combinations (:func:`combination_notes`), the defaults fitted to a small
training set (:func:`fit_data`), and the settings checked against the images and the
process count (:func:`check_data`).

This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ressl.config.settings import TrainConfig
from ressl.errors import ConfigError
from ressl.rules import Note

__all__ = ["FIT_UNUSED", "FIT_WARMUP", "check_data", "combination_notes", "fit_data"]

#: A default batch leaving more than this share of the training images out of every epoch
#: (the dropped last batch) is fitted to the data (:func:`fit_data`): 480 images at
#: 256 would use 53% of them. Fashion-MNIST's 60,000 at 256 leave out 0.2%.
FIT_UNUSED = 0.1
#: The default warm-up is cut to at most this share of the run (the recipes' own: 1 of 50
#: epochs, 5 of 200), so a short run's learning rate still decays.
FIT_WARMUP = 0.1


def combination_notes(config: TrainConfig) -> list[Note]:
    """Legal but probably unintended combinations in ``config``, one sentence each (logged)."""
    out = []
    if config.warmup_epochs >= config.epochs:
        out.append(
            Note(
                f"{{warmup_epochs}} {config.warmup_epochs} >= {{epochs}} {config.epochs}: the whole run "
                "is warm-up, so the learning rate never decays",
                "warmup_epochs",
                "epochs",
            )
        )
    if config.decay_exempt == "names" and "resnet" not in config.backbone:
        out.append(
            Note(
                f"{{decay_exempt}} names is the official ResNet code's rule; {config.backbone} may "
                "name its BatchNorms otherwise (e.g. features.N.1), and those are then decayed: "
                "{decay_exempt} 1d exempts every 1-D parameter",
                "decay_exempt",
            )
        )
    if config.decode == "device" and config.device == "cpu":
        out.append(
            Note(
                "{decode} device on {device} cpu decodes every JPEG in the training process, "
                "one core: {decode} workers spreads it over the DataLoader workers (faster "
                "with 2 or more)",
                "decode",
                "device",
            )
        )
    return out


def fit_data(
    config: TrainConfig, train_images: int, given: Collection[str], world_size: int = 1
) -> tuple[TrainConfig, list[Note]]:
    """``config`` with the defaults that cannot fit a small run made to follow it.

    Only settings not in ``given`` (those the user set keep their value, and
    :func:`check_data` and :func:`combination_notes` say what is wrong with them) change:

    - ``batch_size``: when the last, dropped, partial batch would leave more than
      ``FIT_UNUSED`` of the training images out of every epoch, the epoch is cut into
      as many steps as the default batch makes, of equal size (480 images, batch 256:
      2 steps of 240 rather than 1 of 256).
    - ``queue_size``: at most what one epoch's batches fill (a multiple of the images
      enqueued per step, not above the training set), so the queue holds no stale
      copies of the same images.
    - ``warmup_epochs``: at most ``FIT_WARMUP`` of the run.

    The fitted values are the run's settings (its checkpoint records them); a resumed
    run keeps its checkpoint's.

    Returns:
        ``(config, notes)``: the notes say which default changed, to what and why.
    """
    changes: dict[str, Any] = {}
    notes = []
    batch = config.batch_size
    if "batch_size" not in given and train_images >= 2 * world_size:
        unused = train_images % batch if batch <= train_images else train_images
        if unused > FIT_UNUSED * train_images:
            steps = -(-train_images // batch)  # ceil: the steps the default batch makes
            batch = max(train_images // steps // world_size * world_size, 2)
            kept = train_images // batch * batch
            changes["batch_size"] = batch
            notes.append(
                Note(
                    f"{{batch_size}} {batch} (default {config.batch_size}): an epoch of "
                    f"{train_images} images uses {kept} of them, not "
                    f"{train_images - unused}",
                    "batch_size",
                )
            )
    per_step = batch * (2 if config.symmetric else 1)  # teacher embeddings enqueued per step
    if "queue_size" not in given and config.queue_size > train_images:
        queue = max(train_images // per_step, 1) * per_step
        changes["queue_size"] = queue
        notes.append(
            Note(
                f"{{queue_size}} {queue} (default {config.queue_size}): one epoch fills it; a "
                f"longer queue than the {train_images} training images holds stale copies of "
                "them",
                "queue_size",
            )
        )
    most = int(FIT_WARMUP * config.epochs)
    if "warmup_epochs" not in given and config.warmup_epochs > most:
        changes["warmup_epochs"] = most
        notes.append(
            Note(
                f"{{warmup_epochs}} {most} (default {config.warmup_epochs}): at most "
                f"{FIT_WARMUP:.0%} of {config.epochs} epochs, so the learning rate decays",
                "warmup_epochs",
            )
        )
    return (config.replace(**changes) if changes else config), notes


def check_data(config: TrainConfig, train_images: int, world_size: int = 1) -> list[Note]:
    """Check ``config``'s settings against the data and the process count.

    Returns:
        Notes to log (a queue longer than the training set).

    Raises:
        ConfigError: a batch larger than the training set, or one the processes
            cannot share evenly.
    """
    if config.batch_size % world_size:
        raise ConfigError(
            "{batch_size} is the global batch and must be divisible by the "
            f"{world_size} processes, got {config.batch_size}; use a multiple of {world_size}",
            "batch_size",
        )
    if config.batch_size > train_images:
        raise ConfigError(
            f"{{batch_size}} {config.batch_size} is larger than the training set "
            f"({train_images} images); use a batch size <= {train_images}",
            "batch_size",
        )
    if config.queue_size > train_images:
        return [
            Note(
                f"{{queue_size}} {config.queue_size} is larger than the training set ({train_images} "
                "images): the queue holds several embeddings of each image, older ones stale",
                "queue_size",
            )
        ]
    return []
