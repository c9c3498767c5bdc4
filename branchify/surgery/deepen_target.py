"""What one deepen key names (:class:`Target`): a container's last block, a block inside a
container, a run of an ``nn.Sequential``'s children, or a block whose parent is no container (see
:mod:`branchify.surgery.deepen` for the forms and how copies are named).

A key ending in ``@transition`` (``"features.denseblock4@transition"``) names a block that keeps
its map's size but changes its channels (a DenseNet dense block, C -> C + n*growth): each copy is
then preceded by a fresh :func:`transition` back to the block's input width - DenseNet's own
transition layer (BatchNorm, ReLU, 1x1 convolution) without its 2x2 pooling - so the pair keeps
the shape, as a DenseNet stage at the last stage's resolution.
"""
from __future__ import annotations

import copy
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..spec import SpecError
from .block_calls import Call

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_RUN = re.compile(r"^(?P<container>.*)\[(?P<first>\d+):(?P<stop>\d+)\]$")
TRANSITION = "@transition"
"""The suffix of a key whose copies each follow a fresh :func:`transition`."""


def transition(c_out: int, c_in: int) -> nn.Sequential:
    """DenseNet's transition layer without its pooling: ``c_out`` channels back to ``c_in``.

    Examples:
        >>> transition(24, 16)
        Sequential(
          (norm): BatchNorm2d(24, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
          (relu): ReLU()
          (conv): Conv2d(24, 16, kernel_size=(1, 1), stride=(1, 1), bias=False)
        )
    """
    return nn.Sequential(OrderedDict(norm=nn.BatchNorm2d(c_out), relu=nn.ReLU(),
                                     conv=nn.Conv2d(c_out, c_in, kernel_size=1, bias=False)))


def width_change(call: Call | None) -> tuple[int, int] | None:
    """``(output channels, input channels)`` of a call that maps a ``[B, C, H, W]`` map to one of
    the same size and other channels (what :func:`transition` undoes); else ``None``.

    Examples:
        >>> width_change(Call(args=(torch.zeros(2, 8, 4, 4),), kwargs={}, out=torch.zeros(2, 12, 4, 4)))
        (12, 8)
    """
    x, y = (call.hidden_in, call.hidden_out) if call is not None else (None, None)
    if x is None or y is None or x.dim() != 4 or y.dim() != 4 or x.shape[1] == y.shape[1]:
        return None
    same = x.shape[0] == y.shape[0] and x.shape[2:] == y.shape[2:] and x.dtype == y.dtype
    return (int(y.shape[1]), int(x.shape[1])) if same else None


@dataclass
class Target:
    """Where one deepen key puts its copies: after child ``name`` (position ``index``) of ``container``."""

    key: str
    container: str
    index: int
    names: list[str]
    call: Call | None = None
    block_type: str = ""
    how: str = ""
    first: int | None = None
    """A run: children ``first .. index`` of the container are copied together."""
    wrap: bool = False
    """The block's parent is no container: the block becomes ``nn.Sequential(block, copies...)``."""
    widths: tuple[int, int] | None = None
    """A ``@transition`` key's ``(block output, block input)`` channels, once known."""
    transition: bool = False
    """Each copy is ``nn.Sequential(transition=..., block=...)`` (a ``@transition`` key)."""

    def report(self) -> dict[str, str]:
        """What ``describe()`` says: the block copied, its class, and how its copies start."""
        return {"block": self.block, "class": self.block_type, "start": self.how}

    @property
    def members(self) -> list[str]:
        """Paths of the modules one copy copies (one, or a run's children in order)."""
        prefix = f"{self.container}." if self.container else ""
        lo = self.index if self.first is None else self.first
        return [prefix + name for name in self.names[lo:self.index + 1]]

    @property
    def block(self) -> str:
        """Path of the block that is copied (a run: the key, ``container[first:stop]``)."""
        return self.key if self.first is not None else self.members[0]

    def copy_of(self, model: nn.Module) -> nn.Module:
        """A fresh deep copy of what one copy holds (a run: an ``nn.Sequential`` of its children; a
        ``@transition`` key: a fresh transition and the block)."""
        if self.first is not None:
            return nn.Sequential(*[copy.deepcopy(model.get_submodule(p)) for p in self.members])
        block = copy.deepcopy(model.get_submodule(self.block))
        if not self.transition:
            return block
        if self.widths is None:
            raise SpecError(f"deepen on {self.key!r}: the widths of {self.block} are not known")
        return nn.Sequential(OrderedDict(transition=transition(*self.widths), block=block))

    def part(self, k: int) -> str:
        """The name, inside one copy, of what stands for ``members[k]`` (``""``: the copy itself)."""
        return f".{k}" if self.first is not None else ".block" if self.transition else ""

    def copy_names(self, count: int) -> tuple[list[str], dict[str, str]]:
        """``(names of the copies, renames of the later children)`` for ``count`` copies."""
        if self.wrap:
            return [str(1 + j) for j in range(count)], {}
        n = len(self.names)
        if self.names == [str(i) for i in range(n)]:
            return ([str(self.index + 1 + j) for j in range(count)],
                    {str(k): str(k + count) for k in range(self.index + 1, n)})
        return [str(n + j) for j in range(count)], {}


