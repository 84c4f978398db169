"""funcdistill.Point: the value, its checks, and how a Mapping keeps it."""

from __future__ import annotations

import copy
import pickle

import optree
import pytest
import torch
from torch import nn

from funcdistill import Mapping, Point
from tests.models import Unrolled, mlp


def test_value_semantics():
    p = Point("cell", call=2)
    assert p == Point("cell", call=2) and p != Point("cell", call=1) and p != Point("cell", io="input", call=2)
    assert len({p, Point("cell", call=2), Point("cell")}) == 2
    assert pickle.loads(pickle.dumps(p)) == p and copy.deepcopy(p) == p
    assert (p.name, p.io, p.call, p.arg, p.whole_forward) == ("cell", "output", 2, None, False)
    assert Point("cell", call=-1).whole_forward and Point("cell", call="all").whole_forward
    assert Point("cell").plain and not Point("cell", io="input").plain
    assert Point("") != "" and Point("cell") != "cell"  # a Mapping normalises plain points to names, not Point itself


def test_repr_shows_what_differs_from_the_default():
    assert repr(Point("a")) == "Point('a')"
    assert repr(Point("a", io="input", call="all", arg="mask")) == "Point('a', io='input', call='all', arg='mask')"
    assert repr(Point(nn.Linear(2, 2), call=0)) == "Point('<Linear>', call=0)"


def test_is_immutable():
    with pytest.raises(AttributeError, match=r"Point is immutable: cannot set 'call'\. Make a new Point\."):
        Point("a").call = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": 3}, TypeError, r"Point\(name\) must be a module name \(str\) or an nn.Module, got int"),
        (
            {"io": "inputs"},
            ValueError,
            r"Point\(io=...\) must be 'output' or 'input', got 'inputs'\. Did you mean 'input'\?",
        ),
        ({"call": "last"}, ValueError, r"Point\(call=...\) must be None, an int call index or 'all', got 'last'"),
        ({"call": 1.0}, TypeError, r"Point\(call=...\) must be None, an int call index or 'all', got float"),
        ({"call": True}, TypeError, r"got bool"),
        ({"arg": "mask"}, ValueError, r"Point\(arg='mask'\) selects one input argument, so it needs io='input'"),
        ({"io": "input", "arg": -1}, ValueError, r"Point\(arg=-1\) must be a position >= 0"),
        (
            {"io": "input", "arg": 1.5},
            TypeError,
            r"Point\(arg=...\) must be a position \(int\) or a forward\(\) parameter",
        ),
    ],
)
def test_bad_arguments_say_what_and_how(kwargs, error, match):
    kwargs = {"name": "a", **kwargs}
    with pytest.raises(error, match=match):
        Point(kwargs.pop("name"), **kwargs)


def test_mapping_keeps_plain_points_as_names_and_others_as_points():
    t, s = Unrolled(), Unrolled()
    m = Mapping(t, s).add(Point(t.cell), Point("cell", call=1)).add(Point("head", io="input"), "head")
    assert m.names == (("cell", Point("cell", call=1)), (Point("head", io="input"), "head"))
    assert m == Mapping(t, s).add("cell", Point(s.cell, call=1)).add(Point(t.head, io="input"), Point("head"))
    assert "Point('cell', call=1)" in repr(m) and "Point('head', io='input')" in repr(m)


def test_points_are_static_structure_of_the_mapping_pytree():
    t, s = Unrolled(), Unrolled()
    m = Mapping(t, s).add(Point("cell", call="all"), Point("cell", call=0), payload=1.0)
    doubled = optree.tree_map(lambda w: 2 * w, m, namespace="funcdistill")
    assert doubled.names == m.names and doubled.payload() == [2.0]
    leaves, spec = torch.utils._pytree.tree_flatten(m)
    assert leaves == [1.0] and torch.utils._pytree.tree_unflatten(leaves, spec) == m


def test_unknown_names_in_points_get_the_usual_suggestions():
    t, s = Unrolled(), Unrolled()
    with pytest.raises(ValueError, match=r"teacher Unrolled has no module or node named 'cel'\. Did you mean 'cell'"):
        Mapping(t, s).add(Point("cel", call=1), "cell")
    with pytest.raises(ValueError, match="teacher and student look swapped"):
        Mapping(t, s).add(Point(s.cell, call=1), "cell")


def test_an_argument_the_forward_does_not_take_is_refused_with_the_closest_name():
    t, s = Unrolled(), Unrolled()
    with pytest.raises(
        ValueError,
        match=r"Point\('head', io='input', arg='scal'\): the forward of the student's Scaled at 'head' has no "
        r"parameter 'scal'\. Did you mean 'scale'\? Its parameters: 'h', 'scale'\.",
    ):
        Mapping(t, s).add("head", Point("head", io="input", arg="scal"))


def test_the_input_of_an_fx_node_is_refused():
    t = torch.fx.symbolic_trace(mlp())
    s = mlp()
    with pytest.raises(
        ValueError, match=r"Point\('_1', io='input'\): '_1' is a node of the teacher Sequential's graph"
    ):
        Mapping(t, s).add(Point("_1", io="input"), "1")
    Mapping(t, s).add(Point("_1", call=0), "1")  # a node runs once: call 0 is fine
