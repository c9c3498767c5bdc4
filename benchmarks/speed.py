"""Training-step speed and memory: plain model vs hand-written trees vs branchify (loop, batched),
each also under torch.compile, for ONE, TSA-2-3, AHBF and DML trees of a CIFAR ResNet-32.

One process; every variant of a batch size is timed round-robin (``interleaved_medians``) so
load drift hits all alike; medians of full steps (forward, sum of per-leaf cross-entropies,
backward, SGD with momentum). Compiled variants compile ``forward + loss`` with
``fullgraph=True`` (backward through the compiled graph, eager optimiser step) and are warmed
up (compiled) before timing. Memory comes from one extra step per variant after timing
(:mod:`benchmarks.memory`: the CUDA peak, and what autograd saves for backward).

Printed ratios: branchify over hand-written (the performance contract asks <= 1.05; both forms
and the form ``batched="auto"`` picks on this device), batched over loop, and every variant
over the compiled plain model (the floor: one network, no tree).

    python -m benchmarks.speed --batch 128 --reps 5 --threads 1 --compile --out benchmarks/results/speed_cpu.json
    python -m benchmarks.speed --batch 512 --reps 3 --threads 1 --compile --out benchmarks/results/speed_cpu_b512.json
    python -m benchmarks.speed --device cuda --amp --channels-last --batch 128 512 --reps 40 --warmup 3 \\
        --compile --compile-mode reduce-overhead --out benchmarks/results/speed_h100.json
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import branchify as bf
from branchify.surgery.batched import wants_vmap
from branchify.recipes.zoo import resnet32

from .common import interleaved_medians, machine_info, sgd_step, sync, table, write_results
from .handwritten import HandAHBF, HandDML, HandONE, HandTSA
from .memory import step_memory

CLASSES = 100

TREES: dict[str, tuple[Callable[[], nn.Module], bf.Spec]] = {
    "ONE": (lambda: HandONE(3, CLASSES, gate=False), bf.Spec(splits=["layer3"], fanout=[3])),
    "TSA-2-3": (lambda: HandTSA(CLASSES), bf.Spec(splits=["layer2", "layer3"], fanout=[2, 2])),
    "AHBF": (lambda: HandAHBF(4, 4, CLASSES), bf.Spec(splits=["layer3"], fanout=[4],
                                                      deepen={"layer3": [0, 4, 8, 12]})),
    "DML": (lambda: HandDML(2, CLASSES), bf.Spec(splits=["<input>"], fanout=[2])),
}
FORMS = ("hand", "loop", "batched")


@dataclass
class Variant:
    """One timed configuration: a model, its step, and what it is."""

    tree: str
    form: str  # plain | hand | loop | batched
    compiled: bool
    step: Callable[[], None]
    params: int
    compile_s: float | None = None

    @property
    def name(self) -> str:
        return f"{self.tree} {self.form}" + (" +compile" if self.compiled else "")


def _logits(out) -> list[torch.Tensor]:
    if hasattr(out, "logits"):
        return list(out.logits)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool, compiled: bool,
              compile_mode: str | None) -> Callable[[], None]:
    """A full training step; with ``compiled``, forward + loss run as one fullgraph compiled graph."""
    device_type = x.device.type

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        return sum(F.cross_entropy(z.float(), y) for z in _logits(out))

    fn = torch.compile(forward_loss, fullgraph=True, mode=compile_mode) if compiled else forward_loss
    return sgd_step(model, lambda: fn(x, y))


def build_variants(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> list[Variant]:
    device = x.device
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    variants = []
    for compiled in ([False, True] if args.compile else [False]):
        torch.manual_seed(0)
        plain = resnet32(CLASSES)
        variants.append(_variant("plain", "plain", plain, compiled, args, x, y, fmt))
        for tree in args.trees:
            if compiled and tree not in args.compile_trees:
                continue
            hand_fn, spec = TREES[tree]
            for form in args.forms:
                torch.manual_seed(0)
                if form == "hand":
                    model = hand_fn()
                else:
                    model = bf.branchify(resnet32(CLASSES), spec, batched=form == "batched")
                    if form == "batched" and not model.batch_groups:
                        print(f"skip {tree} batched: no identical sibling replicas (deepened leaves run "
                              f"on the loop), so it is the loop form")
                        continue
                variants.append(_variant(tree, form, model, compiled, args, x, y, fmt))
    return variants


def _variant(tree: str, form: str, model: nn.Module, compiled: bool, args: argparse.Namespace,
             x: torch.Tensor, y: torch.Tensor, fmt: torch.memory_format) -> Variant:
    model = model.to(x.device, memory_format=fmt).train()
    step = make_step(model, x, y, args.amp, compiled, args.compile_mode)
    v = Variant(tree, form, compiled, step, sum(p.numel() for p in model.parameters()))
    if compiled:  # compile outside the timed region (two calls: forward/backward graphs, then steady)
        sync(x.device)
        t0 = time.perf_counter()
        step()
        step()
        sync(x.device)
        v.compile_s = time.perf_counter() - t0
        print(f"compiled {v.name} in {v.compile_s:.0f} s", flush=True)
    return v


def ratios(res: dict[str, dict], trees: list[str], device: torch.device) -> dict[str, float]:
    """The ratios the performance contract asks for (only where both sides were timed)."""
    med = {k: v["median_ms"] for k, v in res.items()}
    auto_form = "batched" if wants_vmap("auto", device) else "loop"
    out: dict[str, float] = {}
    for tree in trees:
        for c in ("", " +compile"):
            hand = med.get(f"{tree} hand{c}")
            loop = med.get(f"{tree} loop{c}")
            batched = med.get(f"{tree} batched{c}")
            default = batched if auto_form == "batched" and batched is not None else loop
            if hand and loop:
                out[f"{tree}{c}: loop / hand"] = loop / hand
            if hand and batched:
                out[f"{tree}{c}: batched / hand"] = batched / hand
            if hand and default:
                out[f"{tree}{c}: branchify (auto={auto_form}) / hand"] = default / hand
            if loop and batched:
                out[f"{tree}{c}: batched / loop"] = batched / loop
    floor = med.get("plain plain +compile") or med.get("plain plain")
    for k, v in med.items():
        out[f"{k} / plain{' +compile' if 'plain plain +compile' in med else ''}"] = v / floor
    return out


def run_batch(args: argparse.Namespace, batch: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    variants = build_variants(args, x, y)
    t0 = time.perf_counter()
    res = interleaved_medians({v.name: v.step for v in variants}, args.reps, args.warmup, device)
    timing_s = time.perf_counter() - t0
    if not args.no_memory:
        for v in variants:
            res[v.name].update(step_memory(v.step, device, v.compiled))
    for v in variants:
        res[v.name].update(tree=v.tree, form=v.form, compiled=v.compiled, params=v.params,
                           compile_s=v.compile_s)
    r = ratios(res, args.trees, device)
    floor = res.get("plain plain +compile", res["plain plain"])["median_ms"]
    rows = [{"variant": k, "median ms": f"{v['median_ms']:.1f}",
             "min-max ms": f"{v['min_ms']:.0f}-{v['max_ms']:.0f}",
             "x floor": f"{v['median_ms'] / floor:.2f}",
             "peak MiB": "" if v.get("peak_mb") is None else f"{v['peak_mb']:.0f}",
             "saved MiB": "" if v.get("saved_mb") is None else f"{v['saved_mb']:.0f}",
             "params": f"{v['params'] / 1e6:.2f}M"} for k, v in res.items()]
    print(f"\nbatch {batch} ({timing_s:.0f} s of timing; floor = "
          f"{'compiled ' if 'plain plain +compile' in res else ''}plain ResNet-32)")
    print(table(rows, ["variant", "median ms", "min-max ms", "x floor", "peak MiB", "saved MiB", "params"]))
    for k, v in r.items():
        if "/ plain" not in k:
            print(f"  {k}: {v:.3f}")
    return {"batch": batch, "results": res, "ratios": r, "timing_s": timing_s}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (on a shared machine 1 avoids OpenMP barrier stalls)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--trees", nargs="+", default=list(TREES), choices=list(TREES))
    p.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    p.add_argument("--compile-trees", nargs="*", default=None,
                   help="trees to compile (default: all given with --trees); plain is always compiled")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="benchmarks/results/speed_cpu.json")
    args = p.parse_args(argv)
    if args.compile_trees is None:
        args.compile_trees = list(args.trees)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # Every compiled variant runs the same `forward_loss` code object (guarded on its model), so
    # each variant is one more cache entry of that code: allow more than dynamo's default of 8.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    runs = [run_batch(args, b, device) for b in args.batch]
    payload = {"benchmark": "speed", "model": "resnet32 (100 classes), 3x32x32 input",
               "loss": "sum of per-leaf cross-entropies", "optimizer": "SGD momentum 0.9",
               "amp_bf16": args.amp, "channels_last": args.channels_last, "reps": args.reps,
               "compile_mode": args.compile_mode, "machine": machine_info(device),
               "batched_auto_form": "batched" if wants_vmap("auto", device) else "loop",
               "memory": {"peak_mb": "CUDA only: max_memory_allocated during one step minus memory_allocated "
                                     "before it",
                          "saved_mb": "eager only: distinct storages autograd saves for backward in one step "
                                      "(no CPU allocator statistics exist; see benchmarks/memory.py)"},
               "runs": runs}
    print("wrote", write_results(args.out, payload))
    return payload


if __name__ == "__main__":
    main()
