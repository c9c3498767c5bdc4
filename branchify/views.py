"""Per-leaf input views: every leaf (a branch, or a peer of a cohort) sees its own view of the batch.

PCL, KDCL and OKDPH give each peer its own random augmentation of the same images; the gain they
report mixes distillation with that extra augmentation. Here the augmentation is the user's: a
callable ``views(x, leaf) -> x_leaf`` receives the batch (the model's first input) and the leaf
index and returns what that leaf sees::

    model.set_views(lambda x, k: my_augment(x))          # or bf.method(..., views=...)

While the model is in training mode, leaf ``k`` then runs on ``views(x, k)`` along its own
root-to-leaf path: the shared trunk (and every shared inner node) runs **once per leaf** instead of
once per batch, each run with its own BatchNorm batch statistics, as the references do (PCL's
``extract(x_k)`` per peer). The cost is ``sum over leaves of the path's FLOPs`` against the
tree's usual ``trunk + branches``; :func:`views_cost` computes it and ``describe()`` prints it.
In eval mode (deployment, evaluation) every leaf sees the input as given and the tree runs once.

``out.cuts[p]`` (what ONE's gate reads) is the activation of the first leaf under ``p``, i.e. on
that leaf's view. The paths run one call per replica (no vmapped sibling groups: their inputs
differ). Without views nothing here runs: the default forward is unchanged.

Helpers: :func:`stacked` for loaders that already yield one view per leaf (``[B, K, ...]``, the
references' data loaders) and :func:`crop_flip` (per-sample random crop with zero padding and
horizontal flip of an image batch, the CIFAR augmentation of the PCL reproduction's
``src/datasets/transforms.py`` lines 9-14) for a quick start.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> import branchify as bf
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> bm = bf.branchify(net, bf.Spec(splits=["3"], fanout=[2]))
    >>> bm.set_views(lambda x, k: x * (k + 1))          # leaf k sees (k + 1) * x
    >>> seen = bm(torch.ones(2, 4)).features[1]           # training mode: views apply
    >>> bool(torch.equal(seen, bm.eval()(torch.full((2, 4), 2.0)).features[1]))
    True
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .errors import BranchifyError
from .surgery.runner import TreeLayout, TreeResult, call_segment
from .tree import TRUNK_KEY, lineage, segment_key

if TYPE_CHECKING:
    from .contract import LeafModel

ViewFn = Callable[[torch.Tensor, int], torch.Tensor]


class ViewError(BranchifyError, ValueError):
    """A views callable that cannot be used, or a view it returned that a leaf cannot take."""


def check_views(views: Any) -> ViewFn | None:
    """``views`` if it is ``None`` or a callable ``(x, leaf) -> x_leaf``, else a :class:`ViewError`.

    Examples:
        >>> check_views(None) is None
        True
    """
    if views is not None and not callable(views):
        raise ViewError(f"views must be a callable views(x, leaf_index) -> x_leaf (or None for no views), "
                        f"got {type(views).__name__}")
    return views


class SharedViews:
    """The views callable of one model, plus the views it drew for its last training batch.

    Deep copies of the model share this object (``__deepcopy__`` returns it), so a copy that runs
    on the same batch tensor right after the model - the EMA copy of
    :class:`~branchify.temporal.TemporalMean` - gets the very views the live leaves saw (the PCL
    reference evaluates peer ``k``'s temporal mean on peer ``k``'s image). The model itself draws
    fresh views at every training forward, even for the same tensor.
    """

    def __init__(self, fn: ViewFn, owner: object) -> None:
        self.fn = fn
        self.owner = id(owner)
        self._last: tuple[Any, list[torch.Tensor]] | None = None

    def __deepcopy__(self, memo: dict) -> "SharedViews":
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_last": None}  # a pickled model keeps its views callable, not the last batch

    def draw(self, model: object, x: Any, num_leaves: int) -> list[torch.Tensor]:
        """The views of ``x`` for ``model``: fresh for the owner, the owner's last ones for a copy."""
        if id(model) != self.owner and self._last is not None and self._last[0]() is x \
                and len(self._last[1]) == num_leaves:
            return self._last[1]
        xs = leaf_views(self.fn, x, num_leaves)
        if id(model) == self.owner:
            self._last = (weakref.ref(x), xs)
        return xs


