"""The :class:`BranchedModel` that :func:`branchify.branchify` returns."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .contract import LeafModel
from .describe import describe
from .outputs import BranchedOutput
from .spec import Spec
from .surgery.batched import BatchedMode, ReplicaGroup, check_mode, plan_groups, wants_vmap
from .surgery.deepen import deepened_skeleton
from .surgery.partition import REQUIRED
from .surgery.runner import TreeLayout, run_tree
from .surgery.widths import consumer_width, producer_width
from .tree import TreePath, lineage, segment_key
from .views import HasViews, run_views


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a sharded DTensor (FSDP2's ``fully_shard``) is gathered first."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


class _Store(nn.Module):
    """Holds state_dict entries of modules the forward never runs (export needs them)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        for i, k in enumerate(self.names):
            self.register_buffer(f"t{i}", tensors[k].detach().clone())

    def items(self):
        return [(k, getattr(self, f"t{i}")) for i, k in enumerate(self.names)]


class BranchedModel(HasViews, LeafModel):
    """A model cut into a tree of independently-weighted branches.

    Built by :func:`branchify.branchify`. ``forward`` takes the original model's inputs and returns a
    :class:`~branchify.outputs.BranchedOutput` (with the aggregator's ``targets`` once one is
    attached, see :mod:`branchify.contract`). Every shared segment runs once per forward.
    Parameters live in ``segments`` (one GraphModule per tree node, keys ``trunk``, ``b0``,
    ``b0_1``...) with the original model's parameter names inside, plus ``aggregator`` (trained
    with the model, dropped by :meth:`export`). Structurally identical sibling replicas can run
    as one vmapped call (:attr:`batched`).

    Attributes:
        layout: how values flow between the segments (:class:`~branchify.surgery.runner.TreeLayout`).
        model_inputs: the original forward's inputs as ``(node name, argument name, default)``.
        tied: parameters the original model shares across a cut, with the levels that read them;
            they stay one tensor (every later level reads the earliest level's on its path).
        unfrozen: segments whose re-initialised parameters were frozen in the original and were
            made trainable (a random replica must train to be of use).
    """

    def __init__(self, spec: Spec, segments: dict[str, fx.GraphModule], layout: TreeLayout,
                 model_inputs: list[tuple[str, str, Any]], skeleton: nn.Module,
                 nonpersistent: dict[str, torch.Tensor], unexecuted: dict[str, torch.Tensor], *,
                 init_used: str, final_linear_in: int | None, tied: dict[str, list[int]],
                 unfrozen: list[str] | None = None, batched: BatchedMode = "auto") -> None:
        super().__init__()
        self.spec = spec
        self.segments = nn.ModuleDict(segments)
        self.layout = layout
        self.model_inputs = model_inputs
        self.init_used = init_used
        self.tied = tied
        self.unfrozen = list(unfrozen or [])
        self.leaf_paths = list(layout.leaf_paths)
        self._final_linear_in = final_linear_in
        self._unexecuted = _Store(unexecuted)
        # Meta-device copy of the original model: export() materialises it (no memory cost).
        object.__setattr__(self, "_skeleton", skeleton)
        object.__setattr__(self, "_nonpersistent", nonpersistent)
        self.example_inputs: tuple | None = None
        #: how ``branchify.method`` chose the split when none was given (``None`` otherwise)
        self.split_reason: str | None = None
        self.batched = batched
        # Which replicas share a structure (and so can run as one call); plain data, no tensors.
        object.__setattr__(self, "_batch_plan", plan_groups(spec, self.segments))

    # ------------------------------------------------------------------ metadata
    @property
    def batched(self) -> BatchedMode:
        """How sibling replicas run: ``True`` as one vmapped call per group, ``False`` one call
        each, ``"auto"`` batched on CUDA and one call each elsewhere (the faster choice measured
        per device by ``benchmarks/speed.py``). Parameters, ``state_dict`` and outputs are the same
        either way, so it can be changed at any time.

        Examples:
            >>> bm.batched = True          # doctest: +SKIP
        """
        return self._batched

    @batched.setter
    def batched(self, mode: BatchedMode) -> None:
        self._batched = check_mode(mode)

    @property
    def batch_groups(self) -> list[ReplicaGroup]:
        """The groups of sibling replicas that can run as one call (deepened leaves and lone
        replicas are in none)."""
        return self._batch_plan.groups

    @property
    def feature_dim(self) -> int | None:
        """Width of ``features`` (in_features of the final Linear, else measured), if known."""
        return self._head_width(self.layout.heads.features)

    @property
    def num_classes(self) -> int | None:
        """Classes of the logits: the output width of the layer producing them (a Linear's
        ``out_features``, a conv classifier's ``out_channels``), if known."""
        return producer_width(self.segments[segment_key(self.leaf_paths[0])], self.layout.heads.logits)

    @property
    def feature_map_channels(self) -> int | None:
        """Channels of ``feature_maps``: they pool straight into the features, or a conv classifier
        reads them (SqueezeNet), whose input channels are then measured."""
        return self._head_width(self.layout.heads.feature_map)

    def _head_width(self, name: str | None) -> int | None:
        if name is None:
            return None
        if self._final_linear_in is not None:
            return self._final_linear_in
        path = self.leaf_paths[0]  # every leaf has the same widths; read the first sized layer reading it
        widths = (consumer_width(self.segments[segment_key(p)], name) for p in lineage(path))
        return next((w for w in widths if w is not None), None)

    def cut_channels(self, path: TreePath = ()) -> int | None:
        """Channels (or features) of ``cuts[path]``, read from the first layer that consumes it."""
        children = self.layout.children.get(path)
        if not children:
            raise ValueError(f"{path} is a leaf; cuts exist only at internal nodes {list(self.layout.children)}")
        child = children[0]
        name = self.layout.cut_names[len(child)]
        return consumer_width(self.segments[segment_key(child)], name) if name is not None else None

    # ------------------------------------------------------------------ forward
    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        env: dict[str, Any] = {}
        names = self.model_inputs
        if len(args) > len(names):
            raise TypeError(f"forward takes {len(names)} inputs {[a for _, a, _ in names]}, got {len(args)}")
        for (node, _, _), v in zip(names, args):
            env[node] = v
        for node, arg, default in names[len(args):]:
            if arg in kwargs:
                env[node] = kwargs.pop(arg)
            elif default is REQUIRED:
                raise TypeError(f"missing input {arg!r}")
            else:
                env[node] = default
        if kwargs:
            raise TypeError(f"unexpected inputs {sorted(kwargs)}; the model takes {[a for _, a, _ in names]}")
        return env

    def forward_leaves(self, *args: Any, **kwargs: Any) -> BranchedOutput:
        """Every leaf's outputs (no aggregator): one pass of the tree runner."""
        env = self._bind(args, dict(kwargs))
        # Remembered for describe(); not while compiling, where reading it would guard on it and
        # the second call (after the first stored it) would compile the model a second time.
        if not torch.compiler.is_compiling() and self.example_inputs is None:
            self.example_inputs = tuple((k, tuple(v.shape), v.dtype) for k, v in env.items()
                                        if isinstance(v, torch.Tensor))
        device = next((v.device for v in env.values() if isinstance(v, torch.Tensor)), None)
        if self._views is not None and self.training:  # per-leaf views: each path runs on its own view
            res = run_views(self._views, self, self.segments, self.layout, env, self.model_inputs[0][0])
        else:
            vmap = bool(self._batch_plan.groups) and wants_vmap(self._batched, device)
            res = run_tree(self.segments, self.layout, self._batch_plan, env, vmap=vmap, strict=self._batched is True)
        return BranchedOutput(logits=res.logits, features=res.features, feature_maps=res.feature_maps,
                              cuts=res.cuts, leaf_paths=self.leaf_paths)

    # ------------------------------------------------------------------ export
    def _leaf_path(self, leaf: int | None) -> TreePath:
        leaf = self.spec.target if leaf is None else leaf
        if not isinstance(leaf, int) or not 0 <= leaf < self.num_leaves:
            raise IndexError(f"leaf {leaf} does not exist; the tree has leaves 0..{self.num_leaves - 1}")
        return self.leaf_paths[leaf]

    def export_state_dict(self, leaf: int | None = None) -> dict[str, torch.Tensor]:
        """The state_dict of one leaf under the original model's key names."""
        path = self._leaf_path(leaf)
        skeleton = self._export_skeleton(self.leaf_paths.index(path))
        expected_sd = skeleton.state_dict()
        sd: dict[str, torch.Tensor] = OrderedDict()
        for node in lineage(path):
            for k, v in self.segments[segment_key(node)].state_dict().items():
                if k in expected_sd and k not in sd:  # a tensor shared across a cut: one copy is enough
                    sd[k] = _full(v).detach().clone()
        for k, v in self._unexecuted.items():
            sd.setdefault(k, v.detach().clone())
        sd = OrderedDict((k, sd[k]) for k in expected_sd if k in sd)  # the original's key order
        # Per-module versions (mnasnet's _load_from_state_dict reads them) travel as metadata.
        sd._metadata = getattr(expected_sd, "_metadata", None)  # type: ignore[attr-defined]
        return sd

    def _export_skeleton(self, leaf_idx: int) -> nn.Module:
        extra = {c: counts[leaf_idx] for c, counts in self.spec.deepen.items() if counts[leaf_idx]}
        return deepened_skeleton(self._skeleton, extra) if extra else copy.deepcopy(self._skeleton)

    def export(self, leaf: int | None = None) -> nn.Module:
        """The leaf as an instance of the original model's class (strict state_dict load).

        A deepened leaf comes back as the original class with a longer (or shorter) container.

        Examples:
            >>> student = model.export()               # doctest: +SKIP
            >>> type(student) is torchvision.models.ResNet
            True
        """
        temporal = self._modules.get("temporal")
        if temporal is not None and temporal.deploy:  # the method deploys the temporal mean
            return temporal.export(leaf)
        path = self._leaf_path(leaf)
        leaf_idx = self.leaf_paths.index(path)
        sd = self.export_state_dict(leaf_idx)
        device = next(iter(sd.values())).device if sd else torch.device("cpu")
        model = self._export_skeleton(leaf_idx).to_empty(device=device)
        model.load_state_dict(sd, strict=True)
        for name, buf in self._nonpersistent.items():  # not in state_dict, so set them directly
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buf.to(device).clone()
        return model.train(self.training)

    def ensemble(self) -> nn.Module:
        """A deployable module that runs the whole tree once and returns mean leaf probabilities."""
        return _Ensemble(self)

    def describe(self, *example_inputs: Any, print_fn: Callable[[str], None] | None = print, **kw: Any) -> str:
        """Print (and return) the tree and per-leaf parameters / FLOPs; see :mod:`branchify.describe`."""
        text = describe(self, *example_inputs, **kw)
        if print_fn is not None:
            print_fn(text)
        return text

    def extra_repr(self) -> str:
        return f"spec={self.spec}, init={self.init_used!r}"


class _Ensemble(nn.Module):
    """Runs a branch tree (no aggregator) and averages the leaves' softmax probabilities."""

    def __init__(self, branched: BranchedModel) -> None:
        super().__init__()
        agg = branched.aggregator
        branched.aggregator = None
        try:
            self.tree = copy.deepcopy(branched)
        finally:
            branched.aggregator = agg

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.tree.forward_leaves(*args, **kwargs)
        return torch.stack([z.float().softmax(-1) for z in out.logits]).mean(0)
