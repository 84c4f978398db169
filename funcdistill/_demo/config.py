"""The settings of ``python -m funcdistill demo``, their defaults and their checks.

Standard library only, so the command line can show the defaults in ``--help``
and reject bad values before anything heavy is imported.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

__all__ = ["DEFAULT_PLOT", "DemoConfig"]

DEFAULT_PLOT = "funcdistill-demo.png"

# the digits data set has at least 174 images per class; 70% of them are training images
MAX_LABELS_PER_CLASS = 120


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the digits distillation demo (:func:`funcdistill._demo.run_demo`).

    Attributes:
        seed: fixes everything random: the train/test split, the labelled
            subset, the initial weights and the batch order.
        epochs: passes of the students over their labelled examples.
        teacher_epochs: passes of the teacher over the whole training split.
        labels_per_class: labelled training images per digit the students get.
        temperature: KD softening temperature (single run).
        alpha: weight of the KD loss; the cross-entropy on labels gets ``1 - alpha``.
        lr: Adam learning rate of the students.
        batch_size: examples per step.
        sweep: train one student per temperature in ``temperatures`` (and the
            student alone) in a single :func:`torch.func.vmap`-ed step.
        temperatures: the temperatures of the sweep.
        cached: build a :class:`funcdistill.TeacherCache` of the teacher's
            logits on the labelled images once, and train the students from
            it: the teacher does not run during their training.
        plot: where to write the PNG of the learning curves; ``None`` for no plot.
        quiet: no progress bars and no narration; the table is still printed.

    Example:
        >>> DemoConfig(epochs=5).epochs
        5
        >>> DemoConfig(alpha=2.0)
        Traceback (most recent call last):
        ...
        ValueError: alpha must be between 0 and 1 (the weight of the KD loss), got 2.0.
    """

    seed: int = 0
    epochs: int = 100
    teacher_epochs: int = 20
    labels_per_class: int = 5
    temperature: float = 4.0
    alpha: float = 0.9
    lr: float = 0.01
    batch_size: int = 32
    sweep: bool = False
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    cached: bool = False
    plot: str | os.PathLike[str] | None = DEFAULT_PLOT
    quiet: bool = False

    def __post_init__(self) -> None:
        _integer("seed", self.seed, minimum=0)
        _integer("epochs", self.epochs, minimum=1)
        _integer("teacher_epochs", self.teacher_epochs, minimum=1)
        _integer("labels_per_class", self.labels_per_class, minimum=1, maximum=MAX_LABELS_PER_CLASS)
        _integer("batch_size", self.batch_size, minimum=1)
        _positive("temperature", self.temperature)
        _positive("lr", self.lr)
        _number("alpha", self.alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1 (the weight of the KD loss), got {self.alpha!r}.")
        for name in ("sweep", "cached", "quiet"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {type(getattr(self, name)).__name__}.")
        temps = self.temperatures
        if not isinstance(temps, (tuple, list)) or not temps:
            raise ValueError(f"temperatures must be a non-empty tuple of positive numbers, got {temps!r}.")
        for t in temps:
            _positive("temperatures", t)
        temps = tuple(float(t) for t in temps)
        if len(set(temps)) != len(temps):
            raise ValueError(f"temperatures must be distinct, got {', '.join(f'{t:g}' for t in temps)}.")
        object.__setattr__(self, "temperatures", temps)
        if self.plot is not None:
            object.__setattr__(self, "plot", _plot_path(self.plot))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the settings, in order.

        Example:
            >>> DemoConfig.field_names()[:2]
            ('seed', 'epochs')
        """
        return tuple(f.name for f in fields(cls))


def _number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")


def _positive(name: str, value: object) -> None:
    _number(name, value)
    if value <= 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be positive, got {value!r}.")


def _integer(name: str, value: object, *, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name} must be {bound}, got {value}.")


def _plot_path(plot: object) -> Path:
    if not isinstance(plot, (str, os.PathLike)):
        raise TypeError(f"plot must be a path (str or os.PathLike) or None, got {type(plot).__name__}.")
    path = Path(plot)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot must be a .png file, got {str(path)!r}; e.g. --plot curves.png.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(
            f"plot: the folder {str(parent)!r} of {str(path)!r} does not exist; create it or choose another path."
        )
    return path
