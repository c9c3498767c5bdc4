"""Shared benchmark plumbing: machine info, training steps and their timing, paired statistics over
seeds, a process pool for independent runs, JSON results and tables."""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from branchify.recipes.rundir import machine


def machine_info(device: torch.device) -> dict:
    """The machine a benchmark ran on (the package's one description, ``recipes.rundir.machine``)."""
    return machine(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgd_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], lr: float = 0.01) -> Callable[[], None]:
    """One full training step of ``model`` as a function: ``loss_fn()`` (forward + loss), zeroed
    gradients, backward, a step of SGD with momentum 0.9 (made here, so its state lives with the step).

    Examples:
        >>> net = torch.nn.Linear(2, 1)
        >>> step = sgd_step(net, lambda: net(torch.ones(1, 2)).sum())
        >>> before = net.bias.detach().clone(); step()
        >>> bool(net.bias.detach() < before)
        True
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, the device synchronised before and after (CUDA's queue drained).

    Examples:
        >>> timed_ms(lambda: None, torch.device("cpu")) >= 0.0
        True
    """
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def interleaved_medians(fns: dict[str, Callable[[], None]], reps: int, warmup: int,
                        device: torch.device) -> dict[str, dict]:
    """Time each function ``reps`` times, round-robin (so drift hits all alike); medians in ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed_ms(fn, device))
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "reps": len(v)}
            for k, v in times.items()}


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value).

    Examples:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
        >>> mean_std([4.0])
        (4.0, 0.0)
    """
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for a single value).

    Examples:
        >>> mean_se([1.0, 2.0, 3.0, 4.0])[1] == statistics.stdev([1.0, 2.0, 3.0, 4.0]) / 2
        True
    """
    m, sd = mean_std(xs)
    return m, sd / math.sqrt(len(xs))


def paired_differences(runs: dict[int, Any], base: dict[int, Any], key: str | None = None) -> list[float]:
    """``runs[s] - base[s]`` for every seed ``s`` in both, in seed order: per-seed paired differences.
    With ``key`` the runs are records and their ``key`` fields are compared.

    Examples:
        >>> paired_differences({2: 5.0, 0: 3.0, 1: 4.0}, {0: 1.0, 2: 1.5})
        [2.0, 3.5]
        >>> paired_differences({0: {"acc": 80.0}}, {0: {"acc": 79.5}}, key="acc")
        [0.5]
    """
    if key is None:
        return [runs[s] - base[s] for s in sorted(runs) if s in base]
    return [runs[s][key] - base[s][key] for s in sorted(runs) if s in base]


def paired_cell(row: dict, name: str, missing: str = "") -> str:
    """A table cell ``+m.mm ± s.ss`` of the row's ``<name>_mean`` and ``<name>_se``, ``missing`` without them.

    Examples:
        >>> paired_cell({"gain_mean": 1.234, "gain_se": 0.5}, "gain")
        '+1.23 ± 0.50'
        >>> paired_cell({}, "gain", "-")
        '-'
    """
    if f"{name}_mean" not in row:
        return missing
    return f"{row[f'{name}_mean']:+.2f} ± {row[f'{name}_se']:.2f}"


def run_pool(worker: Callable[[Any], str], jobs: list, workers: int, spawn_one: bool = True) -> None:
    """``worker(job)`` for every job in ``workers`` spawned processes, a fresh one per job (no run inherits
    another's state), printing each returned line as it finishes: ``[done/total seconds] line``. With one
    worker and ``spawn_one=False`` the jobs run here, one after the other.

    Examples:
        >>> run_pool(str.upper, ["a", "b"], workers=1, spawn_one=False)
        [1/2      0s] A
        [2/2      0s] B
    """
    t0 = time.perf_counter()

    def report(lines) -> None:
        for i, msg in enumerate(lines, 1):
            print(f"[{i}/{len(jobs)} {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    if workers <= 1 and not spawn_one:
        report(map(worker, jobs))
        return
    with mp.get_context("spawn").Pool(workers, maxtasksperchild=1) as pool:
        report(pool.imap_unordered(worker, jobs))


def write_results(path: str | Path, payload: dict, indent: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent))
    return path


def write_summary_files(out: Path, text: str, payload: dict, prefix: str = "") -> None:
    """``<prefix>summary.md`` (``text`` and a final newline) and ``<prefix>results.json`` (``payload``,
    indent 1) in ``out``, which is made if missing: what a driver's ``summarise`` step writes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{prefix}summary.md").write_text(text + "\n")
    write_results(out / f"{prefix}results.json", payload, indent=1)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table: the header, its ``|---|`` rule, then one line per row (each cell as ``str`` gives it).

    Examples:
        >>> print(markdown_table(["method", "seeds"], [["one", 5], ["dml", ""]]))
        | method | seeds |
        |---|---|
        | one | 5 |
        | dml |  |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns}
    head = "  ".join(c.ljust(widths[c]) for c in columns)
    lines = [head, "  ".join("-" * widths[c] for c in columns)]
    for r in rows:
        lines.append("  ".join(f"{r.get(c, '')}".ljust(widths[c]) for c in columns))
    return "\n".join(lines)
