"""The run directory of ``branchify-train``: what was planned, what finished, never overwritten.

Layout of ``--out DIR``:

* ``run.json``: the plan (base config, methods, seeds) - what ``--resume DIR`` continues;
* ``log.jsonl``: one line per epoch and run, appended (a resume first appends an
  ``{"event": "resume", ...}`` line; records after it supersede earlier ones of that epoch);
* ``checkpoints/<method>-seed<k>.pt``: see :mod:`branchify.recipes.checkpoint`;
* ``results.json`` / ``summary.md``: rewritten (atomically) each time a (method, seed) finishes,
  so they always hold every finished run;
* ``exported/<method>-seed<k>/``, ``accuracy.png``, ``trees.png``.

A directory that already holds any of these is refused (:class:`RunDirError`) unless resumed:
nothing of an earlier run is ever truncated or overwritten.

Examples:
    >>> plan = RunPlan(RunConfig(), ["baseline", "one"], [0])
    >>> prepare("runs/new", plan, resume=False)          # writes runs/new/run.json    # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import BranchifyError
from .checkpoint import RESUME_MAY_CHANGE, atomic_write_text, config_differences
from .config import RunConfig

RUN_FILE = "run.json"
OUTPUTS = (RUN_FILE, "log.jsonl", "results.json", "summary.md", "checkpoints", "exported")


class RunDirError(BranchifyError, ValueError):
    """An output directory that holds another run, or a resume that does not match its run."""


@dataclass
class RunPlan:
    """What one ``branchify-train`` call trains: ``config`` once per method x seed."""

    config: RunConfig
    methods: list[str]
    seeds: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "methods": self.methods, "seeds": self.seeds}


def existing_outputs(out: str | Path) -> list[str]:
    """Names in ``out`` that a run writes (empty for a fresh or missing directory)."""
    out = Path(out)
    return [name for name in OUTPUTS if (out / name).exists()]


def check_fresh(out: str | Path) -> None:
    """Raise :class:`RunDirError` if ``out`` already holds a run (nothing there is overwritten)."""
    found = existing_outputs(out)
    if found:
        raise RunDirError(f"{out} already holds a run ({', '.join(found)}); branchify-train never overwrites one. "
                          f"Continue it with --resume {out}, or pass a fresh --out folder")


def read_plan(run_dir: str | Path) -> RunPlan:
    """The :class:`RunPlan` saved in ``run_dir/run.json`` (for ``--resume``)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        what = "does not exist" if not Path(run_dir).exists() else f"has no {RUN_FILE}"
        raise RunDirError(f"cannot resume {run_dir}: it {what}, so it is not a branchify-train run directory; "
                          f"pass the --out folder of the run to continue")
    try:
        data = json.loads(path.read_text())
        return RunPlan(RunConfig.from_dict(data["config"]), list(data["methods"]), [int(s) for s in data["seeds"]])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"{path} is damaged ({type(exc).__name__}: {exc}); it should hold the keys config, "
                          f"methods and seeds") from None


def check_resumable(run_dir: str | Path, plan: RunPlan) -> None:
    """Raise :class:`RunDirError` if ``plan``'s config differs from the one ``run_dir`` started with."""
    stored = read_plan(run_dir).config.to_dict()
    diffs = [d.replace("(checkpoint)", "(run)") for d in config_differences(stored, plan.config.to_dict())]
    if diffs:
        raise RunDirError(f"--resume {run_dir}: the flags change the run's config: {'; '.join(diffs)}. A resumed run "
                          f"keeps its config (only {', '.join(RESUME_MAY_CHANGE)} may change); train a new config "
                          f"into a fresh --out folder")


def prepare(out: str | Path, plan: RunPlan, resume: bool) -> Path:
    """Make ``out`` ready: a fresh directory with ``run.json``, or the checked run to resume."""
    out = Path(out)
    if resume:
        check_resumable(out, plan)
    else:
        check_fresh(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUN_FILE, json.dumps(plan.to_dict(), indent=2, default=str))
    return out


