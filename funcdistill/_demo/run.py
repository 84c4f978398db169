"""``python -m funcdistill demo``: distil a digits classifier and show what KD buys.

A teacher MLP learns scikit-learn's bundled 8x8 handwritten digits (nothing is
downloaded). A student about ten times smaller then gets only a few labelled
images per class and is trained twice from the same initial weights on the
same batches: alone (cross-entropy on the labels) and with knowledge
distillation (plus :func:`funcdistill.losses.kd_loss` towards the teacher's
softened logits). The test accuracies are printed as a table and the learning
curves drawn to a PNG. With ``sweep=True`` one student per temperature, and
the student alone, are trained together in one :func:`torch.func.vmap`-ed step.

scikit-learn, matplotlib and tqdm are imported only here (``pip install
"funcdistill[demo]"``), never by ``import funcdistill``.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from funcdistill._demo.config import DemoConfig

__all__ = ["DemoResult", "Row", "run_demo"]

NEEDS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm", "safetensors": "safetensors"}
ALONE = "student alone"


class Row(NamedTuple):
    """One line of the result table."""

    name: str
    params: int
    accuracy: float


class DemoResult(NamedTuple):
    """What :func:`run_demo` printed and drew.

    Attributes:
        rows: the table: the teacher first, then the student alone, then the
            distilled student(s).
        curves: test accuracy after every epoch, by row name.
        table: the table as printed.
        plot: the PNG written, or ``None``.
        seconds: wall-clock time of the run.
    """

    rows: tuple[Row, ...]
    curves: dict[str, list[float]]
    table: str
    plot: Path | None
    seconds: float


def run_demo(config: DemoConfig | None = None, *, stream: TextIO | None = None) -> DemoResult:
    """Run the demo and print its table to ``stream`` (default: standard output).

    Progress bars go to standard error unless ``config.quiet``.

    Args:
        config: the settings; ``None`` for the defaults.
        stream: where to print the narration and the table.

    Raises:
        TypeError: ``config`` is not a :class:`DemoConfig`.
        ModuleNotFoundError: scikit-learn, matplotlib (when plotting) or tqdm
            (when not quiet) is missing; the message says what to install.

    Example:
        >>> from funcdistill._demo import run_demo
        >>> from funcdistill._demo import DemoConfig
        >>> import io
        >>> tiny = DemoConfig(epochs=1, teacher_epochs=1, plot=None, quiet=True)
        >>> result = run_demo(tiny, stream=io.StringIO())
        >>> [row.name for row in result.rows]
        ['teacher', 'student alone', 'student + KD (T=4)']
    """
    config = DemoConfig() if config is None else config
    if not isinstance(config, DemoConfig):
        raise TypeError(f"run_demo takes a DemoConfig, got {type(config).__name__}.")
    _check_installed(config)
    import torch

    # The models are tiny, so synchronising threads costs more than it saves:
    # one intra-op thread is several times faster here (and bit-reproducible).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, sys.stdout if stream is None else stream)
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, out: TextIO) -> DemoResult:
    from funcdistill._demo import train

    started = time.perf_counter()
    say = (lambda text: None) if config.quiet else (lambda text: print(text, file=out, flush=True))

    data = train.load_digits_split(seed=config.seed, labels_per_class=config.labels_per_class)
    teacher = train.mlp(train.TEACHER_HIDDEN, seed=config.seed)
    student = train.mlp(train.STUDENT_HIDDEN, seed=config.seed + 1)
    n_teacher, n_student = train.parameter_count(teacher), train.parameter_count(student)
    say(
        f"digits 8x8: {len(data.train_y)} training / {len(data.test_y)} test images; the teacher "
        f"trains on all training images, the students see {len(data.labelled_y)} labelled ones "
        f"({config.labels_per_class} per class).\n"
        f"teacher MLP {_arch(train.TEACHER_HIDDEN)}: {n_teacher:,} parameters; student MLP "
        f"{_arch(train.STUDENT_HIDDEN)}: {n_student:,} ({n_teacher / n_student:.1f}x fewer)."
    )

    curves: dict[str, list[float]] = {}
    teacher_curve = curves.setdefault("teacher", [])
    with _Bar(config.teacher_epochs, "teacher", config.quiet) as bar:
        teacher_params = train.train_teacher(
            teacher,
            data,
            epochs=config.teacher_epochs,
            batch_size=config.batch_size,
            seed=config.seed,
            on_epoch=bar.recorder([teacher_curve], ["acc"]),
        )

    if config.sweep:
        temperatures = [1.0, *config.temperatures]  # the student alone: its temperature is unused
        kd_weights = [0.0] + [config.alpha] * len(config.temperatures)
        names = [ALONE] + [f"student + KD (T={_num(t)})" for t in config.temperatures]
        labels = ["alone"] + [f"T={_num(t)}" for t in config.temperatures]
        desc = f"students, {len(names)} in one vmapped step"
    else:
        temperatures = [config.temperature, config.temperature]
        kd_weights = [0.0, config.alpha]
        names = [ALONE, f"student + KD (T={_num(config.temperature)})"]
        labels = ["alone", "KD"]
        desc = "students (alone, KD)"
    student_curves = [curves.setdefault(name, []) for name in names]
    with contextlib.ExitStack() as cleanup:
        cache = None
        if config.cached:
            folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="funcdistill-demo-cache-"))
            cache = _build_cache(train, teacher, student, teacher_params, data, folder, config, say)
        with _Bar(config.epochs, desc, config.quiet) as bar:
            train.train_students(
                teacher,
                student,
                teacher_params,
                data,
                temperatures=temperatures,
                kd_weights=kd_weights,
                epochs=config.epochs,
                batch_size=config.batch_size,
                lr=config.lr,
                seed=config.seed,
                vectorize=config.sweep,
                on_epoch=bar.recorder(student_curves, labels),
                cache=cache,
            )

    rows = (Row("teacher", n_teacher, teacher_curve[-1]),) + tuple(
        Row(name, n_student, curve[-1]) for name, curve in zip(names, student_curves)
    )
    table = format_table(rows)
    print(table, file=out, flush=True)
    say(_verdict(rows))

    plot = None
    if config.plot is not None:
        plot = write_plot(Path(config.plot), curves, title=_plot_title(config, len(data.labelled_y)))
        say(f"learning curves: {plot.resolve()}")
    seconds = time.perf_counter() - started
    say(f"done in {seconds:.1f} s.")
    return DemoResult(rows, curves, table, plot, seconds)


def _build_cache(
    train: Any, teacher: Any, student: Any, teacher_params: Any, data: Any, folder: str, config: DemoConfig, say: Any
) -> Any:
    """The teacher cache of the labelled images, with a line of narration."""
    started = time.perf_counter()
    cache = train.build_cache(teacher, student, teacher_params, data, folder, batch_size=config.batch_size)
    say(
        f"teacher cache: logits of the {len(cache)} labelled images, {cache.bytes_per_sample:.0f} bytes per "
        f"image, built in {time.perf_counter() - started:.2f} s; the students train from it and the teacher "
        "no longer runs."
    )
    return cache


def format_table(rows: tuple[Row, ...]) -> str:
    """The result table as aligned text.

    Example:
        >>> print(format_table((Row("teacher", 85002, 0.97), Row("student alone", 8410, 0.8))))
        model          parameters  test accuracy
        teacher            85,002         0.9700
        student alone       8,410         0.8000
    """
    head = ("model", "parameters", "test accuracy")
    body = [(r.name, f"{r.params:,}", f"{r.accuracy:.4f}") for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(3)]

    def line(cells: tuple[str, str, str]) -> str:
        return f"{cells[0]:<{widths[0]}}  {cells[1]:>{widths[1]}}  {cells[2]:>{widths[2]}}"

    return "\n".join(line(cells) for cells in [head, *body])


def write_plot(path: Path, curves: dict[str, list[float]], *, title: str) -> Path:
    """Draw the test-accuracy curves to a PNG at ``path`` (no pyplot, no global backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    teacher = curves["teacher"]
    ax.axhline(teacher[-1], color="black", linestyle="--", linewidth=1, label=f"teacher ({teacher[-1]:.3f})")
    for name, curve in curves.items():
        if name != "teacher":
            ax.plot(range(1, len(curve) + 1), curve, label=f"{name} ({curve[-1]:.3f})")
    ax.set_xlabel("student epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, format="png", dpi=110)
    return path


class _Bar:
    """A tqdm progress bar over epochs (or nothing, when quiet)."""

    def __init__(self, total: int, desc: str, quiet: bool):
        self._bar: Any = None
        if not quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="epoch", leave=True, dynamic_ncols=True)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def recorder(self, curves: list[list[float]], labels: list[str]):
        """An ``on_epoch`` callback that appends to ``curves`` and advances the bar."""

        def on_epoch(epoch: int, accuracies: list[float]) -> None:
            for curve, acc in zip(curves, accuracies):
                curve.append(acc)
            if self._bar is not None:
                postfix = " ".join(f"{k} {a:.3f}" for k, a in zip(labels, accuracies))
                self._bar.set_postfix_str(postfix, refresh=False)
                self._bar.update(1)

        return on_epoch


def _check_installed(config: DemoConfig) -> None:
    """Fail before training, with the fix, when an optional dependency is missing."""
    needed = ["sklearn"]
    if config.plot is not None:
        needed.append("matplotlib")
    if not config.quiet:
        needed.append("tqdm")
    if config.cached:
        needed.append("safetensors")
    missing = []
    for module in needed:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(NEEDS[module])
    if missing:
        raise ModuleNotFoundError(
            f"the demo needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            'not installed: pip install -e ".[demo]" in a checkout of funcdistill, or '
            'pip install "funcdistill[demo]".'
        )


def _verdict(rows: tuple[Row, ...]) -> str:
    alone = next(r.accuracy for r in rows if r.name == ALONE)
    parts = [f"{r.name}: {100 * (r.accuracy - alone):+.1f} points" for r in rows[2:]]
    return "distillation vs the student alone: " + "; ".join(parts) + "."


def _plot_title(config: DemoConfig, labelled: int) -> str:
    mode = "vmapped temperature sweep" if config.sweep else f"T={_num(config.temperature)}"
    return f"digits: students with {labelled} labels, alpha={_num(config.alpha)}, {mode}, seed {config.seed}"


def _arch(hidden: tuple[int, ...]) -> str:
    return "-".join(str(n) for n in (64, *hidden, 10))


def _num(x: float) -> str:
    return f"{x:g}"
