"""CPU benchmark of codistillation: 2 groups x 2 ranks against synchronous DDP on 4 ranks and
against 2 independent models, on the same total compute.

    python -m benchmarks.codistill_cpu --seeds 0,1,2                      # the full run
    python -m benchmarks.codistill_cpu --smoke                            # a tiny size, seconds

Setup: a CIFAR ResNet (``--depth``) on a class-stratified Fashion-MNIST subset at 14x14 (the
subset is the same in every run; the seed draws the init and the data order). Every run takes
``--steps`` optimizer steps with ``--per-rank`` images per rank and step, so all configurations
process the same number of images:

* ``ddp``: one model, global batch ``4 * per_rank`` (synchronous DDP on 4 ranks; one process on
  the whole batch is the same computation, see tests/integration/test_cli_ddp.py);
* ``independent``: 2 models, global batch ``2 * per_rank`` each, no exchange;
* ``codistill-K``: the same 2 groups, exchanging weights every K steps after ``--burn-in``
  steps (DML's pairwise KL, T = 1), K in ``--ks``; ``codistill-logits``: top-``k`` logits of a
  shared micro-batch every step. The groups run in one process through
  :class:`~branchify.distributed.codistill_transport.LocalTransport` (at K = 1 that equals the
  2 x 2 gloo run, see tests/integration/test_codistill.py; BatchNorm here sees a group's whole
  batch instead of each rank's half).

SGD (Nesterov, momentum 0.9, weight decay 5e-4), LR ``0.1 * global_batch / 128`` with a cosine
decay to 0 over the steps, random crop + flip. Reported per configuration (mean +- standard
error over seeds): accuracy of group 0's model (what one deploys; DDP's single model), of the
two models' mean softmax, **churn** (Anil et al.: the fraction of test images whose predicted
class differs between two runs of different seeds, over every pair of seeds), and the bytes per
step: what crosses groups (received per group) and what one rank sends in a ring all-reduce of
its group's gradients (``2 (D - 1) / D * |gradients|``).

Results: ``benchmarks/results/codistill_cpu/<name>.json`` (machine info, every run) and
``<name>.md`` (the table).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import machine_info
from branchify.distributed.codistill import (
    CodistillOptions,
    CodistillPeer,
    allreduce_bytes,
    exchange_due,
    payload_bytes,
)
from branchify.distributed.codistill_transport import LocalTransport
from branchify.recipes.regime import Regime, load_data, net_fn

OUT = Path("benchmarks/results/codistill_cpu")


def _loaders(args, seed: int, groups: int, batch: int):
    regime = Regime("codistill", depth=args.depth, image_size=14, train_size=args.train_size, batch_size=batch,
                    test_size=args.test_size)
    train, test = load_data(regime, seed=0)  # the same subset in every run; the seed draws order and init
    out = []
    for g in range(groups):
        loader = copy.copy(train)
        loader.seed, loader._generator = seed * 1000 + g, torch.Generator()
        out.append(loader)
    return out, test, regime


def _stream(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def run(kind: str, seed: int, args) -> dict:
    """One run of configuration ``kind``; accuracies, test predictions, bytes and seconds."""
    groups = 1 if kind == "ddp" else 2
    ranks = 4 // groups
    batch = ranks * args.per_rank
    loaders, test, regime = _loaders(args, seed, groups, batch)
    options = None
    if kind.startswith("codistill"):
        logits = kind == "codistill-logits"
        options = CodistillOptions(groups=2, exchange_every=1 if logits else int(kind.split("-")[1]),
                                   exchange="logits" if logits else "weights", topk=args.topk,
                                   shared_batch=args.per_rank, burn_in=args.burn_in)
    nets, opts, scheds = [], [], []
    for g in range(groups):
        torch.manual_seed(seed * 10 + g)
        net = net_fn(regime)()
        opt = torch.optim.SGD(net.parameters(), lr=0.1 * batch / 128, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
        nets.append(net.train()), opts.append(opt), scheds.append(sched)
    peers = [CodistillPeer(n, g, options, lambda h: net_fn(regime)()) for g, n in enumerate(nets)] if options else []
    hub = LocalTransport(2)
    streams = [_stream(loader) for loader in loaders]
    shared = _stream(_loaders(args, seed + 10_000, 1, args.per_rank)[0][0]) if kind == "codistill-logits" else None
    t0 = time.perf_counter()
    for step in range(args.steps):
        batches = [next(s) for s in streams]
        sx = next(shared)[0] if shared is not None else None
        outs = [nets[g](x if sx is None else torch.cat([x, sx])) for g, (x, _) in enumerate(batches)]
        if options is not None and exchange_due(step, options):
            for g, p in enumerate(peers):
                hub.channel(g).publish(step, p.snapshot(outs[g][len(batches[g][0]):] if sx is not None else None))
            for g, p in enumerate(peers):
                p.absorb(hub.channel(g).collect(step))
        for g, (x, y) in enumerate(batches):
            z = outs[g][: len(x)]
            if peers:
                loss = peers[g].loss(z, y, x if sx is None else sx, None if sx is None else outs[g][len(x):])[0]
            else:
                loss = F.cross_entropy(z, y)
            opts[g].zero_grad(set_to_none=True)
            loss.backward()
            opts[g].step()
            scheds[g].step()
    seconds = time.perf_counter() - t0
    return {"kind": kind, "seed": seed, "seconds": seconds, **_evaluate(nets, test),
            "cross_group_bytes_per_step": hub.channel(0).received / args.steps,
            "weights_bytes": payload_bytes({k: v for k, v in nets[0].state_dict().items()}),
            "allreduce_bytes_per_rank_per_step": allreduce_bytes(nets[0], ranks)["ring_bytes_per_rank"]}


@torch.no_grad()
def _evaluate(nets, test) -> dict:
    for n in nets:
        n.eval()
    preds, ens, labels = [], [], []
    for x, y in test:
        probs = [n(x).softmax(-1) for n in nets]
        preds.append(probs[0].argmax(-1))
        ens.append(torch.stack(probs).mean(0).argmax(-1))
        labels.append(y)
    p, e, y = torch.cat(preds), torch.cat(ens), torch.cat(labels)
    return {"acc": float((p == y).float().mean() * 100), "ensemble_acc": float((e == y).float().mean() * 100),
            "predictions": p.tolist()}


def _mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.mean(values)
    return m, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def summarise(runs: list[dict]) -> list[dict]:
    """One row per configuration: mean +- SE of accuracy, ensemble accuracy, churn; bytes."""
    rows = []
    ddp_bytes = next((r["allreduce_bytes_per_rank_per_step"] for r in runs if r["kind"] == "ddp"), None)
    for kind in dict.fromkeys(r["kind"] for r in runs):
        rs = [r for r in runs if r["kind"] == kind]
        churn = [float((torch.tensor(a["predictions"]) != torch.tensor(b["predictions"])).float().mean() * 100)
                 for a, b in itertools.combinations(rs, 2)]
        acc, ens = _mean_se([r["acc"] for r in rs]), _mean_se([r["ensemble_acc"] for r in rs])
        ch = _mean_se(churn) if churn else (float("nan"), float("nan"))
        cross = rs[0]["cross_group_bytes_per_step"]
        rows.append({"config": kind, "seeds": len(rs), "acc": acc, "ensemble_acc": ens, "churn": ch,
                     "cross_group_bytes_per_step": cross, "allreduce_bytes_per_rank_per_step":
                     rs[0]["allreduce_bytes_per_rank_per_step"],
                     "ddp_allreduce_over_cross": (ddp_bytes / cross) if ddp_bytes and cross else None,
                     "seconds_per_run": statistics.mean(r["seconds"] for r in rs)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| config | seeds | accuracy (%) | ensemble of 2 (%) | churn (%) | cross-group B/step | "
             "in-group all-reduce B/step/rank | DDP all-reduce / cross-group | s/run |", "|" + "---|" * 9]
    for r in rows:
        ratio = f"{r['ddp_allreduce_over_cross']:.0f}x" if r["ddp_allreduce_over_cross"] else ""
        ens = f"{r['ensemble_acc'][0]:.2f} ± {r['ensemble_acc'][1]:.2f}" if r["config"] != "ddp" else ""
        lines.append(f"| {r['config']} | {r['seeds']} | {r['acc'][0]:.2f} ± {r['acc'][1]:.2f} | {ens} | "
                     f"{r['churn'][0]:.2f} ± {r['churn'][1]:.2f} | {r['cross_group_bytes_per_step']:,.0f} | "
                     f"{r['allreduce_bytes_per_rank_per_step']:,.0f} | {ratio} | {r['seconds_per_run']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ks", default="1,10,100,1000", help="weight-exchange intervals K")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--per-rank", type=int, default=16)
    p.add_argument("--burn-in", type=int, default=300)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--topk", type=int, default=3, help="classes sent per image in codistill-logits")
    p.add_argument("--no-logits", action="store_true", help="skip the codistill-logits configuration")
    p.add_argument("--smoke", action="store_true", help="a tiny size (20 steps, 200 images, 500 test images)")
    p.add_argument("--name", default=None, help="results file stem (default: smoke or results)")
    p.add_argument("--out", default=str(OUT), help="results folder")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.train_size, args.test_size, args.burn_in = 20, 200, 500, 2
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = ["independent", "ddp", *[f"codistill-{k}" for k in args.ks.split(",")]]
    kinds += [] if args.no_logits else ["codistill-logits"]
    runs = []
    for kind in kinds:
        for seed in seeds:
            runs.append(run(kind, seed, args))
            print(f"{kind} seed {seed}: acc {runs[-1]['acc']:.2f}%  ({runs[-1]['seconds']:.1f}s)", flush=True)
    rows = summarise(runs)
    name = args.name or ("smoke" if args.smoke else "results")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"codistillation vs DDP vs independent: ResNet-{args.depth}, Fashion-MNIST 14x14, {args.train_size} "
              f"train images, {args.steps} steps x 4 ranks x {args.per_rank} images, burn-in {args.burn_in}, "
              f"seeds {seeds}; mean ± SE")
    header += " (smoke size: checks the script, measures nothing)" if args.smoke else ""
    (out / f"{name}.json").write_text(json.dumps({"header": header, "args": vars(args),
                                                  "machine": machine_info(torch.device("cpu")), "summary": rows,
                                                  "runs": runs}, indent=1))
    (out / f"{name}.md").write_text(header + "\n\n" + table(rows) + "\n")
    print("\n" + header + "\n\n" + table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
