import json

import networkx as nx
import pytest

from branchify import Spec, SpecError


def test_tsa_2_3_has_four_leaves_in_depth_first_order():
    spec = Spec(splits=["layer3", "layer4"], fanout=[2, 2])
    assert spec.num_leaves == 4
    assert spec.leaf_paths() == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_unbalanced_fanout_lists_children_per_node():
    spec = Spec(splits=["layer3", "layer4"], fanout=[2, [3, 1]])
    assert spec.leaf_paths() == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert spec.children_per_node(1) == [3, 1]


def test_graph_is_a_tree_with_leaf_indices():
    g = Spec(splits=["a", "b"], fanout=[2, [1, 2]]).graph()
    assert nx.is_tree(g)
    assert {g.nodes[p]["leaf"] for p in g if "leaf" in g.nodes[p]} == {0, 1, 2}
    assert g.nodes[(1, 1)]["split"] == "b" and g.nodes[()]["level"] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(splits=["layer4"], fanout=[3, 2]), "fanout has 2 entries but there are 1 splits"),
    (dict(splits=["a", "b"], fanout=[2, [3]]), "fanout[1] lists 1 child counts but level 1 has 2 node(s)"),
    (dict(splits=["a"], fanout=[0]), "entries must be integers >= 1"),
    (dict(splits="layer4", fanout=[3]), "write splits=['layer4']"),
    (dict(splits=["layer4"], fanout=3), "write fanout=[3]"),
    (dict(splits=["a", "<input>"], fanout=[2, 2]), "'<input>' can only be the first split"),
    (dict(splits=["a", "a"], fanout=[2, 2]), "splits repeat a name"),
    (dict(splits=["a"], fanout=[2], target=2), "target=2 is not a leaf index; the tree has 2 leaves"),
    (dict(splits=["a"], fanout=[2], init="random"), "init='random' is unknown"),
    (dict(splits=["a"], fanout=[4], deepen={"a": [0, 4]}), "deepen['a'] has 2 entries but the tree has 4 leaves"),
    (dict(splits=["a"], fanout=[2], grad_scale={"b": 0.5}), "grad_scale names 'b'"),
])
def test_bad_specs_are_rejected_with_a_message(kwargs, message):
    with pytest.raises(SpecError) as err:
        Spec(**kwargs)
    assert message in str(err.value)


def test_round_trips_through_dict_json_and_yaml(tmp_path):
    spec = Spec(splits=["layer4"], fanout=[4], deepen={"layer4": [0, 4, 8, 12]}, target=0,
                init="shuffle", grad_scale={"layer4": 0.25})
    assert Spec.from_dict(spec.to_dict()) == spec
    assert Spec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["deepen"] == {"layer4": [0, 4, 8, 12]}
    assert Spec.from_yaml(spec.to_yaml()) == spec
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    assert Spec.from_yaml(path) == spec


def test_unknown_dict_keys_are_named():
    with pytest.raises(SpecError, match=r"unknown spec keys \['fan_out'\]"):
        Spec.from_dict({"splits": ["a"], "fan_out": [2]})
