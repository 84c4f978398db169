"""Command line: ``python -m funcdistill demo [options]``.

The demo's training code (:mod:`funcdistill._demo.train`) and what it needs
(scikit-learn, matplotlib, tqdm) are imported only when the demo runs, not for
``--help``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from funcdistill import __version__
from funcdistill._demo import DemoConfig, run_demo

__all__ = ["build_parser", "main"]

_D = DemoConfig()

DEMO_HELP = (
    "Distil a teacher MLP into a student about ten times smaller on scikit-learn's bundled "
    "8x8 handwritten digits (nothing is downloaded). The student gets only a few labelled "
    "images per class and is trained twice from the same initial weights on the same "
    "batches, alone and with knowledge distillation; prints a table of teacher / student "
    "alone / student with KD test accuracy and writes a PNG of the learning curves. "
    'Needs the demo extra: pip install -e ".[demo]".'
)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m funcdistill`` argument parser.

    Example:
        >>> args = build_parser().parse_args(["demo", "--epochs", "3", "--no-plot"])
        >>> args.epochs, args.plot
        (3, None)
    """
    parser = argparse.ArgumentParser(
        prog="python -m funcdistill",
        description="funcdistill: knowledge distillation for PyTorch as pure functions.",
    )
    parser.add_argument("--version", action="version", version=f"funcdistill {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="distil a digits classifier and compare the student with and without KD",
        description=DEMO_HELP,
    )
    demo.set_defaults(parser=demo)
    add = demo.add_argument
    add(
        "--seed",
        type=int,
        default=_D.seed,
        metavar="N",
        help=f"fixes the split, the labelled subset, the initial weights and the batch order (default {_D.seed})",
    )
    add(
        "--epochs",
        type=int,
        default=_D.epochs,
        metavar="N",
        help=f"passes of the students over their labelled images (default {_D.epochs})",
    )
    add(
        "--teacher-epochs",
        type=int,
        default=_D.teacher_epochs,
        metavar="N",
        help=f"passes of the teacher over all training images (default {_D.teacher_epochs})",
    )
    add(
        "--labels-per-class",
        type=int,
        default=_D.labels_per_class,
        metavar="N",
        help=f"labelled training images per digit that the students get (default {_D.labels_per_class})",
    )
    add(
        "--temperature",
        type=float,
        default=_D.temperature,
        metavar="T",
        help=f"KD softening temperature; ignored with --sweep (default {_D.temperature:g})",
    )
    add(
        "--alpha",
        type=float,
        default=_D.alpha,
        metavar="A",
        help=f"weight of the KD loss in [0, 1]; the labels' cross-entropy gets 1 - A (default {_D.alpha:g})",
    )
    add("--lr", type=float, default=_D.lr, metavar="LR", help=f"Adam learning rate of the students (default {_D.lr:g})")
    add(
        "--batch-size",
        type=int,
        default=_D.batch_size,
        metavar="N",
        help=f"examples per training step (default {_D.batch_size})",
    )
    add(
        "--sweep",
        action="store_true",
        help="train one student per --temperatures value, and the student alone, together in one "
        "torch.func.vmap-ed step (the teacher runs once per step)",
    )
    add(
        "--temperatures",
        type=_float_list,
        default=_D.temperatures,
        metavar="T1,T2,...",
        help="the temperatures of --sweep, comma-separated (default "
        + ",".join(f"{t:g}" for t in _D.temperatures)
        + ")",
    )
    add(
        "--cached",
        action="store_true",
        help="build a funcdistill.TeacherCache of the teacher's logits on the labelled images once (needs "
        "safetensors), and train the students from it, without running the teacher",
    )
    plot = demo.add_mutually_exclusive_group()
    plot.add_argument(
        "--plot",
        default=str(_D.plot),
        metavar="PATH",
        help=f"write the learning curves to this PNG file (default {_D.plot} in the current folder)",
    )
    plot.add_argument(
        "--no-plot",
        dest="plot",
        action="store_const",
        const=None,
        help="do not write the plot (matplotlib is then not needed)",
    )
    add("--quiet", action="store_true", help="no progress bars and no narration; print only the table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Example:
        >>> main(["--version"])
        Traceback (most recent call last):
        ...
        SystemExit: 0
    """
    args = vars(build_parser().parse_args(argv))
    del args["command"]
    demo_parser: argparse.ArgumentParser = args.pop("parser")
    try:
        config = DemoConfig(**args)
    except (TypeError, ValueError) as error:
        demo_parser.error(_option_names(str(error)))  # exits with status 2
    try:
        run_demo(config)
    except ModuleNotFoundError as error:
        print(f"{demo_parser.prog}: {error}", file=sys.stderr)
        return 1
    return 0


def _option_names(message: str) -> str:
    """Say ``--labels-per-class`` rather than ``labels_per_class`` in a setting's error."""
    for name in DemoConfig.field_names():
        if message.startswith((name + " ", name + ":")):
            return "--" + name.replace("_", "-") + message[len(name) :]
    return message


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,2,4,8, got {text!r}") from None
    return values


if __name__ == "__main__":
    sys.exit(main())
