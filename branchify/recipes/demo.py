"""The README demo: does online KD give a better deployed model, on real data, on a CPU?

Trains a CIFAR-style ResNet on a Fashion-MNIST subset as a plain baseline and with DML, ONE and
TSA (same data, schedule and seed), prints the comparison table, writes the plots and the
exported target of each method, and checks that the saved target reloads strictly into the
original model class and reproduces the trained leaf.

    python -m branchify.recipes.demo                 # about 5 minutes on a 2-core CPU
    python -m branchify.recipes.demo --smoke         # seconds: tiny subset, 1 epoch (what CI runs)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .cli import run_comparison
from .config import RunConfig
from .train import load_exported


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny and fast (CI)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--subset", type=int, default=2000, help="training images (stratified)")
    p.add_argument("--test-subset", type=int, default=5000, help="test images scored (0 = all 10,000)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--methods", default="baseline,dml,one,tsa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/demo")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = RunConfig(model=args.model, dataset="fashion_mnist", epochs=args.epochs, train_subset=args.subset,
                    batch_size=64, lr=0.05, lr_schedule="cosine", device=args.device, eval_every=2,
                    test_subset=args.test_subset or None)
    if args.smoke:
        cfg = cfg.replace(epochs=1, train_subset=200, max_steps=2, test_subset=512)
    methods = args.methods.split(",")
    run_comparison(cfg, methods, [args.seed], args.out, progress=True)
    # The deployable artefact: reload the best method's target into the original class.
    out = Path(args.out)
    for m in methods:
        exported = out / "exported" / f"{m}-seed{args.seed}"
        net = load_exported(exported)
        print(f"reloaded {exported}/model.safetensors strictly into {type(net).__name__} "
              f"({sum(p.numel() for p in net.parameters()):,} parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
