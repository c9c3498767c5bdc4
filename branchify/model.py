"""``branchify(model, spec)`` and the :class:`BranchedModel` it returns."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from .outputs import BranchedOutput
from .schedules import scale_grad
from .spec import INPUT, Spec, SpecError
from .surgery.batched import BatchedMode, ReplicaGroup, check_mode, plan_groups, run_tree, wants_vmap
from .surgery.batched import model_key as _key
from .surgery.deepen import check_deepen, container_blocks, deepen_graph, deepened_skeleton, identity_init
from .surgery.init import INIT_DESCRIPTIONS, reinitialise, resolve_init
from .surgery.partition import REQUIRED, Partition, make_inplace_safe, partition
from .surgery.tracing import trace


def _input_width(m: nn.Module) -> int | None:
    """Channels/features a layer reads, for the layer types that say so."""
    for attr in ("in_channels", "in_features", "num_features", "embed_dim"):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[-1]
    return None


class _Store(nn.Module):
    """Holds state_dict entries of modules the forward never runs (export needs them)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        for i, k in enumerate(self.names):
            self.register_buffer(f"t{i}", tensors[k].detach().clone())

    def items(self):
        return [(k, getattr(self, f"t{i}")) for i, k in enumerate(self.names)]


class BranchedModel(nn.Module):
    """A model cut into a tree of independently-weighted branches.

    Built by :func:`branchify`. ``forward`` takes the original model's inputs and returns a
    :class:`~branchify.outputs.BranchedOutput`. Every shared segment runs once per forward.
    Parameters live in ``segments`` (one GraphModule per tree node, keys ``trunk``, ``b0``,
    ``b0_1``...) with the original model's parameter names inside, plus ``aggregator`` when
    a loss object attaches one (trained with the model, dropped by :meth:`export`).
    Structurally identical sibling replicas can run as one vmapped call (:attr:`batched`).
    """

    def __init__(self, part: Partition, spec: Spec, segments: dict[str, fx.GraphModule],
                 skeleton: nn.Module, nonpersistent: dict[str, torch.Tensor],
                 unexecuted: dict[str, torch.Tensor], init_used: str, batched: BatchedMode = "auto") -> None:
        super().__init__()
        self.spec = spec
        self.segments = nn.ModuleDict(segments)
        self.aggregator: nn.Module | None = None
        self.init_used = init_used
        self._level_inputs = part.level_inputs
        self._model_inputs = part.model_inputs
        self._cut_names = part.cut_names
        self._heads = (part.logits_name, part.features_name, part.feature_map_name)
        self._final_linear_in = part.final_linear.in_features if part.final_linear is not None else None
        self._tied = part.tied
        self._unexecuted = _Store(unexecuted)
        self.leaf_paths = spec.leaf_paths()
        self._children = {p: [c for c in spec.graph().successors(p)] for p in spec.graph().nodes}
        self._grad_scale = [spec.grad_scale.get(s, 1.0) for s in spec.splits]
        # Meta-device copy of the original model: export() materialises it (no memory cost).
        object.__setattr__(self, "_skeleton", skeleton)
        object.__setattr__(self, "_nonpersistent", nonpersistent)
        self._example: tuple | None = None
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

        Example:
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
    def num_leaves(self) -> int:
        return len(self.leaf_paths)

    @property
    def feature_dim(self) -> int | None:
        """Width of ``features`` (in_features of the final Linear), if known."""
        return self._final_linear_in if self._heads[1] is not None else None

    @property
    def feature_map_channels(self) -> int | None:
        """Channels of ``feature_maps`` (they pool straight into the features)."""
        return self._final_linear_in if self._heads[2] is not None else None

    def cut_channels(self, path: tuple[int, ...] = ()) -> int | None:
        """Channels (or features) of ``cuts[path]``, read from the first layer that consumes it."""
        child = self._children[path][0] if self._children.get(path) else None
        if child is None:
            raise ValueError(f"{path} is a leaf; cuts exist only at internal nodes {list(self._children)}")
        seg = self.segments[_key(child)]
        name = self._cut_names[len(child)]
        for n in seg.graph.nodes:
            if n.op == "call_module" and any(a.name == name for a in n.all_input_nodes):
                # The consumer may be a whole block (an HF layer traced as a leaf): its first
                # sized layer tells the width it reads.
                for m in seg.get_submodule(n.target).modules():
                    width = _input_width(m)
                    if width is not None:
                        return width
        return None

    # ------------------------------------------------------------------ forward
    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        env: dict[str, Any] = {}
        names = self._model_inputs
        if len(args) > len(names):
            raise TypeError(f"forward takes {len(names)} inputs {[a for _, a, _ in names]}, got {len(args)}")
        for (node, arg, _), v in zip(names, args):
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

    def forward(self, *args: Any, **kwargs: Any) -> BranchedOutput:
        env = self._bind(args, dict(kwargs))
        # Remembered for describe(); not while compiling, where reading it would guard on it and
        # the second call (after the first stored it) would compile the model a second time.
        if not torch.compiler.is_compiling() and self._example is None:
            self._example = tuple((k, tuple(v.shape), v.dtype) for k, v in env.items()
                                  if isinstance(v, torch.Tensor))
        device = next((v.device for v in env.values() if isinstance(v, torch.Tensor)), None)
        if self._batch_plan.groups and wants_vmap(self._batched, device):
            logits, feats, fmaps, cuts = run_tree(self, env)
        else:
            logits, feats, fmaps, cuts = [], [], [], {}
            self._run((), env, logits, feats, fmaps, cuts)
        return BranchedOutput(logits=logits, features=feats, feature_maps=fmaps, cuts=cuts,
                              leaf_paths=self.leaf_paths)

    def _run(self, path, env, logits, feats, fmaps, cuts) -> None:
        level = len(path)
        seg = self.segments[_key(path)]
        names = self._level_inputs[level]
        if level and self._grad_scale[level - 1] != 1.0:
            s = self._grad_scale[level - 1]
            inputs = {n: scale_grad(env[n], s) if isinstance(env[n], torch.Tensor) else env[n] for n in names}
        else:
            inputs = {n: env[n] for n in names}
        env = {**env, **seg(**inputs)}
        children = self._children[path]
        if not children:
            lg, ft, fm = self._heads
            logits.append(env[lg])
            feats.append(env[ft] if ft is not None else None)
            fmaps.append(env[fm] if fm is not None else None)
            return
        cut = self._cut_names[level + 1]
        if cut is not None:
            cuts[path] = env[cut]
        for child in children:
            self._run(child, env, logits, feats, fmaps, cuts)

    # ------------------------------------------------------------------ export
    def _leaf_path(self, leaf: int | None) -> tuple[int, ...]:
        leaf = self.spec.target if leaf is None else leaf
        if not 0 <= leaf < self.num_leaves:
            raise IndexError(f"leaf {leaf} does not exist; the tree has leaves 0..{self.num_leaves - 1}")
        return self.leaf_paths[leaf]

    def export_state_dict(self, leaf: int | None = None) -> dict[str, torch.Tensor]:
        """The state_dict of one leaf under the original model's key names."""
        path = self._leaf_path(leaf)
        leaf_idx = self.leaf_paths.index(path)
        skeleton = self._export_skeleton(leaf_idx)
        expected = skeleton.state_dict().keys()
        sd: dict[str, torch.Tensor] = {}
        for depth in range(len(path) + 1):
            for k, v in self.segments[_key(path[:depth])].state_dict().items():
                if k in expected and k not in sd:  # tied across a cut: the copy nearest the root wins
                    sd[k] = v.detach().clone()
        for k, v in self._unexecuted.items():
            sd.setdefault(k, v.detach().clone())
        return sd

    def _export_skeleton(self, leaf_idx: int) -> nn.Module:
        extra = {c: counts[leaf_idx] for c, counts in self.spec.deepen.items() if counts[leaf_idx]}
        return deepened_skeleton(self._skeleton, extra) if extra else copy.deepcopy(self._skeleton)

    def export(self, leaf: int | None = None) -> nn.Module:
        """The leaf as an instance of the original model's class (strict state_dict load).

        A deepened leaf comes back as the original class with a longer (or shorter) container.

        Example:
            >>> student = model.export()               # doctest: +SKIP
            >>> type(student) is torchvision.models.ResNet
            True
        """
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
        from .describe import describe

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
        out = self.tree(*args, **kwargs)
        return torch.stack([z.float().softmax(-1) for z in out.logits]).mean(0)