def resolve_target(model: nn.Module, key: str) -> Target:
    """The :class:`Target` a deepen key names (see the module docstring).

    Examples:
        >>> resolve_target(torchvision.models.resnet18(), "layer4").block      # doctest: +SKIP
        'layer4.1'
    """
    if key.endswith(TRANSITION):
        t = resolve_target(model, key[:-len(TRANSITION)])
        t.key, t.transition = key, True
        return t
    run = _RUN.match(key)
    if run:
        return _run_target(model, key, run["container"], int(run["first"]), int(run["stop"]))
    try:
        module = model.get_submodule(key)
    except AttributeError:
        raise SpecError(f"deepen names {key!r}, which is not a submodule of {type(model).__name__}") from None
    if isinstance(module, _CONTAINERS):
        if len(module) == 0:
            raise SpecError(f"deepen on {key!r}: the container is empty")
        names = list(module._modules)
        return Target(key, key, len(names) - 1, names, block_type=type(module[-1]).__name__)
    container, _, name = key.rpartition(".")
    parent = model.get_submodule(container) if container else model
    names = list(parent._modules)
    return Target(key, container, names.index(name), names, block_type=type(module).__name__,
                  wrap=not isinstance(parent, _CONTAINERS))


def _run_target(model: nn.Module, key: str, container: str, first: int, stop: int) -> Target:
    try:
        cont = model.get_submodule(container)
    except AttributeError:
        raise SpecError(f"deepen names {key!r}, but {container!r} is not a submodule of "
                        f"{type(model).__name__}") from None
    if not isinstance(cont, nn.Sequential) or type(cont).forward is not nn.Sequential.forward:
        raise SpecError(f"deepen on {key!r}: a run of children needs an nn.Sequential that chains them "
                        f"({container!r} is a {type(cont).__name__})")
    names = list(cont._modules)
    if not 0 <= first < stop <= len(names):
        raise SpecError(f"deepen on {key!r}: {container!r} has {len(names)} children")
    kinds = " + ".join(type(cont[i]).__name__ for i in range(first, stop))
    return Target(key, container, stop - 1, names, block_type=kinds, first=first)


def not_a_block(model: nn.Module, t: Target) -> SpecError:
    """The error for a key that names no block copies can follow (a head, a block called with more
    than one tensor).

    Examples:
        >>> raise not_a_block(net, resolve_target(net, "fc"))   # doctest: +SKIP
        SpecError: deepen needs a container of blocks ...; 'fc' is a Linear inside a ResNet. Name the stage ...
    """
    parent = model.get_submodule(t.container) if t.container else model
    return SpecError(f"deepen needs a container of blocks (nn.Sequential / nn.ModuleList), a block inside one, "
                     f"or a shape-preserving block called with one tensor; {t.key!r} is a {t.block_type} "
                     f"inside a {type(parent).__name__}. Name the stage that holds the blocks (e.g. 'layer4') "
                     f"or one of its blocks")


def call_of(calls: dict[str, Call], t: Target) -> Call | None:
    """The recorded call of what one copy holds (a run: its first child's arguments, its last child's output).

    Examples:
        >>> t = resolve_target(vgg, "features[25:28]")                       # doctest: +SKIP
        >>> call_of(record_calls(vgg, t.members), t).keeps_shape()           # doctest: +SKIP
        True
    """
    first, last = calls.get(t.members[0]), calls.get(t.members[-1])
    if first is None or last is None or first is last:
        return first
    return Call(args=first.args, kwargs=first.kwargs, out=last.out, start=first.start, end=last.end,
                count=max(first.count, last.count))


def one_tensor_call(call: Call | None) -> bool:
    """A call a wrapping ``nn.Sequential`` can make: one tensor in, one tensor out.

    Examples:
        >>> one_tensor_call(Call(args=(torch.zeros(1),), kwargs={}))
        True
    """
    return (call is not None and len(call.args) == 1 and isinstance(call.args[0], torch.Tensor)
            and not call.kwargs and not call.tuple_out)
