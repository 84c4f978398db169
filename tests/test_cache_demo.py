"""``python -m funcdistill demo --cached``: the students train from a teacher cache (tiny settings)."""

from __future__ import annotations

import io
import sys

import pytest

from funcdistill.__main__ import main
from funcdistill._demo import DemoConfig, run_demo
from funcdistill._demo import train as demo_train
from tests.test_demo import _MatmulShapes

TEST_IMAGES = 540
TINY = dict(epochs=3, teacher_epochs=2, quiet=True, plot=None)


@pytest.mark.parametrize("sweep", [False, True])
def test_cached_demo_trains_the_students_the_online_demo_trains(sweep):
    changes = dict(sweep=True, temperatures=(2.0, 8.0)) if sweep else {}
    online = run_demo(DemoConfig(**TINY, **changes), stream=io.StringIO())
    cached = run_demo(DemoConfig(**TINY, **changes, cached=True), stream=io.StringIO())
    assert [r.name for r in cached.rows] == [r.name for r in online.rows]
    for a, b in zip(online.rows, cached.rows):
        # the stored logits equal the online ones up to float rounding: allow 2 test images
        assert abs(a.accuracy - b.accuracy) <= 2 / TEST_IMAGES, a.name


def test_the_teacher_does_not_run_while_the_students_train(tmp_path):
    data = demo_train.load_digits_split(seed=0, labels_per_class=2)
    teacher = demo_train.mlp(demo_train.TEACHER_HIDDEN, seed=0)
    student = demo_train.mlp(demo_train.STUDENT_HIDDEN, seed=1)
    params = demo_train.initial_params(teacher)
    cache = demo_train.build_cache(teacher, student, params, data, str(tmp_path), batch_size=8)
    assert len(cache) == 20
    width = demo_train.TEACHER_HIDDEN[0]
    kw = dict(temperatures=[4.0], kd_weights=[0.9], epochs=1, batch_size=8, lr=0.01, seed=0, vectorize=False)
    with _MatmulShapes() as seen:
        demo_train.train_students(teacher, student, params, data, on_epoch=lambda *a: None, cache=cache, **kw)
    assert seen.shapes and not [s for s in seen.shapes if width in s]
    with _MatmulShapes() as seen:  # control: the online loop does run it
        demo_train.train_students(teacher, student, params, data, on_epoch=lambda *a: None, **kw)
    assert [s for s in seen.shapes if width in s]


def test_cli_cached_narrates_the_cache(capsys):
    status = main(["demo", "--cached", "--epochs", "1", "--teacher-epochs", "1", "--no-plot"])
    captured = capsys.readouterr()
    assert status == 0
    assert "teacher cache: logits of the 50 labelled images" in captured.out
    assert "bytes per image" in captured.out and "student + KD (T=4)" in captured.out


def test_cached_demo_without_safetensors_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    status = main(["demo", "--cached", "--epochs", "1", "--teacher-epochs", "1", "--quiet", "--no-plot"])
    assert status == 1
    assert "the demo needs safetensors, which is not installed" in capsys.readouterr().err


def test_cached_must_be_a_bool():
    with pytest.raises(TypeError, match=r"cached must be True or False, got str"):
        DemoConfig(cached="yes")
