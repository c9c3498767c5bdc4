"""Command line: train baselines and online-KD methods side by side and report them.

    python -m branchify.recipes.cli --config cifar100_resnet32_one
    python -m branchify.recipes.cli --dataset fashion_mnist --model resnet32 --methods baseline,dml,one,tsa \\
        --seeds 0,1,2 --epochs 60 --subset 5000 --out runs/fmnist5k
    python -m branchify.recipes.cli --resume runs/fmnist5k          # continue a killed run
    python -m branchify.recipes.cli --nproc 2 --methods one ...     # data parallel (DDP), see ddp.py

Writes into ``--out`` (see :mod:`branchify.recipes.rundir`): ``run.json`` (the plan),
``log.jsonl`` (one line per epoch and run, appended), ``checkpoints/<method>-seed<k>.pt``
(after every evaluation), ``results.json`` and ``summary.md`` (rewritten as each run finishes),
``accuracy.png`` (curves per method), ``trees.png`` (each method's tree) and
``exported/<method>-seed<k>/`` (the deployed model, safetensors, reloadable into the original
class). Every method, model and option is checked before anything trains; a folder that already
holds a run is refused (continue it with ``--resume DIR`` or pick a fresh ``--out``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..distributed import RankFailed, is_main, launched_by_torchrun, on_main, rank_world, shutdown
from . import ddp
from .checkpoint import CheckpointError, checkpoint_path
from .config import RunConfig
from .preflight import PreflightError, validate_run
from .rundir import (
    Results,
    RunDirError,
    RunPlan,
    append_log,
    check_fresh,
    check_resumable,
    format_table,
    machine,
    prepare,
    read_plan,
    summarise,
)
from .train import RunResult, resolve_device, train

__all__ = ["config_from_args", "format_table", "machine", "main", "parse_args", "run_comparison", "summarise"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="branchify-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file with RunConfig fields, or a bundled config name "
                                    "(e.g. cifar100_resnet32_one); flags override it")
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
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its checkpoints (its run.json gives the config; finished "
                        "runs are not retrained); flags may change only device and data_root")
    p.add_argument("--nproc", type=int, default=1,
                   help="train data-parallel (DDP) on N local processes: re-launches under torchrun "
                        "(gloo on CPU, nccl on CUDA); --batch-size is the global batch")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (torch.set_num_threads)")
    p.add_argument("--codistill", type=int, metavar="GROUPS",
                   help="codistillation: GROUPS model copies, each data parallel on --nproc/GROUPS processes, "
                        "distilling from each other (see branchify.recipes.codistill_cli)")
    p.add_argument("--exchange-every", type=int, metavar="K", help="codistillation: steps between exchanges")
    p.add_argument("--group", type=int, help="codistillation: run (or --resume) only this group")
    p.add_argument("--no-plots", action="store_true", help="skip accuracy.png and trees.png (no matplotlib)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """``base`` (or ``--config``, or the defaults) with the flags and ``--set`` items applied."""
    import yaml

    cfg = base if base is not None else RunConfig.from_yaml(args.config) if args.config else RunConfig()
    flags = {"model": args.model, "dataset": args.dataset, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": args.lr_schedule,
             "train_subset": args.subset, "device": args.device, "amp": args.amp,
             "channels_last": args.channels_last, "fake_data": args.fake_data,
             "max_steps": args.max_steps, "eval_every": args.eval_every}
    changes: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    method_args = dict(cfg.method_args)
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. --set fake_batches=2), got {item!r}")
        key, value = item.split("=", 1)
        if key.startswith("method_args."):
            method_args[key.split(".", 1)[1]] = yaml.safe_load(value)
        else:
            changes[key] = yaml.safe_load(value)
    changes["method_args"] = method_args
    return cfg.replace(**changes)


def run_comparison(base: RunConfig, methods: list[str], seeds: list[int], out: str | Path,
                   progress: bool = True, *, resume: bool = False,
                   plots: bool = True) -> tuple[list[RunResult], list[dict[str, Any]]]:
    """Train every method x seed on the same data/schedule; write log, results, table, plots.

    Everything is validated first (:func:`~branchify.recipes.preflight.validate_run`); ``out``
    must not hold a run unless ``resume`` (then finished runs are read back from their final
    checkpoints and unfinished ones continue). ``results.json``/``summary.md`` are rewritten
    after every finished run; ``plots=False`` skips ``accuracy.png``/``trees.png``. Under torchrun
    every rank calls this; rank 0 writes and prints.

    Examples:
        >>> cfg = RunConfig(fake_data=True, epochs=1)                                    # doctest: +SKIP
        >>> run_comparison(cfg, ["baseline", "one"], [0], "runs/smoke")                  # doctest: +SKIP
    """
    methods = validate_run(base, methods, seeds)
    plan = RunPlan(base, methods, seeds)
    out = on_main(lambda: prepare(out, plan, resume))
    main_rank = is_main()
    results = Results(out, _header(base, seeds), world_size=rank_world()[1])
    for m in methods:
        for s in seeds:
            cfg = base.replace(method=m, seed=s)
            res = train(cfg, progress=progress, log=lambda record: append_log(out, record),
                        export_dir=out / "exported" / f"{m}-seed{s}", checkpoint=checkpoint_path(out, m, s),
                        resume=resume)
            if main_rank:
                results.add(res)
                acc = f"target {res.target_acc:.2f}%  ensemble {res.ensemble_acc:.2f}%"
                again = f", resumed after epoch {res.resumed_from_epoch}" if res.resumed_from_epoch else ""
                print(f"[{m} seed {s}] {acc}  ({res.train_seconds:.0f}s{again})", flush=True)
    rows = summarise(results.runs)
    specs: dict[str, Any] = {}
    if main_rank and plots:
        from ..viz import draw_trees, plot_curves

        histories = {m: [r.history for r in results.runs if r.config["method"] == m] for m in methods}
        plot_curves(histories, out / "accuracy.png")
        specs = {m: _spec_of(m, base) for m in methods if m != "baseline"}
        if specs:
            draw_trees(specs, out / "trees.png")
    if main_rank:
        print("\n" + results.header + "\n\n" + format_table(rows))
        print(f"\nwrote {out}/summary.md, results.json, log.jsonl, checkpoints/" + (", accuracy.png" if plots else "")
              + (", trees.png" if specs else "") + ", exported/<method>-seed<k>/")
    return results.runs, rows


def _header(base: RunConfig, seeds: list[int]) -> str:
    device = str(resolve_device(base.device))
    test = f"first {base.test_subset} test images" if base.test_subset else "full test set"
    world = rank_world()[1]
    return (f"{base.dataset} ({'subset ' + str(base.train_subset) if base.train_subset else 'full'} train, "
            f"{test}), {base.model}, {base.epochs} epochs, {base.lr_schedule} LR, seeds {seeds}, "
            f"device {device}" + (f" x {world} processes (DDP)" if world > 1 else ""))

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


def plan_from_args(args: argparse.Namespace) -> tuple[RunPlan, Path, bool]:
    """(plan, run directory, resume?) from the parsed flags; ``--resume`` starts from ``run.json``."""
    def items(text: str | None) -> list[str] | None:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    def as_seeds(text: str | None) -> list[int] | None:
        try:
            return [int(t) for t in items(text)] if text else None
        except ValueError:
            raise ValueError(f"--seeds expects comma-separated integers, e.g. 0,1,2; got {text!r}") from None

    if args.resume:
        if args.config:
            raise RunDirError(f"--resume reads the config from {args.resume}/run.json; drop --config {args.config}")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise RunDirError(f"--out {args.out} and --resume {args.resume} differ; a resumed run writes into "
                              f"its own folder, so drop --out")
        stored = read_plan(args.resume)
        cfg = config_from_args(args, base=stored.config)
        return (RunPlan(cfg, items(args.methods) or stored.methods, as_seeds(args.seeds) or stored.seeds),
                Path(args.resume), True)
    cfg = config_from_args(args)
    out = Path(args.out or f"runs/{cfg.dataset}-{cfg.model}")
    return RunPlan(cfg, items(args.methods) or [cfg.method], as_seeds(args.seeds) or [cfg.seed]), out, False


def _fail(exc: BaseException) -> int:
    print(f"branchify-train: error: {exc}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``branchify-train``: 0 on success, 2 (with the reason on stderr) for a bad setup or checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from .codistill_cli import main as codistill_main
    from .codistill_cli import wants_codistill

    if wants_codistill(args):
        return codistill_main(args, argv, plan_from_args, _fail)
    try:
        plan, out, resume = plan_from_args(args)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.nproc > 1 and not launched_by_torchrun():
            validate_run(plan.config, plan.methods, plan.seeds)  # fail here, not once per rank
            if resume:
                check_resumable(out, plan)
            else:
                check_fresh(out)
            return ddp.launch(argv, args.nproc)
        if args.nproc > 1 and world != args.nproc:
            raise ValueError(f"--nproc {args.nproc} but torchrun started {world} processes; drop --nproc under "
                             f"torchrun (its --nproc_per_node decides)")
    except (ValueError, FileNotFoundError) as exc:  # flags, config files, names, run directory
        return _fail(exc)
    try:
        ddp.setup(plan.config.device)
        progress = not args.no_progress and sys.stderr.isatty()
        run_comparison(plan.config, plan.methods, plan.seeds, out, progress=progress, resume=resume,
                       plots=not args.no_plots)
    except (PreflightError, RunDirError, CheckpointError, RankFailed) as exc:
        return _fail(exc)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
