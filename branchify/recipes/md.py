"""MD (cross-architecture online distillation) on Fashion-MNIST: independent training vs MD.

Trains two or more different architectures from ``branchify.recipes.zoo`` twice from the same
initialisation and data order - once independently (CE only), once with MD's protocol
(``T_in`` independent epochs, then ``T_d`` epochs against fixed accuracy-weighted soft labels,
repeated) - and prints each peer's accuracy side by side, plus the peers' ensemble.

    python -m branchify.recipes.md                           # CPU: resnet20 + mobilenetv2_0.5, 1000 images, 8 epochs
    python -m branchify.recipes.md --models resnet20,mobilenetv2_0.5,vgg16 --subset 5000 --epochs 160 --t-in 10 --t-d 30
    python -m branchify.recipes.md --fixed-weights           # also the ablation alpha = 1, beta = 2
    python -m branchify.recipes.md --runs md                 # only the MD run (the MD benchmark runs one kind per job)
    torchrun --nproc_per_node 2 -m branchify.recipes.md --distributed    # one peer per rank (gloo / nccl)
    python -m branchify.recipes.md --smoke                   # seconds: tiny subset, 3 epochs

The CPU default is a demonstration of the protocol, not of MD's benefit: with a budget of a
few epochs the fixed soft labels come from barely trained peers (one cycle, computed after
``T_in = 3`` epochs) and pull the students toward a teacher weaker than where independent
training ends. The paper's setting is ``T_in = 10, T_d = 30`` repeated over a full CIFAR schedule.
The KL term is the paper's Eq. 9, without a t^2 factor; ``--kd-t2`` multiplies it by t^2 (the
other methods' convention). Over 3 seeds of the CPU default (README) the t^2 factor (with beta up
to 2 the KL term then weighs up to 18 against alpha <= 1) costs MD 11-12 points against
independent training, Eq. 9 about one.

Each run kind (``--runs``: ``independent``, ``md``, ``md_fixed``) builds its peers and data order
from ``--seed`` alone, so a kind run on its own trains like it does next to the others.

Writes ``--out`` (default ``runs/md``): ``results.json`` (config, machine, data sizes, per-peer and ensemble
accuracies, MD's weights per cycle, alpha/beta per epoch, histories) and ``summary.md``.
With ``--checkpoint-dir`` every rank checkpoints each run after every epoch and a restarted
command resumes where it stopped (including the current cycle's soft labels).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

import branchify as bf

from ..distributed import assign_peers, init_from_env
from ..md import CollectiveExchange, LocalExchange, MDTrainer
from ..schedules import IntervalSchedule
from .data import DATASETS, TensorLoader, load_cifar, load_fashion_mnist, stratified_subset
from .rundir import machine
from .zoo import build_model, count_parameters

RUNS = ("independent", "md", "md_fixed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="branchify.recipes.md", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet20,mobilenetv2_0.5", help="comma-separated branchify.recipes.zoo names")
    p.add_argument("--dataset", default="fashion_mnist", choices=sorted(DATASETS))
    p.add_argument("--subset", type=int, default=1000, help="stratified training images (0 = all)")
    p.add_argument("--val", type=int, default=0,
                   help="hold out this many training images as MD's validation split "
                        "(0: the weights use training accuracy)")
    p.add_argument("--test-subset", type=int, default=2000, help="stratified test images (0 = all)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--t-in", type=int, default=3, help="independent epochs per cycle (paper: 10 on CIFAR)")
    p.add_argument("--t-d", type=int, default=5, help="distillation epochs per cycle (paper: 30 on CIFAR)")
    p.add_argument("--temperature", type=float, default=3.0)
    p.add_argument("--runs", help=f"comma-separated run kinds out of {', '.join(RUNS)} "
                                  "(default: independent,md, plus md_fixed with --fixed-weights)")
    p.add_argument("--fixed-weights", action="store_true",
                   help="also run the ablation alpha = 1, beta = 2 (adds md_fixed to --runs)")
    p.add_argument("--kd-t2", action="store_true",
                   help="multiply the KL by t^2 (the other methods' convention); default: the paper's Eq. 9, no t^2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lrs", help="per-model learning rates, comma-separated (overrides --lr)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto = cuda if available (cuda:LOCAL_RANK when distributed)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--data-root", help="Fashion-MNIST / CIFAR folder (see branchify.recipes.data)")
    p.add_argument("--distributed", action="store_true", help="run under torchrun: the peers are split over ranks")
    p.add_argument("--checkpoint-dir", help="per-rank checkpoints; rerun the same command to resume")
    p.add_argument("--out", default="runs/md")
    p.add_argument("--smoke", action="store_true", help="tiny and fast (CI)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.runs = parse_runs(args.runs, args.fixed_weights)
    except ValueError as e:
        p.error(str(e))
    if args.smoke:
        args.subset, args.test_subset, args.epochs, args.t_in, args.t_d = 200, 200, 3, 1, 1
    return args


def parse_runs(text: str | None, fixed_weights: bool = False) -> list[str]:
    """``"md,independent"`` -> ``["independent", "md"]``: the run kinds, in :data:`RUNS` order.

    ``None`` is the default ``independent,md``; ``fixed_weights`` adds ``md_fixed``.

    Raises:
        ValueError: for an unknown or missing run kind; the message lists the valid ones.
    """
    names = ["independent", "md"] if text is None else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        what = f"unknown run kind(s) {', '.join(map(repr, unknown))}" if unknown else "no run kind given"
        raise ValueError(f"--runs: {what}; valid run kinds are: {', '.join(RUNS)}")
    if fixed_weights:
        names.append("md_fixed")
    return [k for k in RUNS if k in names]


# ---------------------------------------------------------------------- data
def load_data(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Train / soft-label / validation / test loaders over the same stratified subsets on every rank."""
    meta = DATASETS[args.dataset]
    subset = (args.subset + args.val) or None
    if args.dataset == "fashion_mnist":
        x, y, xt, yt = load_fashion_mnist(args.data_root, subset, args.seed)
    else:
        x, y, xt, yt = load_cifar(args.dataset, args.data_root, subset, args.seed)
    if args.val:
        val_idx = stratified_subset(y, args.val, args.seed + 1)
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[val_idx] = False
        xv, yv, x, y = x[val_idx], y[val_idx], x[keep], y[keep]
    if args.test_subset:
        t_idx = stratified_subset(yt, args.test_subset, args.seed)
        xt, yt = xt[t_idx], yt[t_idx]
    norm = {"mean": meta.mean, "std": meta.std, "device": device}
    return {
        "meta": meta,
        # Same seed on every rank: identical batches, as the single-process run sees them.
        "train": TensorLoader(x, y, args.batch_size, shuffle=True, seed=args.seed, augment=True,
                              crop_padding=meta.crop_padding, with_index=True, **norm),
        "soft": TensorLoader(x, y, 256, with_index=True, **norm),  # whole set, eval, no augmentation
        "val": TensorLoader(xv, yv, 256, **norm) if args.val else None,
        "test": TensorLoader(xt, yt, 256, **norm),
        "sizes": {"train": len(y), "val": args.val, "test": len(yt)},
    }


