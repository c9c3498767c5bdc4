"""How codistillation payloads cross groups: in one process, over collectives, or through files.

Every transport has ``publish(step, payload, final=False)`` then ``collect(step) -> {group:
payload}`` (the peers whose payload this group uses now; its own group excluded), counts the
bytes it sends and receives (:func:`~branchify.distributed.codistill.payload_bytes`) and
reports changes of the teacher set through ``on_event`` (a log line).

Why files for fault tolerance: a collective needs every member. A dead group leaves the others
blocked inside ``all_gather`` until the process-group timeout, after which gloo and nccl
process groups cannot be used again, and ``torchrun`` tears down *all* workers of a job when
one dies. :class:`FileTransport` instead gives each group its own ``torchrun`` job and process
group (DDP stays inside it); a group writes its snapshot with ``torch.save`` into a temporary
file renamed over ``exchange/g<group>r<rank>-<step>.pt`` (``os.replace``: readers see a whole file or
none), and a reader waits at most ``wait_s`` for the step it wants - so a survivor is delayed
by at most ``wait_s`` once per failure, never deadlocked. A lagging peer's newest snapshot is
used while it is at most ``max_stale`` exchanges old (weights mode); older, or missing, the peer
leaves the teacher set with a log line; when its snapshots catch up (a resumed group) it
rejoins, with a log line. A group that finished publishes its final weights marked ``final``;
they keep teaching the groups still training.

Examples:
    >>> t = LocalTransport(groups=2)
    >>> t.channel(0).publish(0, {"x": torch.zeros(2)}); t.channel(1).publish(0, {"x": torch.ones(2)})
    >>> sorted(t.channel(0).collect(0))
    [1]
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .codistill import CodistillOptions, payload_bytes


class _Counting:
    def __init__(self, group: int, on_event: Callable[[str], None] | None) -> None:
        self.group = group
        self.sent = 0
        self.received = 0
        self.on_event = on_event or (lambda line: None)
        self.live: set[int] = set()

    def _report(self, now: dict[int, Any], step: int, why: dict[int, str]) -> None:
        for g in sorted(self.live - set(now)):
            self.on_event(f"group {self.group}: teacher set shrinks to {sorted(now)} at step {step}: "
                          f"group {g} {why.get(g, 'sent nothing')}")
        for g in sorted(set(now) - self.live):
            self.on_event(f"group {self.group}: group {g} (re)joins the teacher set at step {step}; "
                          f"teachers {sorted(now)}")
        self.live = set(now)


class LocalTransport:
    """All groups in one process (tests, the CPU benchmark): payloads pass by reference."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.board: dict[int, tuple[int, Any]] = {}
        self._channels = {g: _LocalChannel(self, g) for g in range(groups)}

    def channel(self, group: int) -> "_LocalChannel":
        """The transport as group ``group`` sees it."""
        return self._channels[group]


class _LocalChannel(_Counting):
    def __init__(self, hub: LocalTransport, group: int) -> None:
        super().__init__(group, None)
        self.hub = hub

    def publish(self, step: int, payload: Any, final: bool = False) -> None:
        self.hub.board[self.group] = (step, payload)
        self.sent += payload_bytes(payload) * (self.hub.groups - 1)

    def collect(self, step: int) -> dict[int, Any]:
        got = {g: p for g, (s, p) in self.hub.board.items() if g != self.group and s == step}
        self.received += sum(payload_bytes(p) for p in got.values())
        return got


class CollectiveTransport(_Counting):
    """``all_gather_object`` over the cross-group process group (the ``"group"`` dimension of a
    2-D ``DeviceMesh``). Weights: only data-parallel rank 0 exchanges (every rank of a group
    holds the same weights), then broadcasts inside its group; ``per_rank=True`` (logits of each
    rank's slice of the shared micro-batch): every rank exchanges with the same rank of the
    other groups, its own cross-group process group.

    Fast and exact, but not fault tolerant: every group must reach every exchange (see the
    module docstring; use :class:`FileTransport` when groups may die).
    """

    def __init__(self, group: int, cross_group: Any, dp_group: Any, on_event: Callable[[str], None] | None = None,
                 per_rank: bool = False) -> None:
        super().__init__(group, on_event)
        self.cross, self.dp, self.per_rank = cross_group, dp_group, per_rank
        self.dp_rank = dist.get_rank(dp_group)
        self.pending: Any = None

    def publish(self, step: int, payload: Any, final: bool = False) -> None:
        self.pending = (step, payload)

    def collect(self, step: int) -> dict[int, Any]:
        box: list[Any] = [None]
        if self.dp_rank == 0 or self.per_rank:
            everyone: list[Any] = [None] * dist.get_world_size(self.cross)
            dist.all_gather_object(everyone, self.pending, group=self.cross)
            box = [{g: p for g, (s, p) in enumerate(everyone) if g != self.group and s == step}]
            self.sent += payload_bytes(self.pending[1]) * (len(everyone) - 1)
        if not self.per_rank:
            dist.broadcast_object_list(box, src=dist.get_global_rank(self.dp, 0), group=self.dp)
        got = box[0]
        if self.dp_rank == 0 or self.per_rank:
            self.received += sum(payload_bytes(p) for p in got.values())
        self._report(got, step, {})
        return got


