"""The tree vocabulary: node paths, segment keys, the child-0 rule and the one walk over a tree.

A branched model is a tree of segments. A node is named by its *path*: ``()`` is the trunk (level
0), ``(0,)`` the first child of the trunk, ``(0, 1)`` the second child of that node, and so on; a
node's level is ``len(path)``. Every node owns one segment module, stored under
:func:`segment_key` (``"trunk"``, ``"b0"``, ``"b0_1"``; these keys are the ``segments.*`` prefixes
of a branched model's ``state_dict``, so they never change).

Child 0 of every node keeps the original model's weights for its level; every other child is a
re-initialised replica (:func:`is_child0`). The all-child-0 path is leaf 0's lineage: the trunk and
the child-0 chain below it form the original model exactly (:func:`is_original_lineage`).

:class:`~branchify.spec.Spec` walks its tree with :meth:`~branchify.spec.Spec.nodes`, which yields
the :class:`Node` records defined here.

Examples:
    >>> segment_key(()), segment_key((0, 1)), is_child0((1, 0)), is_original_lineage((1, 0))
    ('trunk', 'b0_1', True, False)
"""
from __future__ import annotations

from typing import NamedTuple

TreePath = tuple[int, ...]
"""A node of the tree: child indices from the trunk (``()``) down."""

TRUNK_KEY = "trunk"
"""Segment key of the trunk (the root, path ``()``)."""


def segment_key(path: TreePath) -> str:
    """Key of the segment a node owns (``()`` -> ``"trunk"``, ``(0, 1)`` -> ``"b0_1"``).

    Examples:
        >>> segment_key(()), segment_key((2,)), segment_key((0, 1))
        ('trunk', 'b2', 'b0_1')
    """
    return TRUNK_KEY if not path else "b" + "_".join(map(str, path))


def is_child0(path: TreePath) -> bool:
    """Whether the node keeps the original weights of its level: the trunk and every child 0.

    Every other node is a replica that ``Spec.init`` re-initialises.

    Examples:
        >>> is_child0(()), is_child0((1, 0)), is_child0((0, 1))
        (True, True, False)
    """
    return not path or path[-1] == 0


def is_original_lineage(path: TreePath) -> bool:
    """Whether the node lies on leaf 0's path (all child indices 0), where the tree is the original model.

    Examples:
        >>> is_original_lineage(()), is_original_lineage((0, 0)), is_original_lineage((1, 0))
        (True, True, False)
    """
    return not any(path)


def lineage(path: TreePath) -> list[TreePath]:
    """The nodes from the trunk down to ``path`` (both included): the segments a leaf runs through.

    Examples:
        >>> lineage((1, 0))
        [(), (1,), (1, 0)]
    """
    return [path[:d] for d in range(len(path) + 1)]


class Node(NamedTuple):
    """One node of the tree as :meth:`branchify.spec.Spec.nodes` yields it.

    Attributes:
        level: depth (0 = trunk; the leaves are at ``spec.num_levels``).
        path: the node's path.
        parent: the parent's path (``None`` for the trunk).
        is_child0: :func:`is_child0` of ``path`` (it keeps the original weights of its level).
        leaf: the leaf index (depth-first, child 0 first) for a leaf, else ``None``.
    """

    level: int
    path: TreePath
    parent: TreePath | None
    is_child0: bool
    leaf: int | None

    @property
    def key(self) -> str:
        """:func:`segment_key` of the node."""
        return segment_key(self.path)
