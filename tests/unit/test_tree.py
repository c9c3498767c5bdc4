"""The tree vocabulary (branchify.tree) and the one walk over a spec's tree (Spec.nodes)."""
from __future__ import annotations

import doctest

import pytest

import branchify.tree as tree
from branchify.spec import Spec
from branchify.tree import TRUNK_KEY, is_child0, is_original_lineage, lineage, segment_key


def test_segment_keys_are_the_state_dict_prefixes():
    assert TRUNK_KEY == "trunk"
    assert segment_key(()) == "trunk"
    assert segment_key((3,)) == "b3"
    assert segment_key((0, 1)) == "b0_1"
    assert segment_key((12, 0, 2)) == "b12_0_2"


def test_segment_keys_of_a_tree_are_distinct():
    spec = Spec(splits=["a", "b", "c"], fanout=[3, [1, 11, 2], 2])
    keys = [n.key for n in spec.nodes()]
    assert len(set(keys)) == len(keys) == 1 + 3 + 14 + 28


def test_child0_rule_and_original_lineage():
    assert is_child0(()) and is_child0((0,)) and is_child0((1, 0)) and is_child0((2, 1, 0))
    assert not is_child0((1,)) and not is_child0((0, 2))
    assert is_original_lineage(()) and is_original_lineage((0, 0, 0))
    assert not is_original_lineage((1, 0)) and not is_original_lineage((0, 1))
    assert lineage((1, 0, 2)) == [(), (1,), (1, 0), (1, 0, 2)]
    assert lineage(()) == [()]


def _hand_walk(fanout: list) -> list[tuple]:
    """(level, path) in level order, depth-first child 0 first within a level, written out by hand."""
    out, frontier = [(0, ())], [()]
    for level, f in enumerate(fanout, start=1):
        counts = f if isinstance(f, list) else [f] * len(frontier)
        frontier = [p + (c,) for p, n in zip(frontier, counts) for c in range(n)]
        out += [(level, p) for p in frontier]
    return out


@pytest.mark.parametrize("fanout", [[3], [2, [3, 1]], [[2], [1, 3], [2, 1, 1, 2]], [1, 1]])
def test_nodes_walk_once_in_level_order_with_leaves_in_leaf_order(fanout):
    spec = Spec(splits=[f"s{i}" for i in range(len(fanout))], fanout=fanout)
    nodes = list(spec.nodes())
    assert [(n.level, n.path) for n in nodes] == _hand_walk(fanout)
    assert [n.path for n in nodes if n.leaf is not None] == spec.leaf_paths()
    assert [n.leaf for n in nodes if n.leaf is not None] == list(range(spec.num_leaves))
    assert all(n.leaf is None for n in nodes if n.level < spec.num_levels)
    seen = set()
    for n in nodes:  # every parent comes before its children
        assert n.parent is None if n.level == 0 else n.parent == n.path[:-1] and n.parent in seen
        assert n.is_child0 == is_child0(n.path) and n.key == segment_key(n.path)
        seen.add(n.path)


def test_leaf_zero_is_the_all_child0_path():
    spec = Spec(splits=["a", "b"], fanout=[[3], [2, 1, 4]])
    leaves = [n for n in spec.nodes() if n.leaf is not None]
    assert leaves[0].path == (0, 0) and is_original_lineage(leaves[0].path)
    assert [is_original_lineage(n.path) for n in leaves] == [True] + [False] * 6
    assert [n.is_child0 for n in leaves] == [True, False, True, True, False, False, False]


def test_graph_is_built_from_the_walk():
    spec = Spec(splits=["a", "b"], fanout=[2, [1, 2]])
    g = spec.graph()
    assert list(g.nodes) == [n.path for n in spec.nodes()]
    assert sorted(g.edges) == [((), (0,)), ((), (1,)), ((0,), (0, 0)), ((1,), (1, 0)), ((1,), (1, 1))]
    assert [g.nodes[p].get("leaf") for p in g.nodes] == [None, None, None, 0, 1, 2]
    assert [g.nodes[p]["split"] for p in g.nodes] == [None, "a", "a", "b", "b", "b"]


def test_vocabulary_is_re_exported_by_spec():
    import branchify.spec as spec_module

    for name in ("TreePath", "TRUNK_KEY", "Node", "segment_key", "is_child0", "is_original_lineage", "lineage"):
        assert getattr(spec_module, name) is getattr(tree, name)


def test_docstring_examples_hold():
    assert doctest.testmod(tree, raise_on_error=False).failed == 0
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(Spec.nodes, "Spec.nodes", globs={"Spec": Spec}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
