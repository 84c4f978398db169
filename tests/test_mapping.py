import copy
import pickle

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from torch import nn

from funcdistill import Mapping, Pair
from tests.models import Net, mlp


@pytest.fixture
def models():
    torch.manual_seed(0)
    return Net(width=4, depth=2), Net(width=2, depth=1)


def test_add_returns_new_mapping_and_leaves_original_unchanged(models):
    t, s = models
    empty = Mapping(t, s)
    one = empty.add("features.1", "features.1", payload=1.0)
    two = one.add("", "", payload=2.0)
    assert (len(empty), len(one), len(two)) == (0, 1, 2)
    assert one.names == (("features.1", "features.1"),)
    assert two.names == (("features.1", "features.1"), ("", ""))


def test_module_references_resolve_to_qualified_names(models):
    t, s = models
    m = Mapping(t, s).add(t.features[1].conv, "features.1.bn").add(t, s.features[0])
    assert m.names == (("features.1.conv", "features.1.bn"), ("", "features.0"))


def test_iteration_yields_pairs_in_insertion_order(models):
    t, s = models
    loss = nn.MSELoss()
    m = Mapping(t, s).add("features.0", "features.0", payload=loss).add("head", "head")
    assert list(m) == [Pair("features.0", "features.0", loss), Pair("head", "head", None)]
    assert m.payload() == [loss, None]
    assert m[1] == Pair("head", "head", None)


def test_equality_compares_names_and_payloads(models):
    t, s = models
    a = Mapping(t, s).add("head", "head", payload=torch.ones(2))
    b = Mapping(t, s).add("head", "head", payload=torch.ones(2))
    c = Mapping(t, s).add("head", "head", payload=torch.zeros(2))
    assert a == b
    assert a != c
    assert a != Mapping(t, s).add("features.0", "head", payload=torch.ones(2))
    assert a != Mapping().add("head", "head", payload=torch.ones(2))


def test_repr_shows_models_and_pairs(models):
    t, s = models
    assert repr(Mapping(t, s).add("head", "", payload=1)) == (
        "Mapping(teacher=Net, student=Net, pairs=[('head', '', 1)])"
    )
    assert repr(Mapping()) == "Mapping(pairs=[])"


def test_mapping_is_immutable(models):
    m = Mapping(*models)
    with pytest.raises(AttributeError, match="Mapping is immutable: cannot set '_names'"):
        m._names = ()
    with pytest.raises(AttributeError, match="immutable"):
        del m._payloads
    assert copy.copy(m) is m


def test_replace_swaps_payloads_and_checks_count(models):
    m = Mapping(*models).add("head", "head", payload=1).add("", "", payload=2)
    r = m.replace(payloads=[3, 4])
    assert r.payload() == [3, 4] and m.payload() == [1, 2] and r.names == m.names
    with pytest.raises(ValueError, match="replace\\(\\) got 1 payloads for a mapping of 2 pairs"):
        m.replace(payloads=[1])


def test_pickle_and_deepcopy_round_trip():
    m = Mapping().add("a", "b", payload=[1, 2])
    assert pickle.loads(pickle.dumps(m)) == m
    d = copy.deepcopy(m)
    assert d == m and d.payload()[0] is not m.payload()[0]


def test_unknown_name_suggests_close_names(models):
    t, s = models
    with pytest.raises(
        ValueError,
        match=r"teacher Net has no module or node named 'features\.1\.cnv'\. Did you mean 'features\.1\.conv'",
    ):
        Mapping(t, s).add("features.1.cnv", "head")


def test_unknown_name_lists_valid_names_when_nothing_is_close():
    t, s = mlp((4, 3)), mlp((4, 3))
    with pytest.raises(
        ValueError, match=r"student Sequential has no module or node named 'zzz'\. Valid names: '', '0'"
    ):
        Mapping(t, s).add("0", "zzz")


