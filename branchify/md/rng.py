"""The per-peer RNG streams of :class:`~branchify.md.MDTrainer`: each peer draws its dropout and
other random ops from its own CPU (and CUDA) generator state, saved in and restored from MD
checkpoints."""
from __future__ import annotations

import contextlib
from typing import Any

import torch


class _PeerRNG:
    """A private RNG stream per peer (CPU and its CUDA device): dropout and other random ops of one
    peer never shift another's, so a peer trains identically whether it shares a process with
    other peers or has a rank to itself - and resumes identically from a checkpoint."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device if device.type == "cuda" else None
        with torch.random.fork_rng(devices=[self.device] if self.device is not None else []):
            torch.manual_seed(seed)
            self.cpu = torch.get_rng_state()
            self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None

    @contextlib.contextmanager
    def active(self):
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
        try:
            yield
        finally:
            self.cpu = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if self.device is not None:
                self.cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(saved_cuda, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "cuda": self.cuda}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cpu = state["cpu"]
        if self.device is not None and state.get("cuda") is not None:
            self.cuda = state["cuda"]