_NAME = re.compile(r"^g(\d+)r(\d+)-(\d+)\.pt$")


class FileTransport(_Counting):
    """Snapshots in ``directory`` written atomically, read with a bounded wait (module docstring).

    Args:
        directory: the run's ``exchange/`` folder (shared by all groups).
        group: this group; ``writer``: whether this rank writes (data-parallel rank 0).
        channel: the data-parallel rank whose snapshots this rank writes and reads: 0 for
            weights (one copy per group), each rank's own for logits of its micro-batch slice.
            Files are ``g<group>r<channel>-<step>.pt``.
        options: :class:`~branchify.distributed.codistill.CodistillOptions` (groups, K,
            ``max_stale``, ``wait_s``, exchange mode).
        fingerprint: this run's config fingerprint; a peer snapshot with another one is an error.
        on_event: called with each log line.
    """

    def __init__(self, directory: str | Path, group: int, options: CodistillOptions, *, writer: bool = True,
                 fingerprint: str = "", on_event: Callable[[str], None] | None = None, keep: int = 3,
                 channel: int = 0) -> None:
        super().__init__(group, on_event)
        self.channel = channel
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.options, self.writer, self.fingerprint, self.keep = options, writer, fingerprint, keep
        self.dropped: set[int] = set()

    def _steps(self, g: int) -> list[int]:
        found = []
        for p in self.dir.glob(f"g{g}r{self.channel}-*.pt"):
            m = _NAME.match(p.name)
            if m and int(m.group(1)) == g and int(m.group(2)) == self.channel:
                found.append(int(m.group(3)))
        return sorted(found)

    def publish(self, step: int, payload: Any, final: bool = False) -> None:
        if not self.writer:
            return
        path = self._path(self.group, step)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:  # a whole file or none: written aside, then renamed over
            torch.save({"step": step, "final": final, "fingerprint": self.fingerprint, "payload": payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.sent += payload_bytes(payload)  # written once; each peer reads it (counted as received)
        for old in self._steps(self.group)[:-self.keep]:
            self._path(self.group, old).unlink(missing_ok=True)

    def _path(self, g: int, step: int) -> Path:
        return self.dir / f"g{g}r{self.channel}-{step}.pt"

    def _read(self, g: int, step: int) -> dict[str, Any] | None:
        try:
            snap = torch.load(self._path(g, step), weights_only=True)
        except (FileNotFoundError, RuntimeError, EOFError):
            return None  # deleted by its writer meanwhile: the caller looks again
        if snap.get("fingerprint") != self.fingerprint:
            from .codistill import CodistillError

            raise CodistillError(f"group {g}'s snapshot {self._path(g, step)} comes from a different config "
                                 f"(fingerprint {snap.get('fingerprint')} vs {self.fingerprint}); every group of "
                                 f"a run must be started from the same run directory and flags")
        return snap

    def _newest(self, g: int) -> dict[str, Any] | None:
        for s in reversed(self._steps(g)):
            snap = self._read(g, s)
            if snap is not None:
                return snap
        return None

    def collect(self, step: int) -> dict[int, Any]:
        peers = [g for g in range(self.options.groups) if g != self.group]
        deadline = time.monotonic() + self.options.wait_s
        got: dict[int, Any] = {}
        why: dict[int, str] = {}
        waiting = [g for g in peers if g not in self.dropped]
        weights = self.options.exchange == "weights"  # logits are only usable for this very step's images
        while True:
            for g in list(waiting):
                snap = self._read(g, step) if step in self._steps(g) else None
                newest = snap or (self._newest(g) if weights else None)
                if snap is not None or (newest is not None and (newest["final"] or newest["step"] > step)):
                    got[g] = (snap or newest)["payload"]  # weights: a finished or newer peer will not send step
                    waiting.remove(g)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        for g in peers:
            if g in got:
                continue
            newest = self._newest(g)
            lag = None if newest is None else (step - newest["step"]) // self.options.exchange_every
            if newest is not None and self.options.exchange == "weights" and lag <= self.options.max_stale:
                got[g] = newest["payload"]
            else:
                why[g] = ("sent nothing" if newest is None else
                          f"is ahead (logits for step {newest['step']}; only this step's are usable)" if lag < 0 else
                          f"is {lag} exchanges behind (last snapshot at step {newest['step']}; the limit is "
                          f"{self.options.max_stale if weights else 0}) or died")
        self.dropped = set(peers) - set(got)
        self.received += sum(payload_bytes(p) for p in got.values())
        self._report(got, step, why)
        return got
