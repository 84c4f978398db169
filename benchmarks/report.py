"""Results as data (JSON) and as Markdown tables, with the machine they come from.

>>> sec = Section("Demo", ["style", "ratio"], intro="One row.")
>>> sec.add(style="floor", ratio=1.0)
>>> print(to_markdown([sec], {"cpu": "x"}, heading="Results").splitlines()[-1])
| floor | 1.00 |
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import funcdistill

__all__ = ["Section", "busy_note", "load_line", "machine", "merge", "replace_text", "to_markdown", "utc_now", "write"]


@dataclass
class Section:
    """One table: a title, its columns, rows as dicts, notes printed below it, and the machine's load.

    ``load``: :func:`benchmarks.timing.machine_load` before and after the
    section ran (``{"before": ..., "after": ...}``), and where and when it
    started (``"cpu"``, ``"started"``), filled in by the run: sections merged
    from several runs each say which machine measured them.
    """

    title: str
    columns: list[str]
    intro: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)

    def add(self, **row: Any) -> None:
        """Append a row (missing columns print empty)."""
        self.rows.append(row)


def _cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of ``/proc/cpuinfo`` (``None`` off Linux or where it is missing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


# the instruction sets that change these figures most: bfloat16 arithmetic runs natively only with the last three
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpu_flags() -> str:
    """Which of :data:`_CPU_FLAGS` the CPU reports (Linux), space-separated; ``""`` where unknown."""
    flags = _cpuinfo("flags")
    if flags is None:
        return ""
    have = set(flags.split())
    return " ".join(f for f in _CPU_FLAGS if f in have) or "none of " + " ".join(_CPU_FLAGS)


def utc_now() -> str:
    """The time now, to the minute, as the results write it (``2026-12-08 00:00 UTC``)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine(device: str = "cpu") -> dict[str, Any]:
    """Where and when the benchmark runs."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "funcdistill": funcdistill.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "device": device,
        "date": utc_now(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_at_start"] = round(os.getloadavg()[0], 2)
    return info


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def busy_note(info: dict[str, Any]) -> str:
    """A warning when other work loaded the machine during the run, else ``""``.

    The 1-minute load averages sampled during the run include the benchmark's
    own threads (``torch_threads``); more than half the cores beyond that
    counts as busy. The load at the start is only reported (it still decays
    from whatever ran just before).

    >>> busy_note({"cores": 2, "torch_threads": 2, "load_at_start": 1.5, "load_at_end": 2.5})
    ''
    >>> busy_note({"cores": 2, "torch_threads": 2, "load_at_start": 3.5, "load_during": [4.0], "load_at_end": 2.0})
    '**Other work loaded the machine during this run (load average 3.5 at the start, up to 4.0 during it, on 2 cores): the timing ratios are noisy.**'
    """
    start, end = info.get("load_at_start"), info.get("load_at_end")
    cores = info.get("cores") or 1
    own = info.get("torch_threads") or 1
    during = [x for x in (end, *info.get("load_during", ())) if x is not None]
    busy = any(x - own > cores / 2 for x in during)
    if not busy:
        return ""
    return (
        f"**Other work loaded the machine during this run (load average {start} at the start, "
        f"up to {max(during, default=end)} during it, on {cores} cores): the timing ratios are noisy.**"
    )


def load_line(load: dict[str, Any], cores: int | None) -> str:
    """The machine's load while a section ran, as one sentence (``""`` when not recorded).

    >>> load_line({"before": {"load_1min": 1.5, "busy_processes": 2}, "after": {"load_1min": 2.25, "busy_processes": 4}}, 2)
    'Machine load while this section ran: 1-minute load average 1.5 before, 2.25 after, on 2 cores; 2 other running processes before, 4 after.'
    >>> load_line({"started": "2026-12-08 00:10 UTC", "cpu": "Xeon", "before": {"load_1min": 0.5}, "after": {"load_1min": 0.9}}, 2)
    'Ran on Xeon from 2026-12-08 00:10 UTC. Machine load while this section ran: 1-minute load average 0.5 before, 0.9 after, on 2 cores.'
    """
    before, after = load.get("before") or {}, load.get("after") or {}
    if not before and not after:
        return ""
    ran = f"Ran on {load['cpu']} from {load['started']}. " if load.get("cpu") and load.get("started") else ""
    text = (
        f"{ran}Machine load while this section ran: 1-minute load average {before.get('load_1min')} before, "
        f"{after.get('load_1min')} after" + (f", on {cores} cores" if cores else "")
    )
    if before.get("busy_processes") is not None or after.get("busy_processes") is not None:
        text += f"; {before.get('busy_processes')} other running processes before, {after.get('busy_processes')} after"
    return text + "."


def to_markdown(sections: list[Section], info: dict[str, Any], *, heading: str, level: int = 2) -> str:
    """The tables as Markdown, under a heading and a line describing the machine."""
    h = "#" * level
    lines = [f"{h} {heading}", ""]
    lines.append("Machine: " + ", ".join(f"{k} `{v}`" for k, v in info.items()) + ".")
    busy = busy_note(info)
    if busy:
        lines += ["", busy]
    for sec in sections:
        lines += ["", f"{h}# {sec.title}", ""]
        if sec.intro:
            lines += [sec.intro, ""]
        lines.append("| " + " | ".join(sec.columns) + " |")
        lines.append("|" + "---|" * len(sec.columns))
        for row in sec.rows:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in sec.columns) + " |")
        for note in sec.notes:
            lines += ["", f"- {note}"] if note is sec.notes[0] else [f"- {note}"]
        load = load_line(sec.load, info.get("cores"))
        if load:
            lines += ["", load]
    return "\n".join(lines)


def write(
    sections: list[Section], info: dict[str, Any], config: dict[str, Any], out: Path, stem: str
) -> tuple[Path, Path]:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.md`` (each replaced whole, never half-written); return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"machine": info, "config": config, "sections": [asdict(s) for s in sections]}
    json_path = out / f"{stem}.json"
    replace_text(json_path, json.dumps(data, indent=2, default=str) + "\n")
    md_path = out / f"{stem}.md"
    replace_text(md_path, to_markdown(sections, info, heading=f"Results: {stem}", level=1) + "\n")
    return json_path, md_path


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# what makes two runs the same machine and build: a merged page describes one
_IDENTITY = ("cpu", "cpu_flags", "cores", "torch_threads", "torch", "funcdistill", "python", "os", "device", "gpu")


def merge(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One results file from several runs on the same machine: later runs' sections replace earlier ones.

    ``runs``: ``(name, data)`` pairs, oldest first, ``data`` as :func:`write`
    writes it. A section is known by its title: a later run's table takes the
    place of the earlier table of the same title, and tables no earlier run has
    are added at the end. Each table keeps the CPU, start time and load it was
    measured with, so the page still says when each ran; the machine line
    names the runs merged by date (``merged``), with the load samples and
    wall time of all of them.

    Raises:
        ValueError: fewer than two runs, or runs from different machines or
            builds (which field, in which run), as one page describes one machine.

    >>> a = {"machine": {"cpu": "x", "date": "d1"}, "config": {"sections": ["s"]}, "sections": [{"title": "T", "rows": [1]}]}
    >>> b = {"machine": {"cpu": "x", "date": "d2"}, "config": {"sections": ["s"]}, "sections": [{"title": "T", "rows": [2]}]}
    >>> merged = merge([("a", a), ("b", b)])
    >>> merged["sections"], merged["machine"]["merged"]
    ([{'title': 'T', 'rows': [2]}], 'the run of d1: 0 tables, the run of d2: 1 table')
    """
    if len(runs) < 2:
        raise ValueError(f"merging needs at least two results files, got {len(runs)}")
    problems = []
    for key in _IDENTITY:
        seen: dict[Any, str] = {}  # each value of this field, and the first run that has it
        for name, data in runs:
            if data["machine"].get(key) is not None:
                seen.setdefault(data["machine"][key], name)
        if len(seen) > 1:
            problems.append(f"{key} is " + " but ".join(f"{value!r} in {name}" for value, name in seen.items()))
    if problems:
        raise ValueError(
            "cannot merge results of different machines or builds into one page: "
            + "; ".join(problems)
            + ". Rerun the sections on one machine (python -m benchmarks.run --only ...) and merge those runs."
        )
    sections: dict[str, Any] = {}  # by title, in the first run's order; a later run's table replaces it in place
    source: dict[str, int] = {}  # by title, the run its table comes from
    for i, (_, data) in enumerate(runs):
        for sec in data["sections"]:
            sections[sec["title"]] = sec
            source[sec["title"]] = i
    info = dict(runs[0][1]["machine"])
    counts = Counter(source.values())
    info["merged"] = ", ".join(
        f"the run of {data['machine'].get('date')}: {counts[i]} table{'' if counts[i] == 1 else 's'}"
        for i, (_, data) in enumerate(runs)
    )
    info["load_during"] = [x for _, data in runs for x in data["machine"].get("load_during", [])]
    last = runs[-1][1]["machine"]
    if "load_at_end" in last:
        info["load_at_end"] = last["load_at_end"]
    walls = [data["machine"].get("wall_s") for _, data in runs]
    if all(w is not None for w in walls):
        info["wall_s"] = sum(walls)
    names = [n for _, data in runs for n in data.get("config", {}).get("sections", [])]
    config = {**runs[0][1].get("config", {}), "sections": list(dict.fromkeys(names))}
    return {"machine": info, "config": config, "sections": list(sections.values())}
