"""Run the funcdistill benchmark suite and write its tables.

Usage (from the repository root)::

    python -m benchmarks.run            # full run, a few minutes on 2 cores
    python -m benchmarks.run --quick    # short run, to check the harness
    python -m benchmarks.run --render benchmarks/results/cpu.json --docs docs/benchmarks.md
    python -m benchmarks.run --only llm --out /tmp/rerun   # then merge it into the page:
    python -m benchmarks.run --merge benchmarks/results/cpu.json /tmp/rerun/cpu.json --docs docs/benchmarks.md

It writes ``<out>/<device>.md`` and ``<out>/<device>.json`` (``--out``,
default ``benchmarks/results``) and, after a full run into the default
folder, ``docs/benchmarks.md``. ``--merge`` puts the sections of later runs
(on the same machine) in place of the same tables of the first file, and
rewrites that file. Timings are ratios against a hand-written
step measured in the same process, never absolute claims; run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # allow `python benchmarks/run.py`
    sys.path.insert(0, str(ROOT))

from benchmarks import cache, calls, cross, distributed, llm, ragged, report, served, suite, timing  # noqa: E402

SECTIONS = {
    "timing": suite.timing_section,
    "overhead": calls.overhead_section,
    "state": calls.state_section,
    "truncation": suite.truncation_section,
    "flops": suite.flops_section,
    "bytes": suite.saved_bytes_section,
    "vmap": suite.vmap_section,
    "compile": suite.compile_section,
    "precision": suite.precision_section,
    "cache": cache.cache_section,
    "ragged": ragged.ragged_section,
    "distributed": distributed.distributed_section,
    "tensor_parallel": distributed.tensor_parallel_section,
    "distributed_student": distributed.resharded_student_section,
    "llm": llm.llm_section,
    "cross_align": cross.align_section,
    "cross_uld": cross.uld_section,
    "served": served.served_section,
}

READING = ROOT / "benchmarks" / "reading.md"
"""Hand-written notes on the figures, appended to the docs page after the generated tables."""

DOCS_INTRO = """# Benchmarks

How much a funcdistill step costs next to the same step written by hand, and
what truncation, `vmap`, `torch.compile` and a bfloat16 teacher change. Every
step time below is a **ratio** to a hand-written step measured in the same process,
in at least five interleaved rounds (the median of the per-round ratios, with
the interquartile range in brackets), so the figures describe this machine and
this torch build, not absolute speeds. A goal is `met` only when the whole
interquartile range meets it; a range that straddles the goal reads "within
noise of the goal". Under each table, the CPU it ran on (with the instruction
sets that matter most here), when it started, and the machine's load while it ran (the
1-minute load average and the other running processes, before and after). The per-call overhead of a distill
function and the cost of `funcdistill.state` are in microseconds: the overhead
is a difference against the plain forwards timed in the same rounds, on models
with many state tensors and negligible arithmetic. FLOPs and bytes are exact counts;
`tests/test_costs.py` checks the ones that must hold everywhere (the teacher
saves nothing for backward, truncation runs only the teacher's prefix, a
compiled step has no graph break).

Reproduce (the suite is in `benchmarks/`, the models in `benchmarks/models.py`:
a ResNet-18-like CIFAR CNN teacher with 11.2M parameters and a student at a
quarter of its width, and a small MLP pair):

```bash
python -m benchmarks.run          # writes benchmarks/results/cpu.{md,json} and this page
python -m benchmarks.run --quick  # a short run to check the harness
python -m benchmarks.run --only vmap --out /tmp/rerun   # rerun some tables, then put them on this page:
python -m benchmarks.run --merge benchmarks/results/cpu.json /tmp/rerun/cpu.json --docs docs/benchmarks.md
pip install --no-deps torchdistill  # optional: adds torchdistill's ForwardHookManager row
```

(torchdistill's package imports torchvision, which this CPU build of torch
cannot load; the suite loads its `forward_hook.py` alone, so `--no-deps` is
enough.)