def test_name_of_the_other_model_says_swapped(models):
    t, s = models
    s.add_module("extra", nn.Identity())
    with pytest.raises(ValueError, match="'extra' is a module of the student: teacher and student look swapped"):
        Mapping(t, s).add("extra", "head")


def test_module_of_the_other_model_says_swapped(models):
    t, s = models
    with pytest.raises(ValueError, match="belongs to the student: teacher and student look swapped"):
        Mapping(t, s).add(s.head, t.head)


def test_foreign_module_is_rejected(models):
    with pytest.raises(ValueError, match="the student module Linear is not a submodule of the student Net"):
        Mapping(*models).add("head", nn.Linear(1, 1))


def test_module_reference_without_models_is_rejected():
    with pytest.raises(ValueError, match=r"cannot resolve the teacher module reference Linear without the models"):
        Mapping().add(nn.Linear(1, 1), "x")


def test_names_without_models_are_accepted_unchecked():
    assert Mapping().add("anything", "").names == (("anything", ""),)


def test_bad_point_type_is_a_type_error(models):
    with pytest.raises(
        TypeError, match=r"a teacher point must be a module name \(str\), an nn.Module or a funcdistill.Point, got int"
    ):
        Mapping(*models).add(3, "head")


def test_bad_constructor_arguments(models):
    t, _ = models
    with pytest.raises(TypeError, match=r"Mapping\(student=...\) must be an nn.Module or None, got str"):
        Mapping(t, "student")
    with pytest.raises(ValueError, match="the same model was passed as teacher and student"):
        Mapping(t, t)


def test_graph_module_node_names():
    t = torch.fx.symbolic_trace(Net(width=4, depth=2))
    s = Net(width=2, depth=1)
    node_names = [n.name for n in t.graph.nodes]
    assert "features_1_conv" in node_names and "add" in node_names
    m = Mapping(t, s).add("features_1_conv", "features.1").add("add", "features.0")
    assert m.names == (("features_1_conv", "features.1"), ("add", "features.0"))
    with pytest.raises(ValueError, match="Did you mean 'add'"):
        m.add("ad", "head")


# --- pytree ----------------------------------------------------------------


def _mapping():
    return Mapping().add("a", "b", payload=torch.ones(2)).add("", "", payload=None).add("c", "d", payload=2.0)


def test_optree_maps_payloads_in_namespace():
    m = _mapping()
    leaves, spec = optree.tree_flatten(m, namespace="funcdistill")
    assert len(leaves) == 2 and leaves[1] == 2.0  # None is an empty subtree
    doubled = optree.tree_map(lambda p: p * 2, m, namespace="funcdistill")
    assert isinstance(doubled, Mapping) and doubled.names == m.names
    assert torch.equal(doubled.payload()[0], torch.full((2,), 2.0)) and doubled.payload()[2] == 4.0
    assert optree.tree_unflatten(spec, leaves) == m
    assert m.payload()[2] == 2.0  # original unchanged


def test_optree_without_namespace_treats_mapping_as_leaf():
    m = _mapping()
    leaves = optree.tree_leaves(m)
    assert len(leaves) == 1 and leaves[0] is m


def test_torch_pytree_has_the_same_leaves():
    m = _mapping()
    leaves, spec = torch_pytree.tree_flatten(m)
    assert leaves[0] is m.payload()[0] and leaves[-1] == 2.0
    assert torch_pytree.tree_unflatten(leaves, spec) == m
    keyed, _ = torch_pytree.tree_flatten_with_path(m)
    assert next(k for k, _ in keyed) == (torch_pytree.SequenceKey(0),)


def test_vmap_accepts_a_mapping_of_tensor_weights():
    weights = Mapping().add("a", "b", payload=torch.tensor([1.0, 2.0, 3.0]))

    def scaled(m, x):
        return m.payload()[0] * x

    out = torch.func.vmap(scaled, in_dims=(0, None))(weights, torch.tensor(2.0))
    assert torch.equal(out, torch.tensor([2.0, 4.0, 6.0]))
