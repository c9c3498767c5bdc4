"""The tree spec: where to cut a model and how many branches grow from each cut.

A :class:`Spec` is plain data (it never sees the model). It is validated on construction,
round-trips through dicts / JSON / YAML, and exposes the tree it describes as a networkx
``DiGraph`` whose nodes are *paths*: ``()`` is the trunk, ``(0,)`` the first child of the
trunk, ``(0, 1)`` the second child of that node, and so on. Leaves are numbered depth-first,
child 0 first, so leaf 0 is always the all-child-0 path.

Examples:
    >>> spec = Spec(splits=["layer3", "layer4"], fanout=[2, [3, 1]])
    >>> spec.num_leaves, spec.leaf_paths()
    (4, [(0, 0), (0, 1), (0, 2), (1, 0)])
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

import networkx as nx

from .errors import BranchifyError
from .tree import TRUNK_KEY, Node, TreePath, is_child0, is_original_lineage, lineage, segment_key

__all__ = ["DEEPEN_INIT_CHOICES", "INIT_CHOICES", "INPUT", "TRUNK_KEY", "Fanout", "Node", "Spec", "SpecError",
           "TreePath", "is_child0", "is_original_lineage", "lineage", "segment_key"]

INPUT = "<input>"
"""Split name meaning "cut at the model input": no shared trunk, whole-network peers (DML)."""

INIT_CHOICES = ("auto", "donor", "hf", "shuffle", "reset", "copy", "pretrained")
"""How replicas get weights; see :func:`branchify.surgery.init.reinitialise`."""

DEEPEN_INIT_CHOICES = ("identity", "standard")
"""How appended (deepening) blocks start; see :func:`branchify.surgery.deepen.identity_init`."""

Fanout = Union[int, list]


class SpecError(BranchifyError, ValueError):
    """A spec that cannot describe a tree (raised at construction, before any model is seen)."""


@dataclass
class Spec:
    """Where to cut a model and how the branch tree grows.

    Args:
        splits: module paths in execution order (``branchify.split_points(model)`` lists
            them). A split at ``X`` starts a new tree level at X's input. ``"<input>"`` as the
            first split means no trunk: every leaf is a whole network.
        fanout: children of each node, one entry per level: an int (every node of that
            level gets that many) or a list with one count per node of the level.
        deepen: module path -> extra blocks per leaf (one int per leaf, AHBF). The path names a
            container (``nn.Sequential`` / ``nn.ModuleList``): positive appends fresh copies of
            its last block, negative removes trailing shape-preserving blocks; or a block inside
            one: its copies go right after it (later children move back); or a run of an
            ``nn.Sequential``'s children (``"features[25:28]"``, copied together); or a block
            called with one tensor whose parent is no container (wrapped with its copies in an
            ``nn.Sequential``); a ``"<block>@transition"`` key copies a block that only changes its
            map's channels, each copy after a fresh transition back (see
            :mod:`branchify.surgery.deepen`).
        target: the leaf that is deployed by ``export()`` (default 0).
        init: how replicas are initialised: ``"auto"`` (best available: ``model_fn`` donor,
            HF ``_init_weights``, else ``"shuffle"``), ``"donor"``, ``"hf"``, ``"shuffle"``
            (each tensor's elements randomly permuted - exactly the architecture's i.i.d.
            init distribution for a freshly built model), ``"reset"`` (``reset_parameters``),
            ``"copy"`` (identical copies; only for checks - they stay identical), or
            ``"pretrained"`` (copies of the pretrained weights with the task head re-initialised in
            every leaf but leaf 0, :mod:`branchify.surgery.pretrained`; ``"auto"`` chooses it for a
            Hugging Face model loaded with ``from_pretrained`` and a timm model with trained weights).
        grad_scale: split -> factor applied to gradients flowing from that level back into
            its parent (identity forward). CL-ILR uses ``1 / num_children``.
        deepen_init: how blocks appended by ``deepen`` start: ``"identity"`` (default: the last
            normalisation layer of each appended residual block starts at scale 0, so the block
            starts as the identity and a deepened leaf starts as a network of the original
            depth - without it, deep leaves trained with AHBF's loss diverge at ordinary learning
            rates) or ``"standard"`` (the architecture's own init for every weight, as the AHBF
            authors' code builds them).

    Examples:
        >>> Spec(splits=["layer4"], fanout=[3]).num_leaves          # ONE
        3
        >>> Spec(splits=["<input>"], fanout=[2]).num_leaves         # DML
        2
    """

    splits: list[str]
    fanout: list[Fanout]
    deepen: dict[str, list[int]] = field(default_factory=dict)
    target: int = 0
    init: str = "auto"
    grad_scale: dict[str, float] = field(default_factory=dict)
    deepen_init: str = "identity"

    def __post_init__(self) -> None:
        if isinstance(self.splits, str):
            raise SpecError(f"splits must be a list of module paths, got the string {self.splits!r}; "
                            f"write splits=[{self.splits!r}]")
        self.splits = list(self.splits)
        if isinstance(self.fanout, int):
            raise SpecError(f"fanout must be a list with one entry per split, got {self.fanout!r}; "
                            f"write fanout=[{self.fanout!r}]")
        self.fanout = [list(f) if isinstance(f, (list, tuple)) else f for f in self.fanout]
        self.deepen = {str(k): list(v) for k, v in dict(self.deepen).items()}
        self.grad_scale = {str(k): float(v) for k, v in dict(self.grad_scale).items()}
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if not self.splits:
            raise SpecError("splits is empty; give at least one module path (or '<input>')")
        for s in self.splits:
            if not isinstance(s, str) or not s:
                raise SpecError(f"every split must be a non-empty module path string, got {s!r}")
        if len(set(self.splits)) != len(self.splits):
            raise SpecError(f"splits repeat a name: {self.splits}")
        if INPUT in self.splits[1:]:
            raise SpecError(f"'{INPUT}' can only be the first split (it cuts before everything), "
                            f"got splits={self.splits}")
        if len(self.fanout) != len(self.splits):
            raise SpecError(f"fanout has {len(self.fanout)} entries but there are {len(self.splits)} "
                            f"splits; give one fanout entry per split (level)")
        nodes = 1
        for level, f in enumerate(self.fanout):
            if isinstance(f, list):
                if len(f) != nodes:
                    raise SpecError(f"fanout[{level}] lists {len(f)} child counts but level {level} "
                                    f"has {nodes} node(s); give {nodes} counts or a single int")
                counts = f
            else:
                counts = [f] * nodes
            for c in counts:
                if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                    raise SpecError(f"fanout[{level}] entries must be integers >= 1, got {c!r}")
            nodes = sum(counts)
        if not isinstance(self.target, int) or not 0 <= self.target < self.num_leaves:
            raise SpecError(f"target={self.target!r} is not a leaf index; the tree has "
                            f"{self.num_leaves} leaves (0..{self.num_leaves - 1})")
        if self.init not in INIT_CHOICES:
            raise SpecError(f"init={self.init!r} is unknown; choose one of {list(INIT_CHOICES)}")
        for container, extra in self.deepen.items():
            if len(extra) != self.num_leaves:
                raise SpecError(f"deepen[{container!r}] has {len(extra)} entries but the tree has "
                                f"{self.num_leaves} leaves; give one extra-block count per leaf")
            for e in extra:
                if isinstance(e, bool) or not isinstance(e, int):
                    raise SpecError(f"deepen[{container!r}] entries must be integers, got {e!r}")
        if self.deepen_init not in DEEPEN_INIT_CHOICES:
            raise SpecError(f"deepen_init={self.deepen_init!r} is unknown; choose one of {list(DEEPEN_INIT_CHOICES)}")
        for split, scale in self.grad_scale.items():
            if split not in self.splits:
                raise SpecError(f"grad_scale names {split!r}, which is not one of the splits {self.splits}")
            if not scale > 0:
                raise SpecError(f"grad_scale[{split!r}] must be > 0, got {scale}")

    # ------------------------------------------------------------------ the tree
    def children_per_node(self, level: int) -> list[int]:
        """Child counts of each node at ``level`` (level 0 is the trunk)."""
        f = self.fanout[level]
        return list(f) if isinstance(f, list) else [f] * len(self.level_paths(level))

    def level_paths(self, level: int) -> list[TreePath]:
        """Paths of the nodes at ``level`` in depth-first order (level 0 is ``[()]``)."""
        paths: list[TreePath] = [()]
        for lv in range(level):
            f = self.fanout[lv]
            counts = list(f) if isinstance(f, list) else [f] * len(paths)
            paths = [p + (c,) for p, n in zip(paths, counts) for c in range(n)]
        return paths

    @property
    def num_levels(self) -> int:
        """Number of replicated levels (= number of splits); the trunk is level 0."""
        return len(self.splits)

    @property
    def num_leaves(self) -> int:
        """Number of leaves (branches that end in a classifier)."""
        return len(self.level_paths(self.num_levels))

    def leaf_paths(self) -> list[TreePath]:
        """Leaf paths in leaf order (depth-first, child 0 first)."""
        return self.level_paths(self.num_levels)

    def nodes(self) -> Iterator[Node]:
        """The one walk over the tree: every node once, as a :class:`~branchify.tree.Node`.

        Level by level from the trunk, each level depth-first with child 0 first - so a parent
        always comes before its children, and the leaves come last, in leaf order.

        Examples:
            >>> [(n.level, n.path, n.parent, n.is_child0, n.leaf)
            ...  for n in Spec(splits=["layer3", "layer4"], fanout=[2, [1, 2]]).nodes()]
            ... # doctest: +NORMALIZE_WHITESPACE
            [(0, (), None, True, None), (1, (0,), (), True, None), (1, (1,), (), False, None),
             (2, (0, 0), (0,), True, 0), (2, (1, 0), (1,), True, 1), (2, (1, 1), (1,), False, 2)]
        """
        for level in range(self.num_levels + 1):
            for i, path in enumerate(self.level_paths(level)):
                yield Node(level, path, path[:-1] if path else None, is_child0(path),
                           i if level == self.num_levels else None)

    def graph(self) -> nx.DiGraph:
        """The tree as a DiGraph: nodes are paths with ``level``, ``split`` (and ``leaf`` for leaves)."""
        g = nx.DiGraph()
        for n in self.nodes():
            g.add_node(n.path, level=n.level, split=self.splits[n.level - 1] if n.level else None)
            if n.parent is not None:
                g.add_edge(n.parent, n.path)
            if n.leaf is not None:
                g.nodes[n.path]["leaf"] = n.leaf
        return g

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON/YAML friendly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Spec":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        known = {"splits", "fanout", "deepen", "target", "init", "grad_scale", "deepen_init"}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown spec keys {sorted(unknown)}; valid keys are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "Spec":
        """Parse YAML text, or read it from a path."""
        import yaml

        text = str(text_or_path)
        if "\n" not in text and Path(text).is_file():
            text = Path(text).read_text()
        return cls.from_dict(yaml.safe_load(text))
