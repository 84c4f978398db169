import subprocess
import sys

import funcdistill


def test_public_names_stay_what_they_are():
    assert sorted(funcdistill.__all__) == sorted(
        [
            "BoundPayload",
            "BufferUpdateWarning",
            "Buffers",
            "DistillFn",
            "Mapping",
            "Pair",
            "Point",
            "TeacherCache",
            "distill",
            "state",
        ]
    )
    for name in funcdistill.__all__:
        assert getattr(funcdistill, name).__module__.startswith("funcdistill")


def test_init_only_re_exports():
    source = open(funcdistill.__file__).read()
    assert "def " not in source and "class " not in source


def test_import_adds_only_optree_beyond_torch():
    code = (
        "import sys, torch; before = set(sys.modules); import funcdistill; "
        "print(' '.join(sorted(m for m in set(sys.modules) - before "
        "if not m.startswith(('funcdistill', 'optree')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_package_is_typed():
    import pathlib

    assert (pathlib.Path(funcdistill.__file__).parent / "py.typed").exists()


def test_align_public_names_stay_what_they_are():
    import funcdistill.align as align

    assert sorted(align.__all__) == ["Alignment", "align", "at_groups", "group_logprobs", "shared_vocab"]
    for name in align.__all__:
        assert getattr(align, name).__module__.startswith("funcdistill.align")
    source = open(align.__file__).read()
    assert "def " not in source and "class " not in source


def test_import_align_adds_no_tokenizer_library():
    code = (
        "import sys, torch; before = set(sys.modules); import funcdistill.align; "
        "print(' '.join(sorted(m for m in set(sys.modules) - before "
        "if not m.startswith(('funcdistill', 'optree')))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_served_public_names_stay_what_they_are():
    import funcdistill.served as served

    assert sorted(served.__all__) == ["ServedTeacher", "ServerError", "VLLMServer"]
    for name in served.__all__:
        assert getattr(served, name).__module__.startswith("funcdistill.served")
    source = open(served.__file__).read()
    assert "def " not in source and "class " not in source
