"""CPU fine-tuning benchmark: peers that start from random weights vs from the pretrained ones.

A CIFAR ResNet-14 (``branchify.recipes.zoo``) is **pretrained** on the 30,000 Fashion-MNIST
training images of classes 0-4 (14x14), then **fine-tuned** on a few hundred images of classes
5-9 (a new task: a freshly initialised 5-way classifier, labels 5-9 -> 0-4) and tested on all
5,000 test images of classes 5-9. Per seed (the same fine-tuning images, data order and fresh
classifier for every row of that seed):

* ``plain``: fine-tuning the pretrained network alone (the baseline), and ``plain / scratch``:
  the same recipe from random weights (shows how strong the pretrained start is);
* ONE, DML and TSA through ``bf.method``, each with ``init="random"`` - replicas from the
  architecture's own init (``model_fn``; branchify's default for a plain model) - and with
  ``init="pretrained"`` - replicas copy the pretrained network, each leaf but the target with its
  own fresh classifier (:mod:`branchify.surgery.pretrained`);
* DML written by hand in plain PyTorch (``benchmarks/handwritten.py``'s loss) with both inits:
  the twin of branchify's DML.

Gains are paired per seed (difference to ``plain`` of the same seed; and pretrained minus random
peers of the same method), mean +- standard error. Every finished run is written at once to
``<out>/runs/<setting>/...json`` (an interrupted sweep resumes); ``summarise`` rebuilds
``results.json`` (machine, one record per run) and ``summary.md``.

    python -m benchmarks.finetune_cpu pretrain                 # ~30,000 images; cached in runs/finetune_cpu/
    python -m benchmarks.finetune_cpu run --seeds 0,1,2,3,4 --workers 2
    python -m benchmarks.finetune_cpu summarise

Recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4, OneCycleLR (15% warm-up), random crop +
flip, fp32, one thread per run. Pretraining: batch 128, peak lr 0.1; fine-tuning: batch 64, peak lr
``ft_lr``, every parameter trained.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    machine_info,
    markdown_table,
    mean_se,
    paired_cell,
    paired_differences,
    run_pool,
    write_summary_files,
)

DEFAULT_OUT = "benchmarks/results/finetune_cpu"
CACHE = Path("runs/finetune_cpu")
PRE_CLASSES, FT_CLASSES = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
JOBS = [("plain", "scratch", "plain"), ("plain", "pretrained", "plain")] + [
    (m, init, impl) for m, impls in (("one", ("branchify",)), ("dml", ("branchify", "handwritten")),
                                     ("tsa", ("branchify",)))
    for init in ("random", "pretrained") for impl in impls]
"""(method, init, implementation) of every run of a seed."""


@dataclass(frozen=True)
class Setting:
    """The pretraining and the fine-tuning regime (``name`` labels results and the checkpoint)."""

    name: str = "r14-14px-pre12ep-ft500-30ep"
    depth: int = 14
    image_size: int = 14
    pre_images: int | None = None      # None: every training image of classes 0-4 (30,000)
    pre_epochs: int = 12
    pre_lr: float = 0.1
    ft_images: int = 500               # class-stratified, drawn from the seed
    ft_epochs: int = 30
    ft_lr: float = 0.05
    batch_size: int = 64
    test_size: int | None = None       # None: all 5,000 test images of classes 5-9


TINY = Setting("tiny", depth=8, pre_images=250, pre_epochs=1, ft_images=50, ft_epochs=1, test_size=100)
"""The smoke test's setting (seconds)."""


# ---------------------------------------------------------------------- data and models
def _classes(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep] - classes[0]


