"""Step time and memory of the newer presets (PCL, KDCL, OKDPH) next to ONE and the plain network,
and what a temporal-mean (EMA) teacher adds to a ONE step.

A CIFAR ResNet-32 (100 classes, 3x32x32 random input, batch 64) is trained one full step at a
time: forward, the preset's own loss ``okd(model(x), y).total`` (the plain network: cross-entropy),
backward, SGD (momentum 0.9) step over ``model.parameters()``. Every method is built with
``bf.method(name, net, model_fn=...)`` at its defaults unless said:

- ``plain``: the ResNet-32 alone; ``one``: ONE (trunk to ``layer2``, 3 ``layer3`` branches, gate);
- ``pcl``: PCL without views (3 peers, peer-ensemble head, EMA of the whole tree teaching: its
  TemporalMean has ``teach=True``, so every step also runs the EMA copy without autograd);
  ``pcl+views``: with ``views=bf.views.crop_flip(4)``, so the trunk runs once per peer (and the
  EMA copy on the same views);
- ``kdcl`` / ``kdcl+views``: 2 whole networks (split ``<input>``), mean-logit teacher;
- ``okdph``: 2 whole networks + the hybrid-weight network, ``views=bf.views.crop_flip(4)`` (without
  views its identical students would stay identical; it warns);
- ``one+ema-update``: ONE + ``bf.TemporalMean(0.999, teach=False)`` (bookkeeping only: a version
  counter check and one ``_foreach`` EMA update of every parameter, BatchNorm buffers copied);
  ``one+ema-teacher``: ONE + ``bf.TemporalMean(0.999)`` (the EMA copy also runs every forward).

What OKDPH runs per batch (``branchify/hybrid.py``): the model's forward pre-hook asks the
StepWatch whether the weights moved (a version-counter comparison; it counts the step), then
``WeightFusion.forward`` mixes the students' state dicts (``hybrid_state``: the mean, detached),
copies the mixture into the hidden hybrid network and runs it on its own view under
``torch.no_grad`` (``hybrid_grad=False``, the default). The fuse-back (``fusion.fuse()``) is *not*
on the per-batch path with the default ``fuse_every="1_epoch"``: it runs in ``okd.set_epoch`` when
the epoch moves on (or every k steps only with ``"<k>_batch"``). The benchmark sets the epoch once
(100 of 300, so PCL's ramp is 1), so no timed step fuses. After the steps, the per-batch extras are
also timed alone (``parts_ms``): the EMA update, the EMA teacher's forward, OKDPH's hybrid (build +
forward) and one OKDPH fuse-back.

Timing: every variant warms up one step, then all are timed round-robin ``--reps`` times
(``benchmarks.common.interleaved_medians``: load drift hits all alike); median/min/max ms, and the
*paired* ratio to ONE: the median over rounds of (variant / ONE in the same round). Memory
(``benchmarks.memory.step_memory``, one extra step after timing): on CPU ``saved_mb``, the distinct
storages autograd saves for backward (the activations a step's peak is made of; forwards under
``no_grad`` - the EMA teacher, the hybrid - save nothing, their transient activations are not
counted); on CUDA also ``peak_mb``. ``state_mb``: the model's state dict (distinct storages),
which includes the hidden EMA copy / hybrid network. One thread (``torch.set_num_threads(1)``).

    OMP_NUM_THREADS=1 nice -n 5 python -m benchmarks.method_speed --batch 64 --reps 5 \\
        --out benchmarks/results/method_speed_cpu

writes ``<out>/results.json`` (machine info, every variant) and ``<out>/summary.md`` (the table,
the EMA overheads, the OKDPH finding).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import branchify as bf
from branchify.recipes.zoo.resnet import CifarResNet

from .common import interleaved_medians, machine_info, markdown_table, sgd_step, table, timed_ms, write_results
from .memory import step_memory

CLASSES = 100
EPOCH, TOTAL_EPOCHS = 100, 300  # past PCL's ramp (weight 1); OKDPH's epoch schedule is given its epoch
# The EMA variants come right after ONE: in every round they run next to the step they are compared with.
VARIANTS = ("plain", "one", "one+ema-update", "one+ema-teacher", "pcl", "pcl+views", "kdcl", "kdcl+views",
            "okdph")
PER_BATCH = {
    "one": "trunk once, 3 branches, gate; no hidden network",
    "pcl": "trunk once, 3 peers, peer-ensemble head; EMA sync (version check + foreach update) and the "
           "EMA copy's forward (no autograd) every step",
    "pcl+views": "as pcl, but the trunk runs once per peer on its own view (3x), the EMA copy too",
    "kdcl": "2 whole networks on the same batch, mean-logit teacher",
    "kdcl+views": "2 whole networks, each on its own crop+flip view",
    "okdph": "2 whole networks on their views; StepWatch check; hybrid = mean of the 2 state dicts, "
             "copied into the hidden network, its forward (no autograd) on a third view; fuse-back only "
             "when the epoch moves on (okd.set_epoch), never inside a timed step",
    "one+ema-update": "ONE + EMA sync (version check + foreach update + BN buffer copy); no extra forward",
    "one+ema-teacher": "ONE + EMA sync + the EMA copy's forward (no autograd) every step",
}


def network(depth: int) -> nn.Module:
    """The CIFAR ResNet of ``depth`` (32: ``branchify.recipes.zoo.resnet32``) with 100 classes."""
    return CifarResNet(depth, num_classes=CLASSES, block="basic")


def build(name: str, depth: int) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``(model, loss(x, y))`` of one variant; methods at their defaults unless the name says."""
    torch.manual_seed(0)
    net = network(depth)
    if name == "plain":
        return net, lambda x, y: F.cross_entropy(net(x), y)
    preset, _, extra = name.partition("+")
    kw: dict = {"model_fn": lambda: network(depth)}
    if extra == "views" or preset == "okdph":
        kw["views"] = bf.views.crop_flip(4)
    model, okd = bf.method(preset, net, **kw)
    if extra == "ema-update":
        bf.TemporalMean(0.999, teach=False).attach(model)
    elif extra == "ema-teacher":
        bf.TemporalMean(0.999).attach(model)
    okd.set_epoch(EPOCH, TOTAL_EPOCHS)
    return model, lambda x, y: okd(model(x), y).total