def branchify(model: nn.Module, spec: Spec, *, model_fn: Callable[[], nn.Module] | None = None,
              tracer: fx.Tracer | None = None, feature_node: str | None = None,
              batched: BatchedMode = "auto") -> BranchedModel:
    """Cut ``model`` at ``spec.splits`` and grow the branch tree ``spec`` describes.

    The model is traced with torch.fx (``tracer`` overrides the default; Hugging Face models get
    the coarse HF tracer). The user's model is never mutated: branchify works on a deep copy.
    Child 0 of every node keeps the original weights (so leaf 0 starts as the original
    model); every other replica is re-initialised as ``spec.init`` says.

    Args:
        model: any fx-traceable model whose forward returns logits.
        spec: the tree (:class:`~branchify.spec.Spec`).
        model_fn: factory for a fresh model of the same architecture: replicas then start
            from the architecture's own init (``init="donor"``, chosen by ``"auto"``).
        tracer: an ``fx.Tracer`` (e.g. :class:`branchify.Tracer` with leaf modules).
        feature_node: fx node name or module path whose output is the "features" (default:
            the input of the final Linear).
        batched: run structurally identical sibling replicas as one vmapped call: ``"auto"``
            (on CUDA, where it is faster; one call per replica elsewhere), ``True`` or ``False``.
            Only the execution changes (see :attr:`BranchedModel.batched`).

    Example:
        >>> net = torchvision.models.resnet18(num_classes=10)
        >>> bm = branchify(net, Spec(splits=["layer3", "layer4"], fanout=[2, 2]))
        >>> [z.shape for z in bm(torch.randn(2, 3, 32, 32)).logits]   # doctest: +SKIP
        [torch.Size([2, 10])] * 4
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec must be a branchify.Spec, got {type(spec).__name__}")
    check_mode(batched)
    if tracer is None:
        from .surgery.hf_tracing import maybe_hf_tracer

        tracer = maybe_hf_tracer(model)
    how = resolve_init(spec.init, model, model_fn)
    for container, extra in spec.deepen.items():
        check_deepen(model, container, extra)
    work = copy.deepcopy(model)
    was_training = work.training
    gm = trace(work, tracer)
    part = partition(gm, spec.splits, feature_node)
    if part.tied:
        names = ", ".join(f"{k} (levels {v})" for k, v in list(part.tied.items())[:8])
        warnings.warn(f"parameters tied across a cut become untied (each level gets its own copy; "
                      f"export keeps the copy nearest the trunk): {names}", stacklevel=2)
    sd_orig = work.state_dict()
    if part.unexecuted:
        warnings.warn(f"{len(part.unexecuted)} state_dict entries belong to modules the forward never "
                      f"runs ({part.unexecuted[:5]}...); export fills them from the original model",
                      stacklevel=2)
    unexecuted = {k: sd_orig[k] for k in part.unexecuted}
    segments: dict[str, fx.GraphModule] = {_key(()): part.levels[0]}
    leaf_index = {p: i for i, p in enumerate(spec.leaf_paths())}
    for level in range(1, spec.num_levels + 1):
        template = part.levels[level]
        for path in spec.level_paths(level):
            replica = copy.deepcopy(template)
            if path[-1] != 0:
                reinitialise(replica, how, original=work, model_fn=model_fn)
            make_inplace_safe(replica)
            if level == spec.num_levels:
                _apply_deepen(replica, spec, leaf_index[path], work, how, model_fn)
            segments[_key(path)] = replica
    _warn_identical_replicas(segments, spec, how)
    if spec.splits[0] == INPUT:
        make_inplace_safe(part.levels[0])
    skeleton, nonpersistent = _skeleton_of(model)
    bm = BranchedModel(part, spec, segments, skeleton, nonpersistent, unexecuted,
                       INIT_DESCRIPTIONS[how], batched)
    bm.train(was_training)
    return bm


def _warn_identical_replicas(segments: dict[str, fx.GraphModule], spec: Spec, how: str) -> None:
    """Identical siblings get identical gradients and never diverge: say so loudly.

    Re-initialised replicas can still come out identical to child 0, e.g. when ``model_fn``
    re-seeds the global RNG before building its model.
    """
    if how == "copy":
        return
    for level in range(1, spec.num_levels + 1):
        for path in spec.level_paths(level):
            if path[-1] == 0:
                continue
            mine, first = segments[_key(path)], segments[_key(path[:-1] + (0,))]
            theirs = dict(first.named_parameters())
            params = dict(mine.named_parameters())
            if params and params.keys() == theirs.keys() and all(
                    torch.equal(p, theirs[k]) for k, p in params.items()):
                warnings.warn(f"replica {_key(path)} starts with exactly the weights of "
                              f"{_key(path[:-1] + (0,))} (init {how!r}), so the two will stay identical; "
                              f"if model_fn seeds the random generator, remove the seeding", stacklevel=3)


def _apply_deepen(replica: fx.GraphModule, spec: Spec, leaf: int, work: nn.Module, how: str,
                  model_fn: Callable[[], nn.Module] | None) -> None:
    for container, counts in spec.deepen.items():
        extra = counts[leaf]
        if not extra:
            continue
        cont = container_blocks(work, container)
        n = len(cont)
        new_blocks = []
        for j in range(max(extra, 0)):
            blk = copy.deepcopy(cont[n - 1])
            src = f"{container}.{n - 1}."
            reinitialise(blk, "shuffle" if how == "copy" else how, original=work, model_fn=model_fn,
                         prefix_map=lambda k, src=src: src + k)
            if spec.deepen_init == "identity" and not identity_init(blk):
                raise SpecError(f"deepen_init='identity': the appended block {container}.{n - 1} "
                                f"({type(blk).__name__}) could not be made to start as the identity (no "
                                f"last normalisation layer whose zero scale silences its residual branch); "
                                f"pass deepen_init='standard' to keep the architecture's own init")
            new_blocks.append(blk)
        deepen_graph(replica, container, n, new_blocks, max(-extra, 0))


def _skeleton_of(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A meta-device deep copy of ``model`` plus its non-persistent buffers (kept real)."""
    nonpersistent = {}
    for mname, m in model.named_modules():
        for b in m._non_persistent_buffers_set:
            if m._buffers.get(b) is not None:
                nonpersistent[f"{mname}.{b}" if mname else b] = m._buffers[b].detach().clone()
    skeleton = copy.deepcopy(model).to("meta")
    return skeleton, nonpersistent
