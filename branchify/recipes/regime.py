"""A training *regime* for the CPU recipes: a model size, a data set size and a schedule, and the
training run both the CPU accuracy benchmark and the README demo make (:func:`train_run`: the
recipes' one loop, :func:`branchify.recipes.loop.run_epoch`, configured for the regime).

Recipe: SGD with Nesterov momentum 0.9, weight decay 5e-4, OneCycleLR to ``lr`` with 15% warm-up
(torch's defaults otherwise, momentum cycling included), random crop + horizontal flip, fp32;
Fashion-MNIST optionally downsampled 2x (14x14 costs a quarter of 28x28); a class-stratified
training subset and a data order drawn from the seed; accuracy of the target leaf (what
``export()`` deploys) and of the leaves' mean probabilities on the full 10,000-image test set.
Anything that trains like a *trainee* (``model``, ``loss(x, y, epoch)``, ``leaves(x)``,
``set_epoch(epoch)``, ``target``) can be trained with :func:`train_run` - branchify presets
(:class:`BranchifyTrainee`) and ``benchmarks/handwritten.py``'s hand-written trees alike.

Examples:
    >>> regime = Regime("tiny", depth=8, train_size=100, epochs=1)           # doctest: +SKIP
    >>> train_run(regime, BranchifyTrainee("one", regime), seed=0)["target_acc"]   # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .loop import run_epoch
from .progress import progress_bar


@dataclass(frozen=True)
class Regime:
    """One training setting: model size, data, schedule. ``name`` labels its results folder."""

    name: str
    depth: int = 8                 # CIFAR ResNet depth 6n+2 (8: one block per stage)
    image_size: int = 14           # 28 (Fashion-MNIST as is) or 14 (2x average-pooled)
    train_size: int = 1000         # class-stratified subset drawn from the seed
    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.1                # OneCycle peak
    weight_decay: float = 5e-4
    pct_start: float = 0.15        # OneCycle warm-up fraction
    augment: bool = True
    eval_points: int = 4           # test evaluations spread over the run (the last one is reported)
    test_size: int | None = None   # score the first N test images (None: all 10,000)
    method_args: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method overrides
    # Methods whose leaves each see their own augmentation (PCL, KDCL, OKDPH): the loader yields
    # un-augmented batches and ``views=crop_flip`` draws the regime's crop + flip per leaf inside the
    # model, distributed exactly like the loader's (padding filled with a normalised black pixel).
    peer_views: tuple[str, ...] = ()

    @property
    def crop_padding(self) -> int:
        return 2 if self.image_size >= 28 else 1


# ---------------------------------------------------------------------- data
CPU_REGIME = Regime("r14-14px-500-200ep", depth=14, train_size=500, epochs=200, method_args={"ahbf": {"aux": 1}},
                    peer_views=("pcl", "kdcl", "okdph"))
"""The regime the CPU benchmark measures every method in (chosen by its pilot, see benchmarks/README.md):
a CIFAR ResNet-14 on 500 Fashion-MNIST images at 14x14 for 200 epochs, where the hand-written trees
gained most per CPU second (AHBF deepens by one block per leaf, the network having two per stage)."""


def load_data(regime: Regime, seed: int, root: str | None = None, *, augment: bool | None = None):
    """``(train_loader, test_loader)`` for Fashion-MNIST at the regime's size, subset and seed.

    ``augment=False`` leaves the augmentation to the model (per-leaf views, see :func:`peer_views`).
    """
    from .data import DATASETS, TensorLoader, load_fashion_mnist

    meta = DATASETS["fashion_mnist"]
    x, y, xt, yt = load_fashion_mnist(root, regime.train_size, seed)
    if regime.image_size != 28:
        if 28 % regime.image_size:
            raise ValueError(f"image_size={regime.image_size} must divide 28 (28 or 14)")
        k = 28 // regime.image_size
        x, xt = (F.avg_pool2d(t.float(), k).round().to(torch.uint8) for t in (x, xt))
    train = TensorLoader(x, y, regime.batch_size, mean=meta.mean, std=meta.std, shuffle=True, seed=seed,
                         augment=regime.augment if augment is None else augment, crop_padding=regime.crop_padding)
    if regime.test_size is not None:
        xt, yt = xt[: regime.test_size], yt[: regime.test_size]
    test = TensorLoader(xt, yt, 1000, mean=meta.mean, std=meta.std)
    return train, test


def peer_views(regime: Regime):
    """The regime's crop + flip as per-leaf views on normalised batches (``bf.views.crop_flip``)."""
    from ..views import crop_flip
    from .data import DATASETS

    meta = DATASETS["fashion_mnist"]
    return crop_flip(regime.crop_padding, fill=-meta.mean[0] / meta.std[0])


def net_fn(regime: Regime) -> Callable[[], nn.Module]:
    """A factory of the regime's CIFAR ResNet (the architecture's own init)."""
    from .zoo import CifarResNet

    return lambda: CifarResNet(regime.depth, num_classes=10, in_channels=1)


def parse_variant(label: str) -> tuple[str, dict[str, Any]]:
    """``"ahbf:lambdas=[1,1]:aux=1"`` -> ``("ahbf", {"lambdas": [1, 1], "aux": 1})``: a preset and overrides.

    Examples:
        >>> parse_variant("ahbf:lambdas=[1,1]:deepen_init=standard")
        ('ahbf', {'lambdas': [1, 1], 'deepen_init': 'standard'})
    """
    import yaml

    name, *pairs = label.split(":")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"variant {label!r}: write overrides as key=value after the method, e.g. ahbf:aux=1")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