# ---------------------------------------------------------------------- one run
def build_peer(name: str, index: int, seed: int, meta, device: torch.device) -> torch.nn.Module:
    """Peer ``index``: the same initial weights in every run and whichever rank builds it."""
    torch.manual_seed(seed * 1000 + index)
    return build_model(name, meta.num_classes, meta.in_channels).to(device)


def run(kind: str, args: argparse.Namespace, models: list[str], mine: list[int], exchange, data: dict,
        device: torch.device) -> dict[str, Any]:
    """Train this process's peers for one run kind and return everything rank 0 needs for the table."""
    lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else [args.lr] * len(models)
    cohort = bf.Cohort([build_peer(models[i], i, args.seed, data["meta"], device) for i in mine],
                       names=[models[i] for i in mine])
    opts = [torch.optim.SGD(cohort.peer_parameters(j), lr=lrs[i], momentum=args.momentum,
                            weight_decay=args.weight_decay) for j, i in enumerate(mine)]
    total = args.epochs * len(data["train"])
    # Per-peer cosine LR schedule, stepped per batch.
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
              for o in opts]
    schedule = None if kind == "independent" else IntervalSchedule(args.t_in, args.t_d, gradual=kind == "md")
    ckpt = Path(args.checkpoint_dir) / kind if args.checkpoint_dir else None
    trainer = MDTrainer(cohort, opts, data["train"], soft_label_loader=data["soft"] if schedule else None,
                        schedule=schedule, temperature=args.temperature, val_loader=data["val"],
                        lr_schedulers=scheds, lr_step="step", peer_ids=mine, exchange=exchange, seed=args.seed,
                        kd_t2=args.kd_t2, checkpoint_dir=ckpt)
    t0 = time.perf_counter()
    history = trainer.fit(args.epochs, callback=lambda rec: _progress(kind, rec, exchange.rank))
    seconds = time.perf_counter() - t0
    probs, labels = trainer.predict(data["test"])
    return {"ids": mine, "probs": probs, "labels": labels, "history": history, "cycles": trainer.cycles,
            "seconds": seconds, "params": [count_parameters(p) for p in trainer.peers]}


def _progress(kind: str, rec: dict[str, Any], rank: int) -> None:
    if rank == 0:
        what = (rec["phase"] if rec["r"] is None
                else f"distill r={rec['r']} alpha={rec['alpha']:.2f} beta={rec['beta']:.2f}")
        losses = " ".join(f"{v:.3f}" for v in rec["loss"])
        print(f"[{kind}] epoch {rec['epoch'] + 1}: {what}  loss {losses}  ({rec['seconds']:.1f}s)", flush=True)