"""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="few rounds, CNN batch 8 only (both CNN pairs), no torch.compile"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for <device>.md/.json"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="also write the docs page here (default: docs/benchmarks.md after a full run into the default --out)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the models, data and running order")
    offline = parser.add_mutually_exclusive_group()
    offline.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: rewrite the Markdown (and --docs page) from a results JSON",
    )
    offline.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="measure nothing: replace the first results JSON's tables by the same-titled tables of the later "
        "ones (same machine; tables it lacks are added), rewrite it and its Markdown (and the --docs page)",
    )
    args = parser.parse_args(argv)
    if args.merge is not None and len(args.merge) < 2:
        parser.error("--merge: give the results JSON to update, then one or more runs to merge into it")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return args


def _read_results(path: Path, option: str) -> dict | None:
    """The results JSON at ``path``, or ``None`` after saying on stderr why it cannot be read as results."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not {"machine", "sections"} <= data.keys():
            raise ValueError("it has no 'machine' and 'sections'")
    except (OSError, ValueError) as error:  # ValueError: JSON's errors too
        print(
            f"[benchmarks] {option}: cannot read {path} as benchmark results ({error}); give JSON files "
            "written by python -m benchmarks.run",
            file=sys.stderr,
        )
        return None
    return data


def _render(args: argparse.Namespace) -> int:
    data = _read_results(args.render, "--render")
    if data is None:
        return 2
    sections = [report.Section(**sec) for sec in data["sections"]]
    stem = args.render.stem
    md = args.render.with_suffix(".md")
    report.replace_text(md, report.to_markdown(sections, data["machine"], heading=f"Results: {stem}", level=1) + "\n")
    print(f"[benchmarks] wrote {md}")
    if args.docs is not None:
        _write_docs(args.docs, sections, data["machine"], stem)
    return 0


def _merge(args: argparse.Namespace) -> int:
    base = args.merge[0]
    runs = []
    for path in args.merge:
        data = _read_results(path, "--merge")
        if data is None:
            return 2
        runs.append((str(path), data))
    try:
        data = report.merge(runs)
    except ValueError as error:
        print(f"[benchmarks] {error}", file=sys.stderr)
        return 2
    sections = [report.Section(**sec) for sec in data["sections"]]
    json_path, md_path = report.write(sections, data["machine"], data["config"], base.parent, base.stem)
    print(f"[benchmarks] wrote {json_path} and {md_path}")
    if args.docs is not None:
        _write_docs(args.docs, sections, data["machine"], base.stem)
    return 0


def _write_docs(path: Path, sections: list, info: dict, stem: str) -> None:
    body = report.to_markdown(sections, info, heading=f"Results ({stem})", level=2)
    reading = READING.read_text() if READING.exists() else ""  # hand-written: what the figures say
    path.parent.mkdir(parents=True, exist_ok=True)
    report.replace_text(path, DOCS_INTRO + body + "\n" + ("\n" + reading if reading else ""))
    print(f"[benchmarks] wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.render is not None:
        return _render(args)
    if args.merge is not None:
        return _merge(args)
    cfg = suite.Config(quick=args.quick, device=args.device, seed=args.seed)
    info = report.machine(args.device)
    names = args.only or list(SECTIONS)
    stem = args.device.split(":")[0] + ("-quick" if args.quick else "")
    config = {**cfg.as_dict(), "sections": names}
    cpu = f"{info['cpu']} ({info['cpu_flags']})" if info.get("cpu_flags") else info["cpu"]
    sections = []
    start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        print(f"[benchmarks] {name} ...", flush=True)
        started = report.utc_now()
        before = timing.machine_load()
        sec = SECTIONS[name](cfg)
        sec.load = {"cpu": cpu, "started": started, "before": before, "after": timing.machine_load()}
        sections.append(sec)
        if hasattr(os, "getloadavg"):
            info.setdefault("load_during", []).append(round(os.getloadavg()[0], 2))
        # what is finished is kept if a later section crashes or the run is stopped
        report.write(sections, info, config, args.out, f"{stem}.partial")
        print(f"[benchmarks] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    if hasattr(os, "getloadavg"):
        info["load_at_end"] = round(os.getloadavg()[0], 2)
    info["wall_s"] = round(time.perf_counter() - start)
    json_path, md_path = report.write(sections, info, config, args.out, stem)
    for suffix in (".json", ".md"):  # the run finished: its results replace the partial ones
        (args.out / f"{stem}.partial{suffix}").unlink(missing_ok=True)
    print(f"[benchmarks] wrote {json_path} and {md_path}")
    docs = args.docs
    if docs is None and not args.quick and args.only is None and args.out == ROOT / "benchmarks" / "results":
        docs = ROOT / "docs" / "benchmarks.md"
    if docs is not None:
        _write_docs(docs, sections, info, stem)
    print(report.to_markdown(sections, info, heading="Results", level=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
