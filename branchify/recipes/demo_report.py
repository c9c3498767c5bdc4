"""What the demo prints and writes: the time estimate, the aligned table, summary.md, results.json, plots."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .regime import Regime

REFERENCE: dict[str, tuple[float, float]] = {
    "dml": (0.99, 0.19), "cl_ilr": (-0.30, 0.24), "one": (0.65, 0.22), "okddip": (0.23, 0.28),
    "tsa": (0.49, 0.29), "u_tsa": (0.57, 0.34), "ahbf": (0.60, 0.21),
}
"""Paired gain over the baseline (mean, standard error; points) of each method in the CPU benchmark's
regime over 5 seeds, copied from ``benchmarks/results/accuracy_cpu/results.json`` (``summary``,
branchify implementation; ``python -m benchmarks.accuracy_cpu run`` measured it on a 2-core CPU)."""


def _step_seconds(make: Callable[[], Any], regime: Regime, steps: int = 3) -> float:
    torch.manual_seed(0)
    trainee = make()
    trainee.set_epoch(regime.epochs - 1)
    opt = torch.optim.SGD(trainee.model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(regime.batch_size, 1, regime.image_size, regime.image_size)
    y = torch.randint(0, 10, (regime.batch_size,))
    times = []
    for i in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        loss = trainee.loss(x, y, regime.epochs - 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def estimate(regime: Regime, methods: list[str], workers: int, make_trainee: Callable[[str, Regime], Any]) -> str:
    """Time a few steps of every method on this machine (one thread) and predict the whole run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = math.ceil(regime.train_size / regime.batch_size) * regime.epochs
        per = {m: _step_seconds(lambda m=m: make_trainee(m, regime), regime) * steps for m in methods}
    finally:
        torch.set_num_threads(threads)
    lanes = [0.0] * max(1, workers)
    for m in sorted(per, key=per.get, reverse=True):  # longest first onto the least-loaded process
        lanes[lanes.index(min(lanes))] += per[m]
    detail = ", ".join(f"{m} {s / 60:.1f}" for m, s in per.items())
    return (f"Training {len(methods)} runs ({regime.name}: ResNet-{regime.depth}, {regime.train_size} images at "
            f"{regime.image_size}x{regime.image_size}, {regime.epochs} epochs) in {max(1, workers)} processes: "
            f"about {max(lanes) / 60:.1f} min on this machine (per run, min: {detail}; measured from a few "
            f"steps, slower if the machine is busy).")


def _rows(records: list[dict]) -> list[dict]:
    base = next(r for r in records if r["method"] == "baseline")
    rows = []
    for r in records:
        gain = r["target_acc"] - base["target_acc"]
        ref = REFERENCE.get(r["method"])
        rows.append({"method": r["method"], "target": f"{r['target_acc']:.2f}",
                     "vs baseline": "" if r["method"] == "baseline" else f"{gain:+.2f}",
                     "5-seed gain": "" if ref is None else f"{ref[0]:+.2f} ± {ref[1]:.2f}",
                     "ensemble": f"{r['ensemble_acc']:.2f}", "trained params": f"{r['trained_params'] / 1e3:.0f}K",
                     "deployed params": f"{r['export']['params'] / 1e3:.0f}K", "train s": f"{r['train_seconds']:.0f}"})
    return rows


def _aligned(rows: list[dict]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(width[c]) if i else c.ljust(width[c]) for i, c in enumerate(cols))]
    lines.append("  ".join("-" * width[c] for c in cols))
    for r in rows:
        lines.append("  ".join(r[c].rjust(width[c]) if i else r[c].ljust(width[c]) for i, c in enumerate(cols)))
    return "\n".join(lines)


def _markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows])


ONE_SEED = ("One seed shows what one run of each method does on this data; it cannot tell a real gain of "
            "under about a point from seed-to-seed noise (the 5-seed column is the evidence: mean paired gain "
            "over 5 seeds, +- its standard error).")


def report(records: list[dict], regime: Regime, seed: int, wall: float, out: Path, *, smoke: bool = False) -> str:
    """Write summary.md, results.json and the plots into ``out``; return the text to print."""
    from .. import Spec, viz

    rows = _rows(records)
    head = (f"{regime.name}, seed {seed}: test accuracy (%) of the deployed model on "
            f"{regime.test_size or 10000} Fashion-MNIST test images; {wall / 60:.1f} min wall")
    exports = [f"  {r['method']}: {r['export']['path']}/model.safetensors reloaded strictly into "
               f"{r['export']['class']} (max |diff| to the trained leaf {r['export']['max_abs_diff_to_leaf']:.1e})"
               for r in records]
    text = "\n".join([head, "", _aligned(rows), "", ONE_SEED, "", "Exported targets:", *exports])
    (out / "summary.md").write_text("\n".join([f"# Demo: {head}", "", _markdown(rows), "", ONE_SEED, ""]))
    (out / "results.json").write_text(json.dumps({"regime": regime.__dict__, "seed": seed, "runs": records},
                                                  indent=1, default=str))
    histories = {r["method"]: [r["history"]] for r in records}
    viz.plot_curves(histories, out / "accuracy.png",
                    title=f"Deployed-model test accuracy, {regime.name}, seed {seed}"
                    + (" (smoke run)" if smoke else ""))
    specs = {r["method"]: Spec.from_dict(r["spec"]) for r in records if "spec" in r}
    if specs:
        viz.draw_trees(specs, out / "trees.png")
    return text + f"\n\nWrote {out}/summary.md, results.json, accuracy.png, trees.png and exported/."