def make_step(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One full training step: forward + loss, backward, SGD (momentum 0.9) step."""
    return sgd_step(model, lambda: loss_fn(x, y))


def state_mb(model: nn.Module) -> float:
    """MiB of the distinct storages in ``model.state_dict()`` (hidden EMA / hybrid networks included)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return sum(seen.values()) / 2**20


def median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    """Median ms of ``fn`` over ``reps`` calls (a part of a step timed on its own)."""
    return statistics.median(timed_ms(fn, device) for _ in range(max(reps, 1)))


def components(models: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, float]:
    """The per-batch extras timed alone (ms): EMA update, EMA teacher forward, OKDPH hybrid, OKDPH fuse-back."""
    parts = {}
    if "one+ema-update" in models:
        parts["ema_update"] = models["one+ema-update"].temporal.update
    if "one+ema-teacher" in models:
        parts["ema_teacher_forward"] = lambda: models["one+ema-teacher"].temporal(x)
    if "okdph" in models:
        parts["okdph_hybrid_build_and_forward"] = lambda: models["okdph"].fusion(x)
        parts["okdph_fuse_back"] = models["okdph"].fusion.fuse  # last: it changes the students' weights
    return {k: median_ms(fn, reps, x.device) for k, fn in parts.items()}


def recorded(fn: Callable[[], None], log: list[float], device: torch.device) -> Callable[[], None]:
    """``fn`` that also appends its own duration (ms) to ``log`` (the raw times of every round)."""
    def timed() -> None:
        log.append(timed_ms(fn, device))

    return timed


def measure(args: argparse.Namespace) -> dict:
    """Build every variant, time them round-robin, then one memory step each and the parts alone."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (args.batch,), generator=gen).to(device)
    models, steps, logs = {}, {}, {}
    for name in args.variants:
        model, loss_fn = build(name, args.depth)
        models[name] = model.to(device).train()
        logs[name] = []
        steps[name] = make_step(models[name], loss_fn, x, y)
    t0 = time.perf_counter()
    timing = interleaved_medians({k: recorded(f, logs[k], device) for k, f in steps.items()}, reps=args.reps,
                                 warmup=1, device=device)
    elapsed = time.perf_counter() - t0
    variants = {}
    for name in args.variants:
        mem = step_memory(steps[name], device, compiled=False)
        variants[name] = {**timing[name], "times_ms": logs[name][1:], "saved_mb": mem["saved_mb"],
                          "peak_mb": mem["peak_mb"], "state_mb": state_mb(models[name]),
                          "params_trained": sum(p.numel() for p in models[name].parameters()),
                          "per_batch": PER_BATCH.get(name, "the network alone, cross-entropy")}
    payload = {"benchmark": "method_speed", "machine": machine_info(device),
               "config": {"depth": args.depth, "batch": args.batch, "size": args.size, "classes": CLASSES,
                          "reps": args.reps, "warmup": 1, "epoch": EPOCH, "total_epochs": TOTAL_EPOCHS,
                          "optimizer": "SGD lr 0.01 momentum 0.9"},
               "timing_s": elapsed, "variants": variants}
    payload["parts_ms"] = components(models, x, max(args.reps, 3))
    if "okdph" in models:
        every = models["okdph"].fusion.every
        payload["okdph_fuse_every"] = None if every is None else f"{every[0]}_{every[1]}"
    payload["ratios"] = ratios(variants)
    return payload


def ratios(variants: dict[str, dict]) -> dict[str, float]:
    """Per variant over ONE and over plain: the ratio of medians, and (``paired``) the median over rounds
    of the ratio of the two steps timed in the same round (robust to load drift between rounds)."""
    out: dict[str, float] = {}
    for base in ("one", "plain"):
        if base not in variants:
            continue
        b = variants[base]
        for name, v in variants.items():
            out[f"{name} / {base}"] = v["median_ms"] / b["median_ms"]
            out[f"{name} / {base} paired"] = statistics.median(t / u for t, u in zip(v["times_ms"], b["times_ms"]))
            out[f"{name} / {base} min"] = v["min_ms"] / b["min_ms"]
    return out


COLUMNS = ["variant", "ms/step", "min-max", "x ONE", "x ONE paired", "x plain", "saved MiB", "state MiB",
           "params trained"]


def _rows(payload: dict) -> list[dict[str, str]]:
    """One formatted row per variant (the columns of :data:`COLUMNS`)."""
    r = payload["ratios"]
    rows = []
    for name, d in payload["variants"].items():
        rows.append({"variant": name, "ms/step": f"{d['median_ms']:.0f}",
                     "min-max": f"{d['min_ms']:.0f}-{d['max_ms']:.0f}",
                     "x ONE": f"{r[f'{name} / one']:.2f}" if f"{name} / one" in r else "",
                     "x ONE paired": f"{r[f'{name} / one paired']:.2f}" if f"{name} / one" in r else "",
                     "x plain": f"{r[f'{name} / plain']:.2f}" if f"{name} / plain" in r else "",
                     "saved MiB": f"{d['saved_mb']:.0f}", "state MiB": f"{d['state_mb']:.1f}",
                     "params trained": f"{d['params_trained']:,}"})
    return rows


def summary(payload: dict) -> str:
    """The markdown summary: the table, the EMA figures and what OKDPH runs per batch."""
    r, c, m = payload["ratios"], payload["config"], payload["machine"]
    cols = COLUMNS
    lines = [f"# Method step speed (ResNet-{c['depth']}, {c['classes']} classes, batch {c['batch']}, "
             f"{c['size']}x{c['size']}, {m['device']}, {m['torch_threads']} thread(s), torch {m['torch']})", "",
             f"Medians of {c['reps']} round-robin full steps (forward, the preset's loss, backward, "
             f"{c['optimizer']}) after 1 warm-up step; `saved MiB`: what autograd saves for backward in one "
             "step; `state MiB`: the state dict incl. hidden EMA / hybrid networks. Compare ratios within one "
             f"run: absolute times depend on the machine's load ({m['cpu_count']} CPUs).", "",
             markdown_table(cols, [[row[k] for k in cols] for row in _rows(payload)])]
    lines.append("")
    parts, one = payload["parts_ms"], payload["variants"].get("one", {}).get("median_ms")
    for extra, part, what in (("one+ema-update", "ema_update", "EMA bookkeeping (version check + update)"),
                              ("one+ema-teacher", "ema_teacher_forward", "EMA teacher (+ the copy's forward)")):
        if f"{extra} / one" in r:
            alone = f"; the part alone: {parts[part]:.1f} ms = {parts[part] / one:+.1%} of ONE's median step" \
                if part in parts else ""
            lines.append(f"- {what}: `{extra}` / `one` - 1 = {r[f'{extra} / one paired'] - 1:+.1%} (paired "
                         f"per round), {r[f'{extra} / one'] - 1:+.1%} (medians), {r[f'{extra} / one min'] - 1:+.1%} "
                         f"(minima){alone}")
    if "okdph_fuse_back" in parts:
        lines.append(f"- OKDPH per batch: {PER_BATCH['okdph']}. Timed alone: building and running the hybrid "
                     f"{parts['okdph_hybrid_build_and_forward']:.1f} ms per batch; one fuse-back "
                     f"(`model.fusion.fuse()`, schedule {payload['okdph_fuse_every']}) {parts['okdph_fuse_back']:.1f} "
                     f"ms, once per epoch.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Parse the options, run the benchmark, write ``results.json`` and ``summary.md``; returns the payload."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--depth", type=int, default=32, help="CIFAR ResNet depth, 6n+2 (32: ResNet-32)")
    p.add_argument("--size", type=int, default=32, help="input height and width")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--out", default="benchmarks/results/method_speed_cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    payload = measure(args)
    out = Path(args.out)
    write_results(out / "results.json", payload)
    text = summary(payload)
    (out / "summary.md").write_text(text)
    print(table(_rows(payload), COLUMNS), "", *(ln for ln in text.splitlines() if ln.startswith("- ")), sep="\n",
          flush=True)
    return payload


if __name__ == "__main__":
    main()