def append_log(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``run_dir/log.jsonl`` (flushed, so a kill loses no finished line)."""
    with (Path(run_dir) / "log.jsonl").open("a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summarise(results: list) -> list[dict[str, Any]]:
    """Mean +- std over seeds per method (population std of the seeds' final accuracies)."""
    rows = []
    methods = list(dict.fromkeys(r.config["method"] for r in results))
    for m in methods:
        rs = [r for r in results if r.config["method"] == m]

        def ms(values: list[float]) -> tuple[float, float]:
            return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)

        t_mean, t_std = ms([r.target_acc for r in rs])
        e_mean, e_std = ms([r.ensemble_acc for r in rs])
        rows.append({"method": m, "seeds": len(rs), "target_acc": t_mean, "target_std": t_std,
                     "ensemble_acc": e_mean, "ensemble_std": e_std,
                     "diversity": statistics.mean(r.diversity for r in rs),
                     "deployed_params": rs[0].deployed_params, "trained_params": rs[0].trained_params,
                     "train_seconds": statistics.mean(r.train_seconds for r in rs)})
    base = next((r for r in rows if r["method"] == "baseline"), None)
    for r in rows:
        r["vs_baseline"] = r["target_acc"] - base["target_acc"] if base else None
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The markdown comparison table of :func:`summarise`'s rows."""
    head = ("| method | target acc (%) | vs baseline | ensemble acc (%) | peer diversity | "
            "deployed params | trained params | train time (s) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        vs = "" if r["vs_baseline"] is None or r["method"] == "baseline" else f"{r['vs_baseline']:+.2f}"

        def acc(mean: float, std: float) -> str:  # no spread is shown when one seed measured none
            return f"{mean:.2f} ± {std:.2f}" if r["seeds"] > 1 else f"{mean:.2f}"

        lines.append(f"| {r['method']} | {acc(r['target_acc'], r['target_std'])} | {vs} | "
                     f"{acc(r['ensemble_acc'], r['ensemble_std'])} | {r['diversity']:.3f} | "
                     f"{r['deployed_params'] / 1e6:.3f}M | {r['trained_params'] / 1e6:.3f}M | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """What ran a job, for its results file (the recipes' and every benchmark's): Python, torch,
    platform, processor, CPU count, torch threads, and the GPU and CUDA version when it ran on
    one - ``device`` when given (then also named), else whether CUDA is available at all.

    Examples:
        >>> sorted(machine(torch.device("cpu")))
        ['cpu_count', 'device', 'platform', 'processor', 'python', 'torch', 'torch_threads']
    """
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        info["device"] = str(device)
    if (device.type == "cuda") if device is not None else torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


class Results:
    """``results.json`` and ``summary.md`` of a run directory, rewritten as each run finishes.

    Examples:
        >>> results = Results("runs/x", header="fashion_mnist, resnet20")     # doctest: +SKIP
        >>> results.add(train(cfg))       # both files now hold this run      # doctest: +SKIP
    """

    def __init__(self, run_dir: str | Path, header: str, world_size: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.header = header
        self.world_size = world_size
        self.runs: list = []

    def add(self, result: Any) -> None:
        """Record a finished run and rewrite both files (atomically)."""
        self.runs.append(result)
        self.write()

    def table(self) -> str:
        return format_table(summarise(self.runs))

    def write(self) -> None:
        rows = summarise(self.runs)
        atomic_write_text(self.run_dir / "summary.md", self.header + "\n\n" + format_table(rows) + "\n")
        atomic_write_text(self.run_dir / "results.json", json.dumps(
            {"header": self.header, "machine": {**machine(), "world_size": self.world_size}, "summary": rows,
             "runs": [r.to_dict() for r in self.runs]}, indent=2, default=str))
