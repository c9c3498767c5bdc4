"""Network-level peers: separate (possibly different) models behind the branched-model interface.

A :class:`Cohort` holds whole networks - a ResNet, a VGG and a MobileNetV2, or torchvision
models - and makes them look like a :class:`~branchify.model.BranchedModel` whose leaves are
the networks: ``forward`` returns a :class:`~branchify.outputs.BranchedOutput` with each peer's
logits and penultimate features, and it has ``num_leaves``, ``leaf_paths``, ``spec``,
``feature_dim`` and the ``aggregator`` slot. So DML (:class:`~branchify.aggregators.Pairwise`),
network-based OKDDip (:class:`~branchify.aggregators.PeerAttention`) and the Mean /
AccuracyWeighted teachers run on it through :class:`~branchify.OnlineKD` unchanged.

Examples:
    >>> import branchify as bf
    >>> cohort = bf.Cohort([resnet20(num_classes=10), mobilenetv2(num_classes=10)])  # doctest: +SKIP
    >>> okd = bf.OnlineKD(cohort, bf.aggregators.Pairwise(), temperature=1.0)        # doctest: +SKIP
    >>> loss = okd(cohort(x), y); loss.total.backward()                              # doctest: +SKIP
    >>> student = cohort.export(1)          # the trained MobileNetV2 itself (a copy)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .contract import LeafModel
from .errors import BranchifyError
from .outputs import BranchedOutput, classifier_logits
from .spec import INPUT, Spec
from .views import HasViews


class CohortError(BranchifyError, ValueError):
    """Peers that cannot form a cohort, or an aggregator a cohort cannot serve (says what to change)."""


def peer_logits(result: Any) -> torch.Tensor:
    """The logits in what a peer's forward returns: a tensor, an object with ``.logits`` (Hugging
    Face), or a tuple/list whose first item is the logits.

    Examples:
        >>> peer_logits((torch.zeros(2, 3), "aux")).shape
        torch.Size([2, 3])
    """
    logits = classifier_logits(result)
    if logits is not None:
        return logits
    raise CohortError(f"a peer returned {type(result).__name__}; a cohort needs logits: a tensor, an object "
                      f"with .logits, or a tuple whose first item is the logits")


def find_head(net: nn.Module, path: str | None = None) -> tuple[str, nn.Linear] | None:
    """The classifier ``Linear`` of ``net``: the module at ``path``, else the last ``nn.Linear``
    in registration order (``fc`` of a ResNet, ``classifier.6`` of a VGG); ``None`` if it has none.

    Examples:
        >>> find_head(nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))[0]
        '3'
    """
    if path is not None:
        try:
            module = net.get_submodule(path)
        except AttributeError:
            linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
            raise CohortError(f"{type(net).__name__} has no module {path!r}; its Linear layers are "
                              f"{linears}") from None
        if not isinstance(module, nn.Linear):
            raise CohortError(f"head {path!r} of {type(net).__name__} is a {type(module).__name__}, not an "
                              f"nn.Linear; name the final classifier Linear")
        return path, module
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def _feature_module(net: nn.Module, head_path: str, head: nn.Module) -> nn.Module:
    """Where the penultimate features are read: the head's input, or the input of a dropout that
    directly precedes it in an ``nn.Sequential`` (the features are taken before dropout)."""
    parent_path, _, leaf = head_path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    if isinstance(parent, nn.Sequential):
        names = [n for n, _ in parent.named_children()]
        pos = names.index(leaf) if leaf in names else -1
        if pos > 0 and isinstance(parent[pos - 1], nn.modules.dropout._DropoutNd):
            return parent[pos - 1]
    return head


@contextlib.contextmanager
def _capture_input(module: nn.Module | None, box: list) -> Iterator[None]:
    """Record ``module``'s first positional input into ``box`` for the duration of one forward.

    The hook exists only inside the ``with`` block, so peers are never left with hooks
    (``export``, ``torch.save`` and DDP see the networks exactly as the user built them).
    """
    if module is None:
        yield
        return
    handle = module.register_forward_pre_hook(lambda _m, args: box.append(args[0] if args else None))
    try:
        yield
    finally:
        handle.remove()


def call_peer(net: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``net(*args, **kwargs)`` - one place that decides how inputs reach a peer."""
    return net(*args, **kwargs)


