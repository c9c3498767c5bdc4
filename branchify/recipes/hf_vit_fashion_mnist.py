"""Hugging Face ViT on Fashion-MNIST with the unchanged ``transformers.Trainer``: baseline vs online KD.

A small ``ViTForImageClassification`` (random init from a config, nothing downloaded) is trained
once as is and once per online-KD method (``branchify_hf`` + :class:`BranchifyCallback`), each
with the same data, optimiser, schedule and seed. The table reports the **target leaf's** test
accuracy (the model you deploy: it is reloaded with ``ViTForImageClassification.from_pretrained``
from the callback's export and evaluated again), the mean-probability ensemble of all leaves, the
parameters trained and the training time. Results go to ``<out>/results.json``.

Run (CPU, a few minutes)::

    python -m branchify.recipes.hf_vit_fashion_mnist                       # baseline, one, tsa
    python -m branchify.recipes.hf_vit_fashion_mnist --methods baseline,one,tsa,okddip --epochs 12
    python -m branchify.recipes.hf_vit_fashion_mnist --smoke               # seconds: tiny subset, 1 epoch
    python -m branchify.recipes.hf_vit_fashion_mnist --pretrained DIR      # fine-tune a save_pretrained ViT

With ``--pretrained`` the ViT is loaded with ``from_pretrained``, so every method's replicas start from
its weights with a fresh classifier each (``init="pretrained"``, chosen automatically; ``--init``
overrides); each row records the replica init it got.

Examples:
    >>> from branchify.recipes.hf_vit_fashion_mnist import main
    >>> results = main(["--smoke", "--methods", "baseline,one"])   # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from .data import DATASETS, load_fashion_mnist
from .tables import fixed_width_table

META = DATASETS["fashion_mnist"]
METHOD_SPLITS = {
    # ONE-style methods branch the last two of the four layers; TSA cuts before each of them.
    "one": "vit.layers.2", "cl_ilr": "vit.layers.2", "okddip": "vit.layers.2",
    "tsa": ["vit.layers.2", "vit.layers.3"], "u_tsa": ["vit.layers.2", "vit.layers.3"],
}


def make_vit(layers: int = 4, hidden: int = 64, heads: int = 4, patch: int = 4, dropout: float = 0.0,
             seed: int = 0):
    """A small ``ViTForImageClassification`` for 28x28 grey images (10 classes), random weights.

    Examples:
        >>> make_vit().config.num_hidden_layers
        4
    """
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=META.image_size, patch_size=patch, num_channels=META.in_channels,
                       hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout, num_labels=META.num_classes)
    return ViTForImageClassification(config)


class ImageDataset(torch.utils.data.Dataset):
    """``{"pixel_values", "labels"}`` examples from uint8 images, normalised once up front.

    Examples:
        >>> ds = ImageDataset(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4))
        >>> ds[0]["pixel_values"].shape
        torch.Size([1, 28, 28])
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        mean = torch.tensor(META.mean).view(1, -1, 1, 1)
        std = torch.tensor(META.std).view(1, -1, 1, 1)
        self.pixels = ((images.float() / 255.0) - mean) / std
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[i], "labels": self.labels[i]}


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: top-1 accuracy of the (target) logits."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, dataset: ImageDataset, batch_size: int = 500) -> float:
    """Top-1 accuracy of a plain HF classifier (``.logits``) or a tensor-returning module."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(dataset), batch_size):
        x = dataset.pixels[i:i + batch_size].to(device)
        out = model(pixel_values=x) if hasattr(model, "config") else model(x)
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1).cpu() == dataset.labels[i:i + batch_size]).sum())
    return correct / len(dataset)


def training_args(out: Path, args: argparse.Namespace):
    """The same ``TrainingArguments`` for every method."""
    from transformers import TrainingArguments

    return TrainingArguments(
        str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=500, learning_rate=args.lr, weight_decay=0.05, warmup_steps=args.warmup,
        lr_scheduler_type="cosine", logging_steps=max(1, args.log_every), save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True)


def run_method(method: str, train: ImageDataset, test: ImageDataset, args: argparse.Namespace) -> dict[str, Any]:
    """Train one method with the unchanged Trainer; return its row of the results table."""
    from transformers import Trainer, ViTForImageClassification

    from ..integrations.hf import BranchifyCallback, branchify_hf

    out = Path(args.out) / method
    if args.pretrained:
        vit = ViTForImageClassification.from_pretrained(args.pretrained, num_labels=10,
                                                        ignore_mismatched_sizes=True)
    else:
        vit = make_vit(layers=args.layers, hidden=args.hidden, seed=args.seed)
    callbacks = []
    if method == "baseline":
        model = vit
    else:
        split = METHOD_SPLITS.get(method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = branchify_hf(method, vit, init=args.init, **({"split": split} if split else {}))
        callbacks.append(BranchifyCallback())
    trained_params = sum(p.numel() for p in model.parameters())
    trainer = Trainer(model=model, args=training_args(out, args), train_dataset=train, eval_dataset=test,
                      compute_metrics=accuracy_metrics, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    metrics = trainer.evaluate()
    row: dict[str, Any] = {"method": method, "trainer_accuracy": metrics["eval_accuracy"],
                           "train_time_s": round(train_time, 1), "trained_params": trained_params,
                           "final_train_loss": next((h["loss"] for h in reversed(trainer.state.log_history)
                                                     if "loss" in h), None)}
    if method == "baseline":
        row["target_accuracy"] = row["trainer_accuracy"]
        row["deployed_params"] = trained_params
        row["ensemble_accuracy"] = None
    else:
        # The deployable model: reload the callback's save_pretrained export and evaluate it.
        exported = ViTForImageClassification.from_pretrained(out / "exported-target")
        row["target_accuracy"] = evaluate_accuracy(exported, test)
        row["deployed_params"] = sum(p.numel() for p in exported.parameters())
        ensemble = model.branched.ensemble()
        row["ensemble_accuracy"] = evaluate_accuracy(ensemble, test)
        row["leaves"] = model.branched.num_leaves
        row["replica_init"] = model.branched.init_used
    return row


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a fixed-width text table."""
    columns = [("method", "<10"), ("target acc", ">10.2f"), ("ensemble", ">9"), ("leaves", ">6"),
               ("params(train)", ">13,"), ("params(deploy)", ">14,"), ("train s", ">8.1f")]
    return fixed_width_table(columns, [
        (r["method"], 100 * r["target_accuracy"],
         f"{100 * r['ensemble_accuracy']:.2f}" if r.get("ensemble_accuracy") is not None else "-",
         r.get("leaves", 1), r["trained_params"], r["deployed_params"], r["train_time_s"]) for r in rows])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="baseline,one,tsa", help="comma list: baseline and branchify methods")
    p.add_argument("--train-subset", type=int, default=10000, help="class-balanced training images")
    p.add_argument("--test-subset", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--epochs", type=float, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", default=None, help="a save_pretrained ViT folder to fine-tune (from_pretrained)")
    p.add_argument("--init", default="auto", help="replica init (auto: pretrained for --pretrained, else hf)")
    p.add_argument("--log-every", type=int, default=50, help="Trainer logging_steps")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (else $BRANCHIFY_FASHION_MNIST, ...)")
    p.add_argument("--out", default="runs/hf_vit_fashion_mnist")
    p.add_argument("--smoke", action="store_true", help="seconds-long check: 200 images, 1 epoch, 200 test")
    args = p.parse_args(argv)
    if args.smoke:
        args.train_subset, args.test_subset, args.epochs, args.warmup, args.log_every = 200, 200, 1, 0, 1
        args.batch_size = min(args.batch_size, 50)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run every method, print the table, write ``results.json``; return the rows."""
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    x, y, xt, yt = load_fashion_mnist(args.data, train_subset=args.train_subset, seed=args.seed)
    if args.test_subset is not None:
        xt, yt = xt[:args.test_subset], yt[:args.test_subset]
    train, test = ImageDataset(x, y), ImageDataset(xt, yt)
    rows = []
    for method in methods:
        print(f"[hf_vit] training {method} ...", flush=True)
        rows.append(run_method(method, train, test, args))
        print(f"[hf_vit] {method}: target accuracy {100 * rows[-1]['target_accuracy']:.2f}% "
              f"in {rows[-1]['train_time_s']:.0f} s", flush=True)
    table = format_table(rows)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    print(f"\nHF ViT ({args.layers} layers, hidden {args.hidden}, patch 4) on Fashion-MNIST: "
          f"{len(train)} train / {len(test)} test images, {args.epochs:g} epochs, {device}")
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    result = {"recipe": "hf_vit_fashion_mnist", "args": vars(args), "rows": rows,
              "machine": {"device": device, "platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "threads": torch.get_num_threads()}}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"results written to {out / 'results.json'}")
    return rows


if __name__ == "__main__":
    main()