# ---------------------------------------------------------------------- report
def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the ranks' results of one run into global peer order."""
    probs, params, seconds, histories = {}, {}, [], {}
    for part in parts:
        for j, i in enumerate(part["ids"]):
            probs[i], params[i] = part["probs"][j], part["params"][j]
            histories[i] = [{**h, "loss": h["loss"][j]} for h in part["history"]]
        seconds.append(part["seconds"])
    ids = sorted(probs)
    labels = parts[0]["labels"]
    acc = [100.0 * float((probs[i].argmax(-1) == labels).float().mean()) for i in ids]
    ens = torch.stack([probs[i] for i in ids]).mean(0)
    return {"acc": acc, "ensemble_acc": 100.0 * float((ens.argmax(-1) == labels).float().mean()),
            "params": [params[i] for i in ids], "seconds": max(seconds), "cycles": parts[0]["cycles"],
            "history": [histories[i] for i in ids]}


def format_table(models: list[str], results: dict[str, dict[str, Any]]) -> str:
    """Per-peer and ensemble accuracy of each run kind in ``results`` (any subset of :data:`RUNS`);
    the "MD vs independent" column only when both ran."""
    kinds = [k for k in RUNS if k in results]
    labels = {"independent": "independent (%)", "md": "MD (%)", "md_fixed": "MD fixed a=1,b=2 (%)"}
    delta = "independent" in results and "md" in results
    head = "| peer | params | " + " | ".join(labels[k] for k in kinds) + (" | MD vs independent |" if delta else " |")
    lines = [head, "|" + "---|" * (len(kinds) + 2 + delta)]
    params = results[kinds[0]]["params"]

    def diff(key: str, i: int | None = None) -> str:
        if not delta:
            return ""
        md, base = (results[k][key] if i is None else results[k][key][i] for k in ("md", "independent"))
        return f" {md - base:+.2f} |"

    for i, name in enumerate(models):
        cells = " | ".join(f"{results[k]['acc'][i]:.2f}" for k in kinds)
        lines.append(f"| {name} | {params[i] / 1e6:.3f}M | {cells} |{diff('acc', i)}")
    cells = " | ".join(f"{results[k]['ensemble_acc']:.2f}" for k in kinds)
    lines.append(f"| ensemble (mean probs) | {sum(params) / 1e6:.3f}M | {cells} |{diff('ensemble_acc')}")
    return "\n".join(lines)


def format_weights(results: dict[str, dict[str, Any]]) -> str:
    """MD's accuracy weights per cycle, one line each; empty when the ``md`` run did not run."""
    return "\n".join(f"cycle {c['cycle']} (epoch {c['epoch'] + 1}): {c['source']} accuracy "
                     f"{[round(v, 2) for v in c['accuracies']]} -> a = {[round(w, 3) for w in c['weights']]}"
                     for c in results.get("md", {}).get("cycles", []))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(models) < 2:
        raise SystemExit(f"--models needs at least two architectures, got {models}")
    if args.lrs and len(args.lrs.split(",")) != len(models):
        raise SystemExit(f"--lrs gives {len(args.lrs.split(','))} learning rates for {len(models)} models "
                         f"({', '.join(models)})")
    if args.distributed:
        rank, world = init_from_env()
        mine = assign_peers(len(models), world, rank)
        exchange: LocalExchange = CollectiveExchange(num_peers=len(models))
    else:
        rank, world, mine, exchange = 0, 1, list(range(len(models))), LocalExchange(num_peers=len(models))
    if args.device == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if args.distributed else 0
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(args.device)
    data = load_data(args, device)
    results: dict[str, dict[str, Any]] = {}
    for kind in args.runs:
        results[kind] = merge(exchange.gather(run(kind, args, models, mine, exchange, data, device)))
    if args.distributed:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    sched = IntervalSchedule(args.t_in, args.t_d)
    header = (f"{args.dataset}, {data['sizes']['train']} training images"
              f"{', ' + str(args.val) + ' validation' if args.val else ''}, {data['sizes']['test']} test images, "
              f"{args.epochs} epochs, MD T_in={args.t_in} T_d={args.t_d} t={args.temperature:g}"
              f"{' (KL x t^2)' if args.kd_t2 else ''}, "
              f"{world} process(es), device {device}, {torch.get_num_threads()} CPU thread(s)")
    table = format_table(models, results)
    weights = format_weights(results)
    body = f"{header}\n\n{table}\n" + (f"\n{weights}\n" if weights else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(body)
    (out / "results.json").write_text(json.dumps({
        "header": header, "config": vars(args), "machine": machine(), "models": models, "sizes": data["sizes"],
        "device": str(device),
        "schedule": [{"epoch": e, **_phase(sched(e))} for e in range(args.epochs)],
        "results": {k: {key: v for key, v in r.items()} for k, r in results.items()},
    }, indent=2, default=str))
    print(f"\n{body}\nwrote {out}/summary.md and results.json")
    return 0


def _phase(p) -> dict[str, Any]:
    return {"phase": p.phase, "cycle": p.cycle, "r": p.r, "alpha": p.alpha, "beta": p.beta}


if __name__ == "__main__":
    raise SystemExit(main())