class HasViews:
    """Mixin of the models that take per-leaf views (:class:`~branchify.model.BranchedModel`,
    :class:`~branchify.Cohort`): the ``views`` slot, set with :meth:`set_views`."""

    _views: SharedViews | None = None

    @property
    def views(self) -> ViewFn | None:
        """The per-leaf input views ``views(x, leaf) -> x_leaf`` used in training mode."""
        return None if self._views is None else self._views.fn

    def set_views(self, views: ViewFn | None) -> None:
        """Give every leaf (branch or peer) its own view of the batch while training (``None``: no views).

        Examples:
            >>> bm.set_views(bf.views.crop_flip(padding=4))     # doctest: +SKIP
        """
        fn = check_views(views)
        object.__setattr__(self, "_views", None if fn is None else SharedViews(fn, self))
        ema = getattr(self._modules.get("temporal"), "model", None)  # type: ignore[attr-defined]
        if ema is not None:  # a temporal-mean copy made earlier runs on the same views
            object.__setattr__(ema, "_views", self._views)

    def draw_views(self, args: tuple) -> list[torch.Tensor] | None:
        """One view of ``args[0]`` per leaf in training mode; ``None`` without views or in eval mode."""
        if self._views is None or not getattr(self, "training", False):
            return None
        if not args:
            raise ViewError("views apply to the first positional input; pass the batch positionally")
        return self._views.draw(self, args[0], len(self.leaf_paths))  # type: ignore[attr-defined]


def leaf_views(views: ViewFn, x: Any, num_leaves: int) -> list[torch.Tensor]:
    """``[views(x, 0), ..., views(x, K-1)]``, each checked to be a tensor with ``x``'s batch size.

    Examples:
        >>> [v.tolist() for v in leaf_views(lambda x, k: x + k, torch.zeros(1), 2)]
        [[0.0], [1.0]]
    """
    if not isinstance(x, torch.Tensor):
        raise ViewError(f"views apply to the model's first input, which is a {type(x).__name__} here; "
                        f"pass the batch tensor first (or set no views)")
    out = []
    for k in range(num_leaves):
        v = views(x, k)
        if not isinstance(v, torch.Tensor):
            raise ViewError(f"views(x, {k}) returned {type(v).__name__}; it must return leaf {k}'s input tensor")
        if x.dim() and v.dim() and v.shape[0] != x.shape[0]:
            raise ViewError(f"views(x, {k}) returned a batch of {v.shape[0]} but the input has {x.shape[0]}; a "
                            f"view must keep the batch (one view of every sample)")
        out.append(v)
    return out


def run_leafwise(segments: nn.ModuleDict, layout: TreeLayout, envs: list[dict[str, Any]]) -> TreeResult:
    """Run each leaf's root-to-leaf path on its own inputs (``envs[k]``: model inputs by node name).

    Shared nodes run once per leaf; ``cuts[p]`` comes from the first leaf under ``p``. Another set
    of segments with the same layout (an EMA copy) can run on the same ``envs``.
    """
    result = TreeResult([], [], [], {})
    heads = layout.heads
    for path, env in zip(layout.leaf_paths, envs):
        env = call_segment(segments[TRUNK_KEY], layout.level_inputs[0], env, 1.0)
        for node in lineage(path):
            depth = len(node)
            if depth:
                env = call_segment(segments[segment_key(node)], layout.level_inputs[depth], env,
                                   layout.grad_scale[depth - 1])
            cut = layout.cut_names[depth + 1] if layout.children.get(node) else None
            if cut is not None and node not in result.cuts:
                result.cuts[node] = env[cut]
        result.logits.append(env[heads.logits])
        result.features.append(env[heads.features] if heads.features is not None else None)
        result.feature_maps.append(env[heads.feature_map] if heads.feature_map is not None else None)
    result.cuts = dict(sorted(result.cuts.items()))  # depth-first pre-order, as run_tree
    return result


