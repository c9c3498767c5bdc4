"""Stability of every preset on small fixed problems, with the ablations behind AHBF's defaults.

A fixed random batch, SGD with momentum 0.9 and ``set_epoch(50, 60)`` (every ramp near full
weight from the first step). Problems: a CIFAR ResNet-20 on 1x28x28 (batch 8 at lr 0.05, batch 32
at lr 0.1; 30 steps) and torchvision's ResNet-18 on 3x32x32 (batch 8 at lr 0.05; 25 steps). Each
row: the loss at the first and last step, its maximum, and the largest |logit| seen.

    python -m benchmarks.stability                         # all presets + AHBF ablations
    python -m benchmarks.stability --problems c20-b8 --variants "ahbf:lambdas=[4,2]"

Results go to ``benchmarks/results/stability_cpu.json`` with machine info.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import branchify as bf

from .accuracy_cpu import parse_variant
from .common import machine_info, table, write_results

PROBLEMS = {  # name -> (model, batch, lr, steps)
    "c20-b8-lr0.05": ("resnet20", 8, 0.05, 30),
    "c20-b32-lr0.1": ("resnet20", 32, 0.1, 30),
    "r18-b8-lr0.05": ("resnet18", 8, 0.05, 25),
}
VARIANTS = ["baseline", "one", "cl_ilr", "okddip", "tsa", "u_tsa", "dml", "ahbf",
            # AHBF ablations: loss weights, init of the appended blocks, no deepening, KD off
            "ahbf:lambdas=[4,2]", "ahbf:lambdas=[2,4]", "ahbf:lambdas=[1,1]",
            "ahbf:deepen_init=standard", "ahbf:lambdas=[4,2]:deepen_init=standard",
            "ahbf:aux=0:lambdas=[4,2]", "ahbf:kd_weight=0.0:deepen_init=standard",
            "okddip:detach=true"]


def _net_fn(name: str):
    if name == "resnet20":
        from branchify.recipes.zoo import resnet20

        return (lambda: resnet20(10, 1)), (1, 28, 28)
    import torchvision

    return (lambda: torchvision.models.resnet18(num_classes=10)), (3, 32, 32)


def run(problem: str, variant: str) -> dict:
    """Train ``variant`` on ``problem`` and return its loss trace summary."""
    model_name, batch, lr, steps = PROBLEMS[problem]
    net_fn, shape = _net_fn(model_name)
    torch.manual_seed(0)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    if variant == "baseline":
        model, okd = net_fn(), None
    else:
        name, overrides = parse_variant(variant)
        model, okd = bf.method(name, net_fn(), model_fn=net_fn, **overrides)
        okd.set_epoch(50, 60)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, peak, t0 = [], 0.0, time.perf_counter()
    for _ in range(steps):
        out = model(x)
        logits = [out] if okd is None else out.logits
        loss = F.cross_entropy(out, y) if okd is None else okd(out, y).total
        losses.append(loss.item())
        peak = max(peak, max(float(z.detach().abs().max()) for z in logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"problem": problem, "variant": variant, "first": losses[0], "last": losses[-1],
            "max": max(losses), "max_logit": peak, "seconds": time.perf_counter() - t0, "losses": losses}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", default=",".join(PROBLEMS))
    p.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated, e.g. 'one;ahbf:lambdas=[4,2]'")
    p.add_argument("--out", default="benchmarks/results/stability_cpu.json")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    for problem in args.problems.split(","):
        for variant in args.variants.split(";"):
            r = run(problem, variant)
            rows.append(r)
            print(f"{problem:15s} {variant:42s} {r['first']:8.2f} -> {r['last']:10.3f}  max {r['max']:10.1f}  "
                  f"|logit| {r['max_logit']:10.0f}", flush=True)
    cols = ["problem", "variant", "first", "last", "max", "max_logit"]
    fmt = [{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items() if k in cols} for r in rows]
    print(table(fmt, cols))
    write_results(args.out, {"machine": machine_info(torch.device("cpu")), "rows": rows})


if __name__ == "__main__":
    main()