class BranchifyTrainee:
    """A branchify preset around the regime's network: ``bf.method(name, net, model_fn=...)``;
    ``method`` may carry overrides (see :func:`parse_variant`) on top of the regime's per-method ones."""

    def __init__(self, method: str, regime: Regime) -> None:
        import branchify as bf

        make = net_fn(regime)
        name, overrides = parse_variant(method)
        overrides = {**regime.method_args.get(name, {}), **overrides}
        if name in regime.peer_views and regime.augment:
            overrides.setdefault("views", peer_views(regime))
        self.model, self.okd = bf.method(name, make(), model_fn=make, **overrides)
        self.epochs = regime.epochs
        self.target = self.model.spec.target

    def loss(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.okd(self.model(x), y).total

    def leaves(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(x)
        temporal = getattr(self.model, "temporal", None)
        if temporal is not None and temporal.deploy:  # PCL deploys the temporal mean: score what export() gives
            return out.temporal.logits
        return out.logits

    def set_epoch(self, epoch: int) -> None:
        self.okd.set_epoch(epoch, self.epochs)

class PlainTrainee:
    """The plain network trained with cross-entropy: the baseline every method is compared with."""

    def __init__(self, regime: Regime) -> None:
        self.model = net_fn(regime)()
        self.target = 0

    def loss(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        return F.cross_entropy(self.model(x), y)

    def leaves(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.model(x)]

    def set_epoch(self, epoch: int) -> None:
        pass


@torch.no_grad()
def evaluate(trainee, loader) -> dict[str, Any]:
    """Target-leaf, ensemble (mean probabilities) and per-leaf accuracy (%) on a whole loader."""
    trainee.model.eval()
    hits, ens, n = None, 0, 0
    for x, y in loader:
        logits = trainee.leaves(x)
        h = torch.stack([(z.argmax(-1) == y).sum() for z in logits])
        hits = h if hits is None else hits + h
        ens += int((torch.stack([z.softmax(-1) for z in logits]).mean(0).argmax(-1) == y).sum())
        n += len(y)
    trainee.model.train()
    leaf = (hits.double() / n * 100).tolist()
    return {"target_acc": leaf[trainee.target], "ensemble_acc": ens / n * 100, "leaf_accs": leaf}


def _finite_loss(trainee, epoch: int, label: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The trainee's loss at ``epoch`` as :func:`~branchify.recipes.loop.run_epoch` asks for it;
    a non-finite value stops the run with :class:`FloatingPointError` (``label`` says which run)."""

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = trainee.loss(x, y, epoch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{label}: loss {float(loss.detach())} at epoch {epoch}")
        return loss

    return loss_of


def train_run(regime: Regime, make_trainee: Callable[[], Any], seed: int, *, method: str, implementation: str,
              data_root: str | None = None, progress: Any = False) -> dict[str, Any]:
    """Train one trainee (built by ``make_trainee()`` after seeding) and return its result record.

    ``progress``: ``False``, ``True`` (a tqdm bar with ETA) or an int (that bar on terminal line
    ``progress``, for runs in parallel processes). Every epoch is one
    :func:`~branchify.recipes.loop.run_epoch` over the whole training subset in fp32, the
    trainee's loss checked for a finite value at every step (:class:`FloatingPointError`).

    Examples:
        >>> regime = Regime("tiny", depth=8, train_size=100, epochs=1, eval_points=1)   # doctest: +SKIP
        >>> rec = train_run(regime, lambda: PlainTrainee(regime), 0, method="baseline",  # doctest: +SKIP
        ...                 implementation="branchify")
        >>> rec["history"][-1]["epoch"], rec["target_acc"]                            # doctest: +SKIP
    """
    own_views = method.split(":")[0] in regime.peer_views and regime.augment
    train_loader, test_loader = load_data(regime, seed, data_root, augment=False if own_views else None)
    torch.manual_seed(seed)
    trainee = make_trainee()
    params = [p for p in trainee.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=regime.lr, momentum=0.9, nesterov=True, weight_decay=regime.weight_decay)
    steps = len(train_loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=regime.lr, total_steps=regime.epochs * steps,
                                                pct_start=regime.pct_start)
    evals = {round(regime.epochs * (i + 1) / regime.eval_points) for i in range(regime.eval_points)}
    bar = progress_bar(regime.epochs * steps, f"{implementation}/{method}/seed{seed}", progress)
    history, t0, train_s = [], time.perf_counter(), 0.0
    trainee.model.train()
    for epoch in range(regime.epochs):
        trainee.set_epoch(epoch)
        t_epoch = time.perf_counter()
        stats = run_epoch(_finite_loss(trainee, epoch, f"{implementation} {method} seed {seed}"), opt, sched,
                          train_loader, bar=bar)
        train_s += time.perf_counter() - t_epoch
        if epoch + 1 in evals:
            metrics = evaluate(trainee, test_loader)
            history.append({"epoch": epoch + 1, "loss": stats.last_loss.item(), **metrics})
            bar.set_postfix(acc=f"{metrics['target_acc']:.2f}")
    bar.close()
    final = history[-1]
    return {"regime": regime.name, "method": method, "implementation": implementation, "seed": seed,
            "target_acc": final["target_acc"], "ensemble_acc": final["ensemble_acc"],
            "leaf_accs": final["leaf_accs"], "train_seconds": train_s,
            "wall_seconds": time.perf_counter() - t0,
            "trained_params": sum(p.numel() for p in params), "history": history,
            "regime_config": asdict(regime)}
