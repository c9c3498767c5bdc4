"""Command line: train baselines and online-KD methods side by side and report them.

    python -m branchify.recipes.cli --config cifar100_resnet32_one
    python -m branchify.recipes.cli --dataset fashion_mnist --model resnet32 --methods baseline,dml,one,tsa \\
        --seeds 0,1,2 --epochs 60 --subset 5000 --out runs/fmnist5k

Writes into ``--out``: ``log.jsonl`` (one line per evaluated epoch and run), ``results.json``
(every run plus the summary with machine info), ``summary.md`` (the table), ``accuracy.png``
(curves per method), ``trees.png`` (each method's tree) and ``exported/<method>-seed<k>/``
(the deployed model, safetensors, reloadable into the original class).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .train import RunResult, resolve_device, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="branchify-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file with RunConfig fields, or a bundled config name (e.g. cifar100_resnet32_one); flags override it")
    p.add_argument("--methods", help="comma-separated: baseline and/or branchify method names")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--model")
    p.add_argument("--dataset", choices=["fashion_mnist", "cifar10", "cifar100"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-schedule", choices=["cosine", "step"])
    p.add_argument("--subset", type=int, help="seeded stratified training subset size")
    p.add_argument("--device")
    p.add_argument("--amp", action="store_true", default=None, help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", default=None)
    p.add_argument("--fake-data", action="store_true", default=None, help="random data (smoke test)")
    p.add_argument("--max-steps", type=int, help="cap steps per epoch (smoke test)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any RunConfig field or method_args.NAME (YAML value), repeatable")
    p.add_argument("--out", default=None, help="output directory (default runs/<dataset>-<model>)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    import yaml

    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    flags = {"model": args.model, "dataset": args.dataset, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": args.lr_schedule,
             "train_subset": args.subset, "device": args.device, "amp": args.amp,
             "channels_last": args.channels_last, "fake_data": args.fake_data,
             "max_steps": args.max_steps, "eval_every": args.eval_every}
    changes: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    method_args = dict(cfg.method_args)
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key.startswith("method_args."):
            method_args[key.split(".", 1)[1]] = yaml.safe_load(value)
        else:
            changes[key] = yaml.safe_load(value)
    changes["method_args"] = method_args
    return cfg.replace(**changes)


def summarise(results: list[RunResult]) -> list[dict[str, Any]]:
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


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_comparison(base: RunConfig, methods: list[str], seeds: list[int], out: str | Path,
                   progress: bool = True) -> tuple[list[RunResult], list[dict[str, Any]]]:
    """Train every method x seed on the same data/schedule; write log, results, table, plots."""
    from branchify.viz import draw_trees, plot_curves

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    log_path.write_text("")

    def log(record: dict) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    results: list[RunResult] = []
    specs: dict[str, Any] = {}
    for m in methods:
        for s in seeds:
            cfg = base.replace(method=m, seed=s)
            res = train(cfg, progress=progress, log=log, export_dir=out / "exported" / f"{m}-seed{s}")
            results.append(res)
            acc = f"target {res.target_acc:.2f}%  ensemble {res.ensemble_acc:.2f}%"
            print(f"[{m} seed {s}] {acc}  ({res.train_seconds:.0f}s)", flush=True)
    rows = summarise(results)
    table = format_table(rows)
    device = str(resolve_device(base.device))
    test = f"first {base.test_subset} test images" if base.test_subset else "full test set"
    header = (f"{base.dataset} ({'subset ' + str(base.train_subset) if base.train_subset else 'full'} train, "
              f"{test}), {base.model}, {base.epochs} epochs, {base.lr_schedule} LR, seeds {seeds}, "
              f"device {device}")
    (out / "summary.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"header": header, "machine": machine(), "summary": rows, "runs": [r.to_dict() for r in results]},
        indent=2, default=str))
    histories = {m: [r.history for r in results if r.config["method"] == m] for m in methods}
    plot_curves(histories, out / "accuracy.png")
    for m in methods:
        if m != "baseline":
            specs[m] = _spec_of(m, base)
    if specs:
        draw_trees(specs, out / "trees.png")
    print("\n" + header + "\n\n" + table)
    print(f"\nwrote {out}/summary.md, results.json, log.jsonl, accuracy.png"
          + (", trees.png" if specs else "") + f", exported/<method>-seed<k>/")
    return results, rows


def _spec_of(method: str, cfg: RunConfig):
    """The tree a method builds for this config (built on a throwaway model)."""
    import branchify as bf
    from .data import DATASETS
    from .zoo import build_model

    meta = DATASETS[cfg.dataset]
    net = build_model(cfg.model, meta.num_classes, meta.in_channels)
    args = {k: v for k, v in cfg.method_args.items()}
    model, _ = bf.method(method, net, **args)
    return model.spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    methods = args.methods.split(",") if args.methods else [cfg.method]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [cfg.seed]
    out = args.out or f"runs/{cfg.dataset}-{cfg.model}"
    run_comparison(cfg, methods, seeds, out, progress=not args.no_progress and sys.stderr.isatty())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
