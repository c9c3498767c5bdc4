"""Accuracy benchmark: every online-KD method side by side with the baseline, same data,
schedule and seeds, on CIFAR-style ResNet-32 with Fashion-MNIST-5k (5,000 stratified training
images, the full 10,000-image test set).

Runs are independent, so they go to a pool of worker processes (small models are launch-bound
on a GPU; several processes keep it busy). Each finished run is written to
``<out>/runs/<method>-seed<k>.json`` at once, so an interrupted benchmark keeps what it
finished; ``--summarise`` rebuilds the table from those files.

    python -m benchmarks.accuracy_gpu --epochs 60 --seeds 0,1,2 --workers 12 \\
        --out benchmarks/results/accuracy
    python -m benchmarks.accuracy_gpu --summarise --out benchmarks/results/accuracy
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import time
from pathlib import Path

import torch

from branchify.recipes.cli import format_table, machine, summarise
from branchify.recipes.config import RunConfig
from branchify.recipes.train import RunResult, train

METHODS = ["baseline", "dml", "cl_ilr", "one", "okddip", "tsa", "u_tsa", "ahbf"]

# Measured with hand-written models under these settings (see README): target accuracy, %.
HAND_WRITTEN_REFERENCE = {"baseline": 89.87, "dml": 90.69, "one": 89.88, "tsa": 90.01}


def base_config(args: argparse.Namespace) -> RunConfig:
    on_gpu = torch.cuda.is_available() and args.device in ("auto", "cuda")
    return RunConfig(model=args.model, dataset="fashion_mnist", epochs=args.epochs, batch_size=128,
                     lr=0.1, momentum=0.9, weight_decay=5e-4, lr_schedule="cosine", train_subset=5000,
                     device=args.device, amp=on_gpu, channels_last=on_gpu, eval_every=args.eval_every,
                     data_root=args.data_root)


def parse_variant(text: str) -> tuple[str, dict]:
    """``"dml:temperature=3"`` -> ``("dml", {"temperature": 3})``: a method with overrides.

    Keys that are RunConfig fields (``amp``, ``lr``...) change the run; others go to the method.
    """
    import yaml

    name, *pairs = text.split(":")
    args = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        args[key] = yaml.safe_load(value)
    return name, args


def _worker(job: tuple[dict, str, str]) -> str:
    cfg_dict, label, out = job
    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(cfg_dict)
    res = train(cfg, progress=False)
    res.config["method"] = label  # the variant's label, e.g. "dml:temperature=3"
    path = Path(out) / "runs" / f"{label.replace(':', '_').replace('=', '-')}-seed{cfg.seed}.json"
    path.write_text(json.dumps(res.to_dict(), default=str))
    return f"{label} seed {cfg.seed}: target {res.target_acc:.2f}% ({res.train_seconds:.0f}s)"


def load_runs(out: Path) -> list[RunResult]:
    runs = []
    for p in sorted((out / "runs").glob("*.json")):
        runs.append(RunResult(**json.loads(p.read_text())))
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(runs, key=lambda r: (order.get(r.config["method"].split(":")[0], 99), r.config["method"],
                                       r.config["seed"]))


def write_summary(out: Path, header: str) -> str:
    runs = load_runs(out)
    rows = summarise(runs)
    for r in rows:
        r["hand_written_reference"] = HAND_WRITTEN_REFERENCE.get(r["method"])
    table = format_table(rows)
    (out / "summary.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps({"header": header, "machine": machine(), "summary": rows,
                                                  "runs": [r.to_dict() for r in runs]}, indent=2, default=str))
    from branchify.viz import plot_curves

    methods = list(dict.fromkeys(r.config["method"] for r in runs))
    plot_curves({m: [r.history for r in runs if r.config["method"] == m] for m in methods},
                out / "accuracy.png")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods; 'name:key=value' adds overrides (a variant)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", default="resnet32", help="branchify.recipes.zoo model name")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="benchmarks/results/accuracy")
    p.add_argument("--summarise", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cfg = base_config(args)
    header = (f"Fashion-MNIST-5k (5,000 stratified train images, full 10,000 test), {cfg.model}, "
              f"{cfg.epochs} epochs, cosine LR 0.1, batch 128, wd 5e-4, "
              f"{'bf16 autocast + channels_last, ' if cfg.amp else ''}machine: {machine().get('gpu', 'CPU')}")
    if not args.summarise:
        # Commas inside brackets belong to a variant's value ("ahbf:lambdas=[2, 4]").
        methods = [m.strip() for m in re.split(r",(?![^\[]*\])", args.methods)]
        seeds = [int(s) for s in args.seeds.split(",")]
        # Longest runs first so the pool's tail is short.
        cost = {"ahbf": 5, "tsa": 4, "u_tsa": 4, "okddip": 3, "dml": 3, "one": 2, "cl_ilr": 2, "baseline": 1}
        jobs = []
        run_fields = set(RunConfig.__dataclass_fields__)
        for label in methods:
            name, overrides = parse_variant(label)
            config_changes = {k: v for k, v in overrides.items() if k in run_fields}
            method_changes = {k: v for k, v in overrides.items() if k not in run_fields}
            for s in seeds:
                run_cfg = cfg.replace(method=name, seed=s, method_args={**cfg.method_args, **method_changes},
                                      **config_changes)
                jobs.append((run_cfg.to_dict(), label, str(out)))
        jobs.sort(key=lambda j: -cost.get(j[0]["method"], 1))
        t0 = time.time()
        if args.workers > 1:
            with mp.get_context("spawn").Pool(args.workers) as pool:
                for line in pool.imap_unordered(_worker, jobs):
                    print(f"[{time.time() - t0:5.0f}s] {line}", flush=True)
        else:
            for job in jobs:
                line = _worker(job)
                print(f"[{time.time() - t0:5.0f}s] {line}", flush=True)
    print(header + "\n\n" + write_summary(out, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
