"""Training-step time: branchify-built trees vs the same trees written by hand vs the plain model.

One process, all variants interleaved, median of repeated fwd+bwd+SGD steps on CIFAR-shaped
random data (ResNet-32, 100 classes). The loss is the sum of per-leaf cross-entropies for every
variant, so only the model's own cost is compared. Prints a table and writes JSON with machine info.

    python -m benchmarks.step_overhead --batch 128 --reps 15 --out benchmarks/results/step_overhead_cpu.json
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import branchify as bf
from branchify.recipes.zoo import resnet32

from .common import interleaved_medians, machine_info, sgd_step, table, write_results
from .handwritten import HandONE, HandTSA


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False):
    def loss() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        logits = out.logits if hasattr(out, "logits") else (out if isinstance(out, list) else [out])
        return sum(F.cross_entropy(z.float(), y) for z in logits)

    return sgd_step(model, loss)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", default="benchmarks/results/step_overhead_cpu.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch,), device=device)
    models = {
        "plain": resnet32(100),
        "hand ONE-3": HandONE(3, gate=False),
        "branchify ONE-3": bf.branchify(resnet32(100), bf.Spec(splits=["layer3"], fanout=[3])),
        "hand TSA-2-3": HandTSA(),
        "branchify TSA-2-3": bf.branchify(resnet32(100), bf.Spec(splits=["layer2", "layer3"], fanout=[2, 2])),
    }
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    steps = {k: make_step(m.to(device, memory_format=fmt).train(), x, y, args.amp) for k, m in models.items()}
    res = interleaved_medians(steps, args.reps, args.warmup, device)
    plain = res["plain"]["median_ms"]
    ratios = {"ONE-3": res["branchify ONE-3"]["median_ms"] / res["hand ONE-3"]["median_ms"],
              "TSA-2-3": res["branchify TSA-2-3"]["median_ms"] / res["hand TSA-2-3"]["median_ms"]}
    rows = [{"variant": k, "median ms": f"{v['median_ms']:.1f}", "x plain": f"{v['median_ms'] / plain:.2f}"}
            for k, v in res.items()]
    print(table(rows, ["variant", "median ms", "x plain"]))
    for k, r in ratios.items():
        print(f"branchify / hand-written, {k}: {r:.3f}")
    payload = {"benchmark": "step_overhead", "model": "resnet32 (100 classes)", "batch": args.batch,
               "amp_bf16": args.amp, "channels_last": args.channels_last,
               "input": [3, 32, 32], "machine": machine_info(device), "results": res,
               "branchify_over_hand": ratios}
    print("wrote", write_results(args.out, payload))
    return payload


if __name__ == "__main__":
    main()
