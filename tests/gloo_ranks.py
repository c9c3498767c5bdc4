"""Run a test's worker on local gloo ranks: a free port and a bounded wait, in one place.

Example:
    >>> run_ranks(_worker, (str(out),), nprocs=2, timeout=60)     # _worker(rank, port, out)  # doctest: +SKIP
"""
from __future__ import annotations

import socket
import sys
import time
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable, args: tuple, nprocs: int = 2, timeout: float = 60.0,
              start_method: str | None = None) -> None:
    """Start ``worker(rank, port, *args)`` on ``nprocs`` processes and wait at most ``timeout`` s.

    Forked ranks (Linux) inherit the imported modules, which saves seconds per rank on a busy
    2-core machine; elsewhere (or with ``start_method="spawn"``) they are spawned. A job that does not finish in time is killed and
    the test fails naming the limit; a rank that raises fails the test with its traceback.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    method = start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
    ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=nprocs, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs}-rank gloo job did not finish within {timeout:.0f} s")
