"""How the benchmark suite judges and renders timings (``benchmarks/timing.py``, ``benchmarks/report.py``).

Synthetic timings, no clock: a goal is met only when the whole interquartile
range meets it, a range that straddles the goal says so, every timing has at
least five rounds, and the machine's load is in the results and the tables.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import report, timing
from benchmarks.calls import goal_us


def times(reference: list[float], candidate: list[float]) -> timing.Times:
    out = timing.Times({"reference": reference, "candidate": candidate})
    out.load = {"before": {"load_1min": 3.5, "busy_processes": 4}, "after": {"load_1min": 5.0, "busy_processes": 6}}
    return out


def rendered(t: timing.Times, limit: float) -> str:
    r = timing.ratio(t, "candidate", "reference")
    sec = report.Section("Demo", ["style", "ratio", "target", "met"])
    sec.add(
        style="candidate",
        ratio=f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})",
        target=f"<= {limit}",
        met=timing.verdict(r, limit),
    )
    sec.load = t.load
    return report.to_markdown([sec], {"cores": 2}, heading="Results")


@pytest.mark.parametrize(
    ("candidate", "met"),
    [
        ([0.90, 0.92, 0.95, 0.97, 0.99], "yes"),  # the whole range under 1.0
        ([0.90, 0.95, 0.98, 1.05, 1.10], timing.NOISE),  # median under the goal, range across it
        ([0.95, 0.99, 1.02, 1.04, 1.20], timing.NOISE),  # median over the goal, range across it
        ([1.05, 1.06, 1.08, 1.10, 1.30], "no"),  # the whole range over it
    ],
)
def test_a_goal_is_met_only_when_the_interquartile_range_meets_it(candidate, met):
    text = rendered(times([1.0] * 5, candidate), 1.0)
    row = text.splitlines()[-3]  # the table's last row, then a blank line and the load line
    assert row.endswith(f"| {met} |"), row


def test_the_table_says_within_noise_and_gives_the_load():
    text = rendered(times([1.0] * 5, [0.90, 0.95, 0.98, 1.05, 1.10]), 1.0)
    assert "| within noise of the goal |" in text
    assert (
        "Machine load while this section ran: 1-minute load average 3.5 before, 5.0 after, on 2 cores; "
        "4 other running processes before, 6 after." in text
    )


def test_higher_is_better_goals_are_judged_from_the_other_side():
    assert timing.verdict({"median": 2.5, "p25": 2.2, "p75": 2.8}, 2.0, higher_is_better=True) == "yes"
    assert timing.verdict({"median": 2.1, "p25": 1.9, "p75": 2.3}, 2.0, higher_is_better=True) == timing.NOISE
    assert timing.verdict({"median": 1.5, "p25": 1.4, "p75": 1.9}, 2.0, higher_is_better=True) == "no"


def test_every_timing_has_at_least_five_rounds_and_records_the_load():
    t = timing.paired_rounds({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=0)
    assert [len(v) for v in t.values()] == [timing.MIN_ROUNDS] * 2
    assert set(t.load) == {"before", "after"}
    assert set(t.load["before"]) == {"load_1min", "busy_processes"}


def test_the_load_survives_the_json_and_a_rerender(tmp_path):
    sec = report.Section(
        "Demo",
        ["style"],
        load={"before": {"load_1min": 1.0, "busy_processes": 0}, "after": {"load_1min": 2.0, "busy_processes": 1}},
    )
    sec.add(style="x")
    json_path, _ = report.write([sec], {"cores": 2}, {}, tmp_path, "demo")
    data = json.loads(json_path.read_text())
    again = [report.Section(**s) for s in data["sections"]]
    assert "1-minute load average 1.0 before, 2.0 after" in report.to_markdown(again, data["machine"], heading="R")


def test_the_overhead_goal_counts_state_tensors_and_swapped_ones():
    assert goal_us(102, 0) == pytest.approx(30.1)  # 51 + 51 tensors, nothing swapped
    assert goal_us(1600, 0) == pytest.approx(105.0)
    assert goal_us(102, 102) == pytest.approx(132.1)  # every tensor swapped in: 1 µs each on top


def test_a_run_keeps_the_sections_it_finished_when_a_later_one_fails(tmp_path, monkeypatch):
    from benchmarks import run

    def finished(cfg):
        sec = report.Section("Finished", ["x"])
        sec.add(x=1)
        return sec

    def failing(cfg):
        raise RuntimeError("this section failed")

    monkeypatch.setitem(run.SECTIONS, "finished", finished)
    monkeypatch.setitem(run.SECTIONS, "failing", failing)
    with pytest.raises(RuntimeError, match="this section failed"):
        run.main(["--only", "finished", "failing", "--out", str(tmp_path)])
    kept = json.loads((tmp_path / "cpu.partial.json").read_text())
    assert [s["title"] for s in kept["sections"]] == ["Finished"]
    load = kept["sections"][0]["load"]
    assert load["cpu"].startswith(report.machine()["cpu"]) and load["started"].endswith("UTC")
    assert "Ran on " in (tmp_path / "cpu.partial.md").read_text()
    assert not (tmp_path / "cpu.json").exists()

    run.main(["--only", "finished", "--out", str(tmp_path)])  # a finished run replaces the partial results
    assert [s["title"] for s in json.loads((tmp_path / "cpu.json").read_text())["sections"]] == ["Finished"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu.json", "cpu.md"]


def _section(title: str, value: int):
    def make(cfg):
        sec = report.Section(title, ["x"])
        sec.add(x=value)
        return sec

    return make


def test_a_merge_puts_a_rerun_table_in_place_and_keeps_where_each_table_ran(tmp_path, monkeypatch):
    from benchmarks import run

    monkeypatch.setitem(run.SECTIONS, "first", _section("First", 1))
    monkeypatch.setitem(run.SECTIONS, "second", _section("Second", 2))
    run.main(["--only", "first", "second", "--out", str(tmp_path / "page")])
    base = tmp_path / "page" / "cpu.json"
    before = json.loads(base.read_text())
    monkeypatch.setitem(run.SECTIONS, "first", _section("First", 10))  # the rerun measures another value
    monkeypatch.setitem(run.SECTIONS, "third", _section("Third", 3))
    run.main(["--only", "third", "first", "--out", str(tmp_path / "rerun")])
    rerun = json.loads((tmp_path / "rerun" / "cpu.json").read_text())

    docs = tmp_path / "docs.md"
    assert run.main(["--merge", str(base), str(tmp_path / "rerun" / "cpu.json"), "--docs", str(docs)]) == 0
    merged = json.loads(base.read_text())
    # the rerun table takes the old one's place; the new table comes last; the kept one is untouched
    assert [(s["title"], s["rows"]) for s in merged["sections"]] == [
        ("First", [{"x": 10}]),
        ("Second", [{"x": 2}]),
        ("Third", [{"x": 3}]),
    ]
    assert merged["sections"][1] == before["sections"][1]
    assert merged["sections"][0]["load"] == rerun["sections"][1]["load"]
    assert merged["config"]["sections"] == ["first", "second", "third"]
    assert merged["machine"]["merged"] == (
        f"the run of {before['machine']['date']}: 1 table, the run of {rerun['machine']['date']}: 2 tables"
    )
    assert merged["machine"]["wall_s"] == before["machine"]["wall_s"] + rerun["machine"]["wall_s"]
    for page in (base.with_suffix(".md"), docs):
        text = page.read_text()
        assert "| 10 |" in text and "| 1 |" not in text and text.count("Ran on ") == 3
        assert "merged `" in text


def test_a_merge_refuses_runs_of_another_machine_and_leaves_the_page_alone(tmp_path, monkeypatch, capsys):
    from benchmarks import run

    monkeypatch.setitem(run.SECTIONS, "first", _section("First", 1))
    run.main(["--only", "first", "--out", str(tmp_path / "page")])
    run.main(["--only", "first", "--out", str(tmp_path / "rerun")])
    other = tmp_path / "rerun" / "cpu.json"
    data = json.loads(other.read_text())
    data["machine"].update(cpu="AMD EPYC 7B13", torch="2.12.0")
    other.write_text(json.dumps(data))
    base = tmp_path / "page" / "cpu.json"
    page = base.read_text()
    capsys.readouterr()

    assert run.main(["--merge", str(base), str(other)]) == 2
    err = capsys.readouterr().err
    assert "cannot merge results of different machines or builds into one page" in err
    assert f"cpu is {json.loads(page)['machine']['cpu']!r} in {base} but 'AMD EPYC 7B13' in {other}" in err
    assert "torch is" in err and "Rerun the sections on one machine" in err
    assert base.read_text() == page
    with pytest.raises(ValueError, match="merging needs at least two results files, got 1"):
        report.merge([("a", json.loads(page))])
    with pytest.raises(SystemExit):
        run.main(["--merge", str(base)])
    assert "--merge: give the results JSON to update, then one or more runs" in capsys.readouterr().err
    (tmp_path / "notes.json").write_text('{"rows": []}')
    for given, why in ((tmp_path / "missing.json", "No such file"), (tmp_path / "notes.json", "no 'machine'")):
        assert run.main(["--merge", str(base), str(given)]) == 2
        err = capsys.readouterr().err
        assert f"--merge: cannot read {given} as benchmark results (" in err and why in err
    assert base.read_text() == page
    assert run.main(["--render", str(tmp_path / "notes.json")]) == 2
    assert f"--render: cannot read {tmp_path / 'notes.json'} as benchmark results (" in capsys.readouterr().err
