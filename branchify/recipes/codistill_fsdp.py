"""FSDP2 inside a codistillation group (``--set method_args.parallel=fsdp2``).

The group's model is sharded with ``torch.distributed.fsdp.fully_shard`` over the group's
``"dp"`` sub-mesh (gloo on the CPU works in torch >= 2.6); the optimizer is built on the shards.
Whatever leaves the group needs whole tensors, so every rank takes part in gathering them
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``) and data-parallel
rank 0 writes: the checkpoint (model and optimizer, the same file format as with DDP), the
exported model and the weights sent to the other groups. Evaluation runs on every rank (a
sharded forward is a collective); rank 0 records it.

Examples:
    >>> is_sharded(torch.nn.Linear(2, 2))
    False
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["Gathered", "ShardedState", "full_model_state", "full_optimizer_state", "is_sharded", "shard"]


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    """Shard ``model`` in place over the 1-D data-parallel ``mesh`` (FSDP2); returns it."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (an FSDP2 shard)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank (a collective over the shards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=_options()).items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state dict (keyed by parameter names) on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


class Gathered:
    """A state dict already gathered, where a checkpoint expects a module/optimizer to ask."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state


class ShardedState:
    """``load_state_dict`` of a whole (checkpointed) state into the shards; ``optimizer`` given:
    the optimizer's state, else the model's. Every rank loads the same file, so no broadcast."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return full_model_state(self.model)
        return full_optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if self.optimizer is None:
            set_model_state_dict(self.model, state, options=_options())
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state, options=_options())