class Cohort(HasViews, LeafModel):
    """Separate networks as the leaves of one model: DML / OKDDip (network-based) / MD peers.

    The networks are registered as submodules *as they are* (no copy): ``cohort.peers[i]`` is
    the object you passed, so optimisers built on it, or on :meth:`peer_parameters`, train it.
    Every peer receives the same inputs. Per peer, ``logits`` is what the network returns and
    ``features`` is the input of its classifier ``Linear`` (found as the last ``nn.Linear`` in
    registration order, or named with ``heads``; read before a dropout that directly precedes
    it, like :class:`~branchify.model.BranchedModel`). ``feature_maps`` are ``None`` and there
    are no ``cuts`` (no shared trunk), so Gate and HierarchicalTA do not apply.

    Optimisers: one over ``cohort.parameters()`` (peers + aggregator), or one per peer with its
    own learning rate and LR schedule - ``SGD(cohort.peer_parameters(i), lr=lr_i)`` for each
    peer plus one over :meth:`shared_parameters` (aggregator, feature projections) if it is not
    empty. With detached teachers (Pairwise, Mean, AccuracyWeighted) each peer's gradient comes
    only from its own CE and KD terms, so per-peer optimisers are exactly per-peer training.

    Args:
        peers: networks whose forward returns logits over the same classes (two or more for DML /
            OKDDip; a single peer is allowed so one rank of a distributed run can host its peer).
        names: display names (default: class names, numbered when repeated).
        target: the deployed peer (``spec.target``; OKDDip's leader, ``export()``'s default).
        heads: per peer, the module path of the classifier ``Linear`` (``None`` = auto).
        project_features: give every peer a learned ``Linear(d_i -> d, bias=False)`` mapping its
            features to width ``d``. Needed by PeerAttention when peers' feature widths differ;
            the projections train with the aggregator and are not part of :meth:`export`.

    Examples:
        >>> a = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> b = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        >>> cohort = Cohort([a, b])
        >>> out = cohort(torch.randn(4, 8))
        >>> [tuple(z.shape) for z in out.logits], [tuple(f.shape) for f in out.features]
        ([(4, 3), (4, 3)], [(4, 16), (4, 8)])
        >>> cohort.export(1)[1].out_features, cohort.feature_dim is None
        (3, True)
    """

    def __init__(self, peers: Sequence[nn.Module], *, names: Sequence[str] | None = None, target: int = 0,
                 heads: Sequence[str | None] | None = None, project_features: int | None = None) -> None:
        super().__init__()
        peers = list(peers)
        if not peers:
            raise CohortError("a cohort needs at least one network (DML and OKDDip need two or more)")
        for i, p in enumerate(peers):
            if not isinstance(p, nn.Module):
                raise CohortError(f"peer {i} is a {type(p).__name__}; every peer must be an nn.Module")
        for i in range(len(peers)):
            for j in range(i):
                if peers[i] is peers[j]:
                    raise CohortError(f"peers {j} and {i} are the same module object; peers must be separate "
                                      f"networks (build a fresh one per peer)")
        self.names = _names(peers, names)
        if not 0 <= target < len(peers):
            raise CohortError(f"target={target} is not a peer index (0..{len(peers) - 1})")
        heads = list(heads) if heads is not None else [None] * len(peers)
        if len(heads) != len(peers):
            raise CohortError(f"heads has {len(heads)} entries for {len(peers)} peers")
        self.peers = nn.ModuleList(peers)
        self.spec = Spec(splits=[INPUT], fanout=[len(peers)], target=target)
        self.leaf_paths = self.spec.leaf_paths()
        found = [find_head(p, h) for p, h in zip(peers, heads)]
        self.head_paths: list[str | None] = [f[0] if f else None for f in found]
        self.feature_dims: list[int | None] = [f[1].in_features if f else None for f in found]
        #: per peer, the classifier's ``out_features`` (``None`` without one; checked at the first forward)
        self.head_classes: list[int | None] = [f[1].out_features if f else None for f in found]
        self._check_classes(self.head_classes, "the classifier Linear layers")
        self._verified = False
        self.projections: nn.ModuleList | None = None
        if project_features is not None:
            self._build_projections(int(project_features))
        _warn_if_identical(peers, self.names)

    # ------------------------------------------------------------------ metadata
    @property
    def num_leaves(self) -> int:
        """Number of peers (a cohort's leaves are its networks)."""
        return len(self.peers)

    @property
    def num_peers(self) -> int:
        """Same as :attr:`num_leaves`."""
        return len(self.peers)

    @property
    def feature_dim(self) -> int | None:
        """Width of ``out.features``: the projection width, else the peers' shared width, else ``None``."""
        if self.projections is not None:
            return self.projections[0].out_features
        dims = set(self.feature_dims)
        return dims.pop() if len(dims) == 1 and None not in dims else None

    @property
    def num_classes(self) -> int | None:
        """The peers' common class count (from their classifier layers), if known."""
        known = {c for c in self.head_classes if c is not None}
        return known.pop() if len(known) == 1 else None

    def peer_parameters(self, i: int) -> Iterator[nn.Parameter]:
        """Parameters of peer ``i`` alone (for a per-peer optimiser and LR schedule).

        Examples:
            >>> opts = [torch.optim.SGD(cohort.peer_parameters(i), lr=lr)              # doctest: +SKIP
            ...         for i, lr in enumerate([0.1, 0.05])]
        """
        return self.peers[self._index(i)].parameters()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters no peer owns: the aggregator's and the feature projections'."""
        for module in (self.aggregator, self.projections):
            if module is not None:
                yield from module.parameters()

    def _index(self, i: int | None) -> int:
        i = self.spec.target if i is None else i
        if not isinstance(i, int) or not 0 <= i < len(self.peers):
            raise IndexError(f"peer {i} does not exist; the cohort has peers 0..{len(self.peers) - 1} "
                             f"({', '.join(self.names)})")
        return i

    # ------------------------------------------------------------------ checks
    def _check_classes(self, counts: Sequence[int | None], source: str) -> None:
        known = [(n, c) for n, c in zip(self.names, counts) if c is not None]
        if len({c for _, c in known}) > 1:
            listing = ", ".join(f"peer {self.names.index(n)} ({n}): {c} classes" for n, c in known)
            raise CohortError(f"the peers predict different numbers of classes ({listing}, read from {source}); "
                              f"every peer must have the same classes - build them with the same num_classes")

    def _build_projections(self, width: int) -> None:
        if width < 1:
            raise CohortError(f"project_features={width} must be a positive width")
        missing = [f"peer {i} ({n})" for i, (n, d) in enumerate(zip(self.names, self.feature_dims)) if d is None]
        if missing:
            raise CohortError(f"project_features needs every peer's feature width, but {', '.join(missing)} has "
                              f"no classifier Linear; name it with heads=[...]")
        self.projections = nn.ModuleList(nn.Linear(d, width, bias=False) for d in self.feature_dims)

    def check_aggregator(self, aggregator: nn.Module) -> None:
        """Reject aggregators separate networks cannot feed (see :func:`check_aggregator`)."""
        check_aggregator(aggregator, self.names, self.feature_dims, projected=self.projections is not None)

    # ------------------------------------------------------------------ forward
    def forward_leaves(self, *args: Any, **kwargs: Any) -> BranchedOutput:
        """Run every peer on the same inputs (on its own view with :meth:`set_views`, in training
        mode); leaves in peer order."""
        logits, feats = [], []
        views = self.draw_views(args)
        for i, net in enumerate(self.peers):
            box: list = []
            head = self.head_paths[i]
            where = _feature_module(net, head, net.get_submodule(head)) if head is not None else None
            with _capture_input(where, box):
                z = peer_logits(call_peer(net, args if views is None else (views[i], *args[1:]), kwargs))
            f = box[-1] if box else None
            if where is not None and f is None:
                raise CohortError(f"peer {i} ({self.names[i]}): its classifier {head!r} did not run in forward; "
                                  f"name the Linear that produces the logits with heads=[...]")
            if f is not None and self.projections is not None:
                f = self.projections[i](f)
            logits.append(z)
            feats.append(f)
        if not self._verified:
            self._verify(logits)
        return BranchedOutput(logits=logits, features=feats, feature_maps=[None] * len(logits), cuts={},
                              leaf_paths=self.leaf_paths)

    def _verify(self, logits: list[torch.Tensor]) -> None:
        """First forward: the logits agree with the detected heads and across peers."""
        counts = [int(z.shape[-1]) for z in logits]
        for i, (c, h) in enumerate(zip(counts, self.head_classes)):
            if h is not None and c != h:
                raise CohortError(f"peer {i} ({self.names[i]}) returned {c} logits but its detected classifier "
                                  f"{self.head_paths[i]!r} has {h} outputs; name the real classifier Linear with "
                                  f"Cohort(..., heads=[...])")
        self._check_classes(counts, "the logits of the first forward")
        self._verified = True

    # ------------------------------------------------------------------ deployment
    def export(self, i: int | None = None) -> nn.Module:
        """Peer ``i`` (default: the target) as itself: a deep copy of that network, same class.

        Examples:
            >>> net = cohort.export(0)                              # doctest: +SKIP
            >>> torch.equal(net(x), cohort(x).logits[0])            # doctest: +SKIP
            True
        """
        temporal = self._modules.get("temporal")
        if temporal is not None and temporal.deploy:  # the method deploys the temporal mean
            return temporal.export(i)
        return copy.deepcopy(self.peers[self._index(i)])

    def ensemble(self, weights: Sequence[float] | None = None) -> nn.Module:
        """A deployable module returning the (weighted) mean of the peers' softmax probabilities.

        ``weights`` (one per peer, e.g. MD's accuracy weights) default to equal.

        Examples:
            >>> probs = cohort.ensemble()(x)                         # doctest: +SKIP
        """
        return CohortEnsemble([self.export(i) for i in range(self.num_peers)], weights)

    def extra_repr(self) -> str:
        return f"names={self.names}, target={self.spec.target}, feature_dims={self.feature_dims}"


class CohortEnsemble(nn.Module):
    """Runs separate networks and returns ``sum_i w_i softmax(z_i)`` (weights sum to 1).

    Examples:
        >>> ens = CohortEnsemble([nn.Linear(4, 3), nn.Linear(4, 3)], weights=[3, 1])
        >>> ens.weights.tolist(), torch.allclose(ens(torch.randn(2, 4)).sum(-1), torch.ones(2))
        ([0.75, 0.25], True)
    """

    weights: torch.Tensor

    def __init__(self, peers: Sequence[nn.Module], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)
        w = torch.ones(len(peers), dtype=torch.float64) if weights is None else torch.as_tensor(
            [float(v) for v in weights], dtype=torch.float64)
        if w.numel() != len(peers) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise CohortError(f"ensemble weights must be {len(peers)} non-negative numbers, not all 0; got "
                              f"{w.tolist()}")
        self.register_buffer("weights", (w / w.sum()).float())

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        probs = torch.stack([peer_logits(call_peer(p, args, kwargs)).float().softmax(-1) for p in self.peers])
        return (self.weights.view(-1, *[1] * (probs.dim() - 1)) * probs).sum(0)


def check_aggregator(aggregator: nn.Module, names: Sequence[str], feature_dims: Sequence[int | None], *,
                     projected: bool, where: str = "Cohort(peers, project_features=<width>)") -> None:
    """Reject aggregators that separate networks cannot feed, naming what would work instead.

    Gate and HierarchicalTA read a shared trunk activation / feature maps that separate networks
    do not have; PeerAttention needs every peer's penultimate features at one common width.

    Examples:
        >>> from branchify.aggregators import Gate
        >>> try:
        ...     check_aggregator(Gate(), ["a", "b"], [8, 8], projected=False)
        ... except CohortError as e:
        ...     print(str(e)[:48])
        Gate needs a shared trunk activation (cuts[()]),
    """
    # Imported here: the aggregators package must stay importable without the cohort module.
    from .aggregators import Gate, HierarchicalTA, PeerAttention

    kind = type(aggregator).__name__
    if isinstance(aggregator, (Gate, HierarchicalTA)):
        need = "a shared trunk activation (cuts[()])" if isinstance(aggregator, Gate) else "feature maps"
        raise CohortError(f"{kind} needs {need}, which separate networks do not have; on a Cohort use "
                          f"Pairwise (DML), Mean, PeerAttention (OKDDip) or AccuracyWeighted (MD)")
    if isinstance(aggregator, PeerAttention) and not projected:
        if None in feature_dims:
            missing = [n for n, d in zip(names, feature_dims) if d is None]
            raise CohortError(f"PeerAttention needs every peer's penultimate features, but {missing} have no "
                              f"classifier Linear; name it with heads=[...]")
        if len(set(feature_dims)) > 1:
            widths = ", ".join(f"peer {i} ({n}) {d}" for i, (n, d) in enumerate(zip(names, feature_dims)))
            raise CohortError(f"PeerAttention compares the peers' penultimate features, but their widths differ "
                              f"({widths}); build the cohort with {where} to map each peer's features to a "
                              f"common width with a learned Linear")


def _names(peers: Sequence[nn.Module], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(peers):
            raise CohortError(f"names has {len(names)} entries for {len(peers)} peers")
        return names
    base = [type(p).__name__ for p in peers]
    return [f"{b}#{base[:i].count(b)}" if base.count(b) > 1 else b for i, b in enumerate(base)]


def _warn_if_identical(peers: Sequence[nn.Module], names: Sequence[str]) -> None:
    """Two peers with equal weights get equal gradients and stay equal: almost always a mistake."""
    for i in range(len(peers)):
        for j in range(i):
            a, b = peers[i].state_dict(), peers[j].state_dict()
            if a.keys() == b.keys() and a and all(
                    a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a):
                warnings.warn(f"peers {j} ({names[j]}) and {i} ({names[i]}) start with identical weights; they "
                              f"will stay identical under DML - initialise each peer separately", stacklevel=3)