def run_views(views: SharedViews, model: object, segments: nn.ModuleDict, layout: TreeLayout,
              env: dict[str, Any], first: str) -> TreeResult:
    """The tree with leaf ``k`` on view ``k`` of ``env[first]``: :meth:`SharedViews.draw` + :func:`run_leafwise`."""
    xs = views.draw(model, env[first], len(layout.leaf_paths))
    return run_leafwise(segments, layout, [{**env, first: x} for x in xs])


def views_cost(model: "LeafModel", flops: dict[str, int]) -> tuple[int, int]:
    """``(forward FLOPs with per-leaf views, without)`` from per-segment FLOPs (``describe``'s).

    Examples:
        >>> views_cost(bm, {TRUNK_KEY: 10, "b0": 1, "b1": 1})     # doctest: +SKIP
        (22, 12)
    """
    with_views = sum(flops[segment_key(node)] for path in model.leaf_paths for node in lineage(path))
    return with_views, sum(flops.values())


class Stacked:
    """Views a data loader already made: leaf ``k`` takes ``x.select(dim, k)`` (see :func:`stacked`)."""

    def __init__(self, dim: int = 1) -> None:
        self.dim = int(dim)

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if x.dim() <= self.dim or x.shape[self.dim] <= k:
            raise ViewError(f"stacked(dim={self.dim}): leaf {k} needs a batch with at least {k + 1} views along dim "
                            f"{self.dim}, got shape {tuple(x.shape)}; yield [B, K, ...] from the loader")
        return x.select(self.dim, k).contiguous()

    def __repr__(self) -> str:
        return f"stacked(dim={self.dim})"


def stacked(dim: int = 1) -> ViewFn:
    """Views a data loader already made: leaf ``k`` takes ``x.select(dim, k)`` of a ``[B, K, ...]`` batch
    (how the KDCL and PCL reproductions feed their peers, ``imgs[:, k]``).

    Examples:
        >>> stacked()(torch.arange(6.).view(1, 3, 2), 2).tolist()
        [[4.0, 5.0]]
    """
    return Stacked(dim)


class CropFlip:
    """Per-sample random crop with constant padding and horizontal flip (see :func:`crop_flip`)."""

    def __init__(self, padding: int = 4, flip: bool = True, fill: float = 0.0) -> None:
        if padding < 0:
            raise ViewError(f"crop_flip(padding={padding}) must be >= 0")
        self.padding, self.flip, self.fill = int(padding), bool(flip), float(fill)

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if x.dim() != 4:
            raise ViewError(f"crop_flip expects an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        pad = self.padding
        padded = nn.functional.pad(x, (pad,) * 4, value=self.fill)
        dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        if self.flip:
            mirror = torch.rand(b, device=x.device) < 0.5
            cols = torch.where(mirror[:, None, None, None], cols.flip(-1), cols)
        idx = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[idx, chans, rows, cols]

    def __repr__(self) -> str:
        fill = f", fill={self.fill:g}" if self.fill else ""
        return f"crop_flip(padding={self.padding}, flip={self.flip}{fill})"


def crop_flip(padding: int = 4, flip: bool = True, fill: float = 0.0) -> ViewFn:
    """Per-sample random crop (padding ``padding`` filled with ``fill``) and horizontal flip of ``[B, C, H, W]``.

    The view of every leaf and sample is drawn independently from torch's global RNG. On a
    normalised batch, ``fill=-mean / std`` pads with what a black pixel became: the same views as
    torchvision's ``RandomCrop(padding=p)`` on the raw images before ``Normalize``.

    Examples:
        >>> v = crop_flip(2)(torch.ones(3, 1, 5, 5), 0)
        >>> tuple(v.shape)
        (3, 1, 5, 5)
        >>> crop_flip(1, fill=-2.0)(torch.zeros(1, 1, 1, 1), 0).item() in (0.0, -2.0)
        True
    """
    return CropFlip(padding, flip, fill)
