"""The README demo: does online KD give a better deployed model, on real data, on a CPU?

Trains the CPU benchmark's regime (a CIFAR ResNet-14 on 500 Fashion-MNIST images at 14x14, 200
epochs; :data:`branchify.recipes.regime.CPU_REGIME`) as a plain baseline and with the methods
whose 5-seed gain is clearest, one process per method (one thread each), all from the same data,
order and seed. It prints an estimate before it starts and a progress bar per method, then an
aligned table with the benchmark's 5-seed reference beside this run's single-seed numbers, and
writes ``summary.md``, ``results.json``, ``accuracy.png``, ``trees.png`` and every method's
exported target (reloaded strictly into the original class and checked against the leaf).

    python -m branchify.recipes.demo                    # ~4 min of training, 5.7 min wall, on an idle 2-core CPU
    python -m branchify.recipes.demo --methods baseline,dml --epochs 100
    python -m branchify.recipes.demo --smoke            # seconds: tiny subset, 1 epoch (what CI runs)
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..export import load_deployed, save_deployed
from .demo_report import REFERENCE, estimate, report
from .regime import CPU_REGIME, BranchifyTrainee, PlainTrainee, Regime, load_data, train_run

DEFAULT_METHODS = "baseline,dml,one,ahbf"  # the clearest 5-seed gains (README Results)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated: baseline and branchify presets")
    p.add_argument("--epochs", type=int, default=CPU_REGIME.epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="methods trained at once")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the usual places)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--smoke", action="store_true", help="tiny and fast (CI)")
    return p.parse_args(argv)


def check_methods(names: list[str]) -> None:
    """Every name must be ``baseline`` or a preset: fail before anything trains, naming the nearest."""
    from ..methods import get_preset

    if not names or names[0] != "baseline":
        raise SystemExit("--methods must start with baseline (every method is compared with it)")
    for name in names[1:]:
        get_preset(name)  # raises MethodError with the nearest names


def _trainee(method: str, regime: Regime):
    return PlainTrainee(regime) if method == "baseline" else BranchifyTrainee(method, regime)


def _job(args: tuple) -> dict[str, Any]:
    """One method in its own process: train, export, save, reload strictly, compare."""
    method, regime_dict, seed, root, out, position = args
    torch.set_num_threads(1)
    regime = Regime(**regime_dict)
    box: dict[str, Any] = {}
    record = train_run(regime, lambda: box.setdefault("t", _trainee(method, regime)), seed, method=method,
                       implementation="branchify" if method != "baseline" else "plain", data_root=root,
                       progress=position)
    trainee = box["t"]
    deployed = trainee.model if method == "baseline" else trainee.model.export()
    record["export"] = _save_and_check(deployed, trainee, regime, seed, root, Path(out) / "exported" / method)
    if method != "baseline":
        record["spec"] = trainee.model.spec.to_dict()
        record["split_reason"] = trainee.model.split_reason
    return record


def _save_and_check(deployed: torch.nn.Module, trainee, regime: Regime, seed: int, root, folder: Path) -> dict:
    """Save with safetensors, reload into a fresh instance of the original class, compare outputs."""
    from .regime import net_fn

    spec = getattr(trainee.model, "spec", None)
    save_deployed(deployed, folder, format="safetensors", leaf=trainee.target if spec is not None else None,
                  spec=spec, extra={"depth": regime.depth, "num_classes": 10, "in_channels": 1,
                                    "image_size": regime.image_size})
    fresh = load_deployed(folder, net_fn(regime)())
    x = next(iter(load_data(replace(regime, test_size=64), seed, root)[1]))[0]
    trainee.model.eval(), fresh.eval()
    with torch.no_grad():
        leaf = trainee.leaves(x)[trainee.target]
        gap = float((fresh(x) - leaf).abs().max())
    return {"path": str(folder), "class": type(fresh).__name__, "max_abs_diff_to_leaf": gap,
            "params": sum(p.numel() for p in fresh.parameters())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_methods(methods)
    regime = replace(CPU_REGIME, epochs=args.epochs)
    if args.smoke:
        regime = replace(regime, name="smoke", train_size=100, epochs=1, eval_points=1, test_size=500)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_data(regime, args.seed, args.data_root)  # the data must be there before any process starts
    print(estimate(regime, methods, args.workers, _trainee), flush=True)
    jobs = [(m, asdict(regime), args.seed, args.data_root, str(out), i) for i, m in enumerate(methods)]
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(max(1, min(args.workers, len(jobs))), maxtasksperchild=1) as pool:
        records = pool.map(_job, jobs)
    print("\n" * len(jobs))  # below the progress bars
    print(report(records, regime, args.seed, time.perf_counter() - t0, out, smoke=args.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["DEFAULT_METHODS", "REFERENCE", "check_methods", "main"]
