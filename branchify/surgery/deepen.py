"""AHBF-style deepening: append (or remove) blocks of a replicated container in one leaf."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from ..spec import SpecError
from .tracing import node_module_paths


def container_blocks(model: nn.Module, path: str) -> nn.Module:
    """The container at ``path`` if it is a Sequential/ModuleList of repeatable blocks."""
    try:
        cont = model.get_submodule(path)
    except AttributeError:
        raise SpecError(f"deepen names {path!r}, which is not a submodule of {type(model).__name__}") from None
    if not isinstance(cont, (nn.Sequential, nn.ModuleList)):
        raise SpecError(f"deepen needs a container of blocks (nn.Sequential / nn.ModuleList); "
                        f"{path!r} is a {type(cont).__name__}. Name the stage that holds the blocks, "
                        f"e.g. 'layer4'")
    if len(cont) == 0:
        raise SpecError(f"deepen on {path!r}: the container is empty")
    return cont


def _probe_shape(block: nn.Module) -> tuple[int, ...] | None:
    """An input shape the block accepts, read off its first layer (None if unknown)."""
    for m in block.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return (2, m.in_channels) + (16,) * (m.weight.dim() - 2)
        if isinstance(m, nn.BatchNorm2d):
            return (2, m.num_features, 16, 16)
        if isinstance(m, nn.Linear):
            return (2, 4, m.in_features)
        if isinstance(m, nn.LayerNorm):
            return (2, 4, *m.normalized_shape)
    return None


def is_shape_preserving(block: nn.Module) -> bool:
    """Whether ``block`` maps its input to an output of the same shape (checked on meta tensors)."""
    shape = _probe_shape(block)
    if shape is None:
        return False
    probe = copy.deepcopy(block).to("meta").eval()
    try:
        with torch.no_grad():
            out = probe(torch.empty(shape, device="meta"))
    except Exception:  # the block does not accept its own first layer's input shape
        return False
    return isinstance(out, torch.Tensor) and tuple(out.shape) == shape


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def identity_init(block: nn.Module) -> bool:
    """Make a residual block start as the identity; ``True`` if that was done and verified.

    The scale of the block's last normalisation layer (in registration order; a block's own
    ``zero_init_last()`` is used when it has one, as timm's blocks do) is set to 0, so the
    residual branch outputs 0 and ``out = act(x + 0) = x`` for the non-negative activations
    inside a ResNet stage (the "zero-init residual" of Goyal et al. 2017). Whether the block
    really became the identity is checked on a random non-negative input in eval mode; if it
    did not (the block is not of that shape), the block is left exactly as it was.

    Example:
        >>> from torchvision.models.resnet import BasicBlock
        >>> blk = BasicBlock(8, 8)
        >>> identity_init(blk), float(blk.bn2.weight.abs().sum())
        (True, 0.0)
    """
    before = {k: v.detach().clone() for k, v in block.state_dict().items()}
    zero_last = getattr(block, "zero_init_last", None)
    with torch.no_grad():
        if callable(zero_last):
            zero_last()
        else:
            norms = [m for m in block.modules() if isinstance(m, _NORMS) and getattr(m, "weight", None) is not None]
            if not norms:
                return False
            norms[-1].weight.zero_()
    if _is_identity(block):
        return True
    block.load_state_dict(before)
    return False


def _is_identity(block: nn.Module) -> bool:
    shape = _probe_shape(block)
    if shape is None:
        return False
    probe = copy.deepcopy(block).double().eval()
    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = probe(x)
    except Exception:  # not callable on its own first layer's input shape
        return False
    return isinstance(out, torch.Tensor) and out.shape == x.shape and torch.allclose(out, x, atol=1e-9)


def check_deepen(model: nn.Module, path: str, extra: list[int]) -> None:
    """Validate that blocks can be appended/removed: those blocks must be shape-preserving."""
    cont = container_blocks(model, path)
    n = len(cont)
    if any(e > 0 for e in extra) and not is_shape_preserving(cont[-1]):
        raise SpecError(f"deepen on {path!r}: its last block ({type(cont[-1]).__name__}) does not keep "
                        f"the shape of its input, so copies of it cannot be appended. Choose a "
                        f"container whose last block is shape-preserving (e.g. a ResNet stage)")
    most_removed = -min(extra + [0])
    if most_removed:
        if most_removed >= n:
            raise SpecError(f"deepen on {path!r} removes {most_removed} blocks but it has only {n}; "
                            f"at least one must remain")
        for i in range(n - most_removed, n):
            if not is_shape_preserving(cont[i]):
                raise SpecError(f"deepen on {path!r}: block {i} is not shape-preserving, so it cannot "
                                f"be removed")


def deepen_graph(level: fx.GraphModule, path: str, n_blocks: int, new_blocks: list[nn.Module],
                 remove: int) -> None:
    """Append ``new_blocks`` after the container's output, or drop its last ``remove`` blocks."""
    graph = level.graph
    inside = [n for n in graph.nodes if path in node_module_paths(n)]
    if not inside:
        raise SpecError(f"deepen on {path!r}: the container does not run after the last split; "
                        f"deepening applies to a container that every leaf replicates")
    last = inside[-1]
    if new_blocks:
        prev = last
        created = []
        for j, blk in enumerate(new_blocks):
            name = f"{path}.{n_blocks + j}"
            level.add_submodule(name, blk)
            with graph.inserting_after(prev):
                prev = graph.call_module(name, (prev,))
            created.append(prev)
        first = created[0]
        last.replace_all_uses_with(prev, delete_user_cb=lambda u: u is not first)
    if remove:
        keep = f"{path}.{n_blocks - remove - 1}"
        keep_nodes = [n for n in graph.nodes if keep in node_module_paths(n)]
        last.replace_all_uses_with(keep_nodes[-1])
        graph.eliminate_dead_code()
        level.delete_all_unused_submodules()
    graph.lint()
    level.recompile()


def deepened_skeleton(skeleton: nn.Module, deepen: dict[str, int]) -> nn.Module:
    """A copy of the (meta) original model whose containers are longer/shorter by ``deepen``."""
    model = copy.deepcopy(skeleton)
    for path, extra in deepen.items():
        cont = model.get_submodule(path)
        if extra > 0:
            for _ in range(extra):
                cont.append(copy.deepcopy(cont[-1]))
        elif extra < 0:
            for _ in range(-extra):
                del cont[len(cont) - 1]
    return model
