"""Builds of one teacher cache folder by several processes at once: they take turns (a file lock).

Each job is a real process (``python -m tests.cache_jobs``). The races are made
deterministic rather than left to luck: the first job pauses at a known point
(in its first batch, or with every shard written but not the index, as on a
slow file system), the second starts its build then, and the first goes on
only once the second has either finished (what happened before the lock) or
said that it waits for the first. Both processes start together (the second
waits for the first's pause before it builds), so their imports overlap.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import funcdistill as fd
from funcdistill.cache import TeacherCache
from tests import cache_jobs

ROOT = Path(__file__).resolve().parent.parent
WAITING = "waiting for that build to finish"


class Job:
    """A ``tests.cache_jobs`` process, its output in files (read while it runs)."""

    def __init__(self, tmp: Path, name: str, *args: str, stdin: bool = False):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.cache_jobs", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=err,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def until(self, done, what: str, limit_s: float = 60.0) -> None:
        """Until ``done()`` (or the process ends: then ``done()`` must hold after it)."""
        end = time.monotonic() + limit_s
        while not done() and self.proc.poll() is None:
            assert time.monotonic() < end, f"timed out waiting until {what}:\n{self.stderr()}"
            time.sleep(0.02)

    def finish(self) -> int:
        return self.proc.wait(timeout=120)


def build_job(tmp: Path, name: str, folder: Path, seed: int, *options: str) -> Job:
    return Job(
        tmp, name, "build", str(folder), str(seed), "--signal", str(tmp / "signal"), "--go", str(tmp / "go"), *options
    )


def waits_or_ends(job: Job) -> None:
    """Until ``job`` says it waits for another build (it does under the lock) or ends (it raced, before)."""
    job.until(lambda: WAITING in job.stderr(), "the second build waits or ends")


def pause_first(tmp: Path, a: Job) -> None:
    """Until the first build is paused where its options say."""
    a.until(lambda: (tmp / "signal").exists(), "the first build pauses")
    assert a.proc.poll() is None, a.stderr()


def expected(seed: int) -> torch.Tensor:
    with torch.no_grad():
        return cache_jobs.teacher(seed)(cache_jobs.data())


def test_a_build_of_another_teacher_waits_then_is_refused_and_the_first_cache_stays(tmp_path):
    folder = tmp_path / "cache"
    a = build_job(tmp_path, "a", folder, 0, "--pause-at", "0")  # holds the lock, paused in its first batch
    b = build_job(tmp_path, "b", folder, 1, "--after", str(tmp_path / "signal"))  # another teacher, same folder
    pause_first(tmp_path, a)
    waits_or_ends(b)
    (tmp_path / "go").touch()
    assert a.finish() == 0, a.stderr()
    assert b.finish() != 0, "the second build (another teacher) reported success:\n" + b.stdout()
    assert re.search(
        r"ValueError: .*cache.* already holds a teacher cache .*made with other settings: teacher weights", b.stderr()
    ), b.stderr()
    assert f"is being built by process {a.pid} on host {socket.gethostname()}" in b.stderr()
    cache = TeacherCache.open(folder, teacher_state=fd.state(cache_jobs.teacher(0)))
    cache.verify()
    torch.testing.assert_close(cache[torch.arange(cache_jobs.N)].values[0], expected(0))  # same kernels, same process
    with pytest.raises(ValueError, match="built with another teacher state"):
        TeacherCache.open(folder, teacher_state=fd.state(cache_jobs.teacher(1)))


def test_two_build_or_opens_of_one_cache_at_once_both_succeed(tmp_path):
    folder = tmp_path / "cache"
    # the first build has written and listed every shard but not the index yet (a slow file system)
    a = build_job(tmp_path, "a", folder, 0, "--pause-index")
    b = build_job(tmp_path, "b", folder, 0, "--after", str(tmp_path / "signal"))
    pause_first(tmp_path, a)
    with pytest.raises(
        ValueError, match=rf"is still being built, by process {a.pid} on host .* call TeacherCache.build"
    ):
        TeacherCache.open(folder)  # open alone does not wait: it says who builds, and what waits for it
    waits_or_ends(b)
    (tmp_path / "go").touch()
    assert a.finish() == 0, a.stderr()
    assert b.finish() == 0, b.stderr()
    assert "built" in a.stdout() and "built" in b.stdout()
    assert f"is being built by process {a.pid}" in b.stderr()
    cache = TeacherCache.open(folder, teacher_state=fd.state(cache_jobs.teacher(0)))
    cache.verify()
    torch.testing.assert_close(cache[torch.arange(cache_jobs.N)].values[0], expected(0))
    assert sorted(p.name for p in folder.iterdir()) == ["build.lock", "index.json"] + [
        f"shard-0000{i}.safetensors" for i in range(6)
    ]  # the holder's record is gone with the lock


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_timeout_names_the_holder_and_a_killed_holder_frees_the_folder(tmp_path):
    folder = tmp_path / "cache"
    holder = Job(tmp_path, "holder", "hold", str(folder), stdin=True)
    try:
        holder.until(lambda: "held" in holder.stdout(), "the holder holds the lock")
        t, x = cache_jobs.teacher(0), cache_jobs.data()
        fn = fd.distill(t, cache_jobs.student())
        started = time.monotonic()
        with pytest.raises(
            TimeoutError,
            match=rf"gave up after 0.5 s waiting for the build lock .* by process {holder.pid} on host "
            rf"{re.escape(socket.gethostname())} \(since .*\)\. Wait for it",
        ):
            TeacherCache.build(fn, fd.state(t), x, folder, progress=False, timeout=0.5)
        assert time.monotonic() - started >= 0.5
        assert sorted(p.name for p in folder.iterdir()) == ["build.holder.json", "build.lock"]  # nothing of ours
        holder.proc.send_signal(signal.SIGKILL)  # a crash: its record stays behind, the OS frees the lock
        holder.finish()
    finally:
        if holder.proc.poll() is None:
            holder.proc.kill()
    cache = TeacherCache.build(fn, fd.state(t), x, folder, progress=False, timeout=0)  # free at once
    torch.testing.assert_close(cache[torch.arange(cache_jobs.N)].values[0], expected(0))
    assert not (folder / "build.holder.json").exists()


@pytest.mark.parametrize("timeout", [-1, float("nan"), "5", True])
def test_a_bad_timeout_is_refused(tmp_path, timeout):
    t = cache_jobs.teacher(0)
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds \(0 or more\), or None"):
        TeacherCache.build(
            fd.distill(t, cache_jobs.student()), fd.state(t), cache_jobs.data(), tmp_path, timeout=timeout
        )