def images(s, classes: tuple[int, ...], size: int | None, seed: int, root: str | None
           ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((x, y), (x_test, y_test))`` of ``classes`` (uint8 28x28 images, labels from 0); ``size``
    class-stratified training images drawn from ``seed`` (``None``: all), the first ``s.test_size``
    test images (``None``: all). ``s``: this module's ``Setting`` or ``finetune_hf.HFSetting`` - both
    fine-tuning benchmarks draw their images here."""
    from branchify.recipes.data import load_fashion_mnist
    from branchify.recipes.data.sources import stratified_subset

    x, y, xt, yt = load_fashion_mnist(root)
    (x, y), (xt, yt) = _classes(x, y, classes), _classes(xt, yt, classes)
    if size is not None:
        idx = stratified_subset(y, size, seed)
        x, y = x[idx], y[idx]
    if s.test_size is not None:
        xt, yt = xt[: s.test_size], yt[: s.test_size]
    return (x, y), (xt, yt)


def loaders(s: Setting, classes: tuple[int, ...], size: int | None, seed: int, batch: int, root: str | None):
    """``(train, test)`` loaders over ``classes`` (labels from 0), ``size`` stratified training images."""
    from branchify.recipes.data import DATASETS, TensorLoader

    meta = DATASETS["fashion_mnist"]
    (x, y), (xt, yt) = images(s, classes, size, seed, root)
    k = 28 // s.image_size
    if k != 1:
        x, xt = (F.avg_pool2d(t.float(), k).round().to(torch.uint8) for t in (x, xt))
    train = TensorLoader(x, y, batch, mean=meta.mean, std=meta.std, shuffle=True, seed=seed, augment=True,
                         crop_padding=2 if s.image_size >= 28 else 1)
    return train, TensorLoader(xt, yt, 1000, mean=meta.mean, std=meta.std)


def make(s: Setting) -> nn.Module:
    """A fresh 5-way CIFAR ResNet (the architecture's own init)."""
    from branchify.recipes.zoo import CifarResNet

    return CifarResNet(s.depth, num_classes=5, in_channels=1)


def checkpoint_path(s: Setting) -> Path:
    return CACHE / f"pretrained-{s.name}.pt"


def pretrained(s: Setting, ckpt: Path) -> nn.Module:
    """The pretrained network with a fresh classifier for the new task (drawn from the global RNG)."""
    net = make(s)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    return net


# ---------------------------------------------------------------------- trainees
class Trainee:
    """What one run trains: ``model``, ``loss(x, y)``, ``leaves(x)``, ``target``, ``set_epoch``."""

    def __init__(self, s: Setting, method: str, init: str, implementation: str, ckpt: Path) -> None:
        import branchify as bf

        self.method, self.epochs, self.target, self.okd = method, s.ft_epochs, 0, None
        start = make(s) if init == "scratch" else pretrained(s, ckpt)
        if method == "plain":
            self.model = start
        elif implementation == "handwritten":  # DML by hand: the same RNG order as branchify's
            second = copy.deepcopy(start)
            if init == "pretrained":
                second.fc.load_state_dict(make(s).fc.state_dict())   # a fresh head, as model_fn's donor
            else:
                second = make(s)                                      # a whole random network
            self.model = nn.ModuleList([start, second])
        else:
            self.model, self.okd = bf.method(method, start, model_fn=lambda: make(s),
                                             init="pretrained" if init == "pretrained" else "auto")

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from benchmarks.handwritten import pairwise_loss

        if self.okd is not None:
            return self.okd(self.model(x), y).total
        if self.method == "plain":
            return F.cross_entropy(self.model(x), y)
        return pairwise_loss([net(x) for net in self.model], y, T=1.0)

    def leaves(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.okd is not None:
            return self.model(x).logits
        return [self.model(x)] if self.method == "plain" else [net(x) for net in self.model]

    def set_epoch(self, epoch: int) -> None:
        if self.okd is not None:
            self.okd.set_epoch(epoch, self.epochs)


def fit(model: nn.Module, loss_fn, train, epochs: int, lr: float, set_epoch=lambda e: None) -> float:
    """The recipe's loop (SGD Nesterov, OneCycle); returns training seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train), pct_start=0.15)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        set_epoch(epoch)
        for x, y in train:
            loss = loss_fn(x, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss {float(loss)} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - t0


def pretrain(s: Setting, root: str | None = None, force: bool = False) -> Path:
    """Pretrain on classes 0-4 (seed 0) unless the checkpoint is cached (``runs/finetune_cpu/``) or
    committed (``benchmarks/results/finetune_cpu/``, the one the published table used); returns its path."""
    from branchify.recipes.regime import evaluate

    path = checkpoint_path(s)
    committed = Path(DEFAULT_OUT) / path.name
    if not force and (path.exists() or committed.exists()):
        return path if path.exists() else committed
    train, test = loaders(s, PRE_CLASSES, s.pre_images, 0, 128, root)
    torch.manual_seed(0)
    net = make(s)
    seconds = fit(net, lambda x, y: F.cross_entropy(net(x), y), train, s.pre_epochs, s.pre_lr)

    class _One:
        model, target = net, 0
        leaves = staticmethod(lambda x: [net(x)])

    acc = evaluate(_One, test)["target_acc"]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    path.with_suffix(".json").write_text(json.dumps({
        "setting": asdict(s), "train_images": len(train.labels),
        "test_acc_classes_0_4": acc, "train_seconds": seconds, "machine": machine_info(torch.device("cpu"))}, indent=1))
    return path


def run_one(s: Setting, method: str, init: str, implementation: str, seed: int, ckpt: Path,
            root: str | None = None) -> dict:
    """Fine-tune one (method, init, implementation) for one seed; the result record."""
    from branchify.recipes.regime import evaluate

    train, test = loaders(s, FT_CLASSES, s.ft_images, seed, s.batch_size, root)
    torch.manual_seed(seed)
    trainee = Trainee(s, method, init, implementation, ckpt)
    seconds = fit(trainee.model, trainee.loss, train, s.ft_epochs, s.ft_lr, trainee.set_epoch)
    metrics = evaluate(trainee, test)
    return {"setting": s.name, "method": method, "init": init, "implementation": implementation, "seed": seed,
            "target_acc": metrics["target_acc"], "ensemble_acc": metrics["ensemble_acc"],
            "leaf_accs": metrics["leaf_accs"], "train_seconds": seconds}


# ---------------------------------------------------------------------- the sweep
def run_path(out: Path, s: Setting, method: str, init: str, implementation: str, seed: int) -> Path:
    return out / "runs" / s.name / f"{implementation}-{method}-{init}-seed{seed}.json"


def _worker(job: tuple[dict, str, str, str, int, str, str, str | None]) -> str:
    setting, method, init, impl, seed, ckpt, out, root = job
    torch.set_num_threads(1)
    s = Setting(**setting)
    path = run_path(Path(out), s, method, init, impl, seed)
    if path.exists():
        return f"{impl} {method}/{init} seed {seed}: already on disk"
    try:
        rec = run_one(s, method, init, impl, seed, Path(ckpt), root)
    except Exception as exc:  # one failed run must not stop the others; retried on resume
        return f"FAILED {impl} {method}/{init} seed {seed}: {type(exc).__name__}: {exc}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(rec))
    path.with_suffix(".tmp").replace(path)
    return (f"{impl:11s} {method:5s} {init:10s} seed {seed}: target {rec['target_acc']:.2f}% "
            f"({rec['train_seconds']:.0f}s)")


def sweep(s: Setting, seeds: list[int], out: Path, workers: int, root: str | None, ckpt: Path,
          which: list[tuple[str, str, str]] = JOBS) -> None:
    """Every job of every seed (seed-major, so an interrupted sweep has whole seeds) not yet on disk."""
    jobs = [(asdict(s), m, init, impl, seed, str(ckpt), str(out), root)
            for seed in seeds for m, init, impl in which
            if not run_path(out, s, m, init, impl, seed).exists()]
    print(f"{len(jobs)} runs to go on {workers} worker(s)", flush=True)
    run_pool(_worker, jobs, workers, spawn_one=False)


# ---------------------------------------------------------------------- summary
def summarise(records: list[dict]) -> list[dict]:
    """One row per (method, init, implementation): accuracy, the paired gain over ``plain`` fine-tuning
    of the same seeds, and for peers the paired gain of pretrained over random peers."""
    by = {}
    for r in records:
        by.setdefault((r["method"], r["init"], r["implementation"]), {})[r["seed"]] = r
    base = by.get(("plain", "pretrained", "plain"), {})
    rows = []
    for key in [k for k in JOBS if k in by]:
        method, init, impl = key
        runs = by[key]
        accs = [runs[s]["target_acc"] for s in sorted(runs)]
        row = {"method": method, "init": init, "implementation": impl, "seeds": len(accs),
               "target_mean": statistics.fmean(accs), "target_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "ensemble_mean": statistics.fmean(runs[s]["ensemble_acc"] for s in runs),
               "train_seconds": statistics.fmean(runs[s]["train_seconds"] for s in runs)}
        gains = paired_differences(runs, base, "target_acc")
        if key != ("plain", "pretrained", "plain") and gains:
            row["gain_mean"], row["gain_se"] = mean_se(gains)
        other = by.get((method, "random", impl), {})
        if init == "pretrained" and method != "plain" and other:
            row["vs_random_mean"], row["vs_random_se"] = mean_se(paired_differences(runs, other, "target_acc"))
        rows.append(row)
    return rows


def twins(records: list[dict]) -> list[dict]:
    """branchify's DML minus the hand-written one, per init: mean difference and its paired SE."""
    out = []
    for init in ("random", "pretrained"):
        runs = {(r["implementation"], r["seed"]): r for r in records if (r["method"], r["init"]) == ("dml", init)}
        bf_runs = {s: r for (impl, s), r in runs.items() if impl == "branchify"}
        hw = {s: r for (impl, s), r in runs.items() if impl == "handwritten"}
        d = paired_differences(bf_runs, hw, "target_acc")
        if d:
            m, se = mean_se(d)
            out.append({"method": "dml", "init": init, "seeds": len(d), "diff": m, "se": se,
                        "within_2se": bool(abs(m) <= 2 * se) or m == 0.0})
    return out


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["method", "peers init", "implementation", "seeds", "target acc (%)", "gain vs plain fine-tuning (paired ± SE)",
         "pretrained - random peers (paired ± SE)", "ensemble acc (%)", "train s/run"],
        [[r["method"], r["init"], r["implementation"], r["seeds"], f"{r['target_mean']:.2f} ± {r['target_std']:.2f}",
          paired_cell(r, "gain", "-"), paired_cell(r, "vs_random"), f"{r['ensemble_mean']:.2f}",
          f"{r['train_seconds']:.0f}"] for r in rows])


def pretrained_start(pretraining: dict | None, epochs: int) -> list[str]:
    """The summary's closing lines on the pretrained start (none without its record); the test image count
    is named when the record has it (``finetune_hf``'s does)."""
    if not pretraining:
        return []
    tested = f"{pretraining['test_images']} " if "test_images" in pretraining else ""
    return ["", f"Pretrained start: {pretraining['test_acc_classes_0_4']:.2f}% on the {tested}test images of "
                f"classes 0-4 ({pretraining['train_images']} images, {epochs} epochs, "
                f"{pretraining['train_seconds']:.0f}s)."]


def write_summary(out: Path, s: Setting) -> str:
    records = [json.loads(p.read_text()) for p in sorted((out / "runs" / s.name).glob("*.json"))]
    rows, tw = summarise(records), twins(records)
    found = [p.with_suffix(".json") for p in (checkpoint_path(s), Path(DEFAULT_OUT) / checkpoint_path(s).name)]
    pretraining = next((json.loads(p.read_text()) for p in found if p.exists()), None)
    text = [f"# CPU fine-tuning benchmark: {s.name}", "", table(rows)]
    if tw:
        text += ["", markdown_table(["twin", "init", "seeds", "branchify - hand-written", "2 SE", "within 2 SE"],
                                    [["dml", t["init"], t["seeds"], f"{t['diff']:+.2f}", f"{2 * t['se']:.2f}",
                                      "yes" if t["within_2se"] else "NO"] for t in tw])]
    text += pretrained_start(pretraining, s.pre_epochs)
    write_summary_files(out, "\n".join(text), {
        "machine": machine_info(torch.device("cpu")), "setting": asdict(s), "pretraining": pretraining,
        "summary": rows, "twins": tw, "runs": records})
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["pretrain", "run", "summarise"])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--data-root", default=None)
    p.add_argument("--tiny", action="store_true", help="the smoke test's tiny setting (seconds)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s, out = (TINY if args.tiny else Setting()), Path(args.out)
    if args.command in ("pretrain", "run"):
        t0 = time.perf_counter()
        ckpt = pretrain(s, args.data_root)
        info = json.loads(ckpt.with_suffix(".json").read_text())
        print(f"pretrained checkpoint {ckpt} ({ckpt.stat().st_size / 1e6:.2f} MB): "
              f"{info['test_acc_classes_0_4']:.2f}% on classes 0-4 ({time.perf_counter() - t0:.0f}s)", flush=True)
    if args.command == "run":
        sweep(s, [int(x) for x in args.seeds.split(",") if x.strip()], out, args.workers, args.data_root, ckpt)
    if args.command != "pretrain":
        print(write_summary(out, s))


if __name__ == "__main__":
    main()
