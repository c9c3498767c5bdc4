"""CPU accuracy benchmark: branchify's methods and hand-written trees, same recipe, same run.

The regime, the recipe and the training loop live in :mod:`branchify.recipes.regime` (the README
demo trains with them too); this module adds the hand-written trees, the job pool, the pilot grid
and the summary.

Online KD pays where a model overfits (little data, long schedules), so the regime decides
everything. ``pilot`` trains the hand-written trees only (baseline, ONE, TSA, DML) over a grid of
regimes (depth, input size, training-set size, epochs, augmentation) to find one where they
gain; ``run`` then trains every branchify method *and* the hand-written trees in that regime
with one recipe: the same optimizer, schedule, augmentation, data subset and order, and init
seed. Each run is one process with one thread (``--workers`` in parallel); every finished run
is written to ``<out>/runs/<regime>/<implementation>-<method>-seed<k>.json`` at once, so an
interrupted benchmark resumes where it stopped, and ``summarise`` rebuilds the tables and plot.

    python -m benchmarks.accuracy_cpu pilot --seeds 0,1,2 --workers 2
    python -m benchmarks.accuracy_cpu run --seeds 0,1,2,3,4 --workers 2
    python -m benchmarks.accuracy_cpu summarise --out benchmarks/results/accuracy_cpu

Recipe (both implementations): SGD with Nesterov momentum 0.9, weight decay 5e-4, OneCycleLR to
``lr`` with 15% warm-up (torch's defaults otherwise, momentum cycling included), random crop +
horizontal flip, fp32; Fashion-MNIST optionally downsampled 2x (14x14 costs a quarter of 28x28);
a class-stratified training subset and a data order drawn from the seed; accuracy of the
target leaf (what ``export()`` deploys) and of the leaves' mean probabilities on the full
10,000-image test set after the last epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    machine_info,
    markdown_table,
    mean_se,
    mean_std,
    paired_cell,
    paired_differences,
    run_pool,
    write_summary_files,
)
from branchify.recipes.regime import CPU_REGIME, BranchifyTrainee, Regime, parse_variant, train_run
from branchify.recipes.regime import net_fn as regime_net_fn

HAND_METHODS = ["baseline", "one", "tsa", "dml", "pcl"]
BRANCHIFY_METHODS = ["dml", "cl_ilr", "one", "okddip", "tsa", "u_tsa", "ahbf", "pcl", "kdcl", "okdph"]
ALL_METHODS = ["baseline", "dml", "cl_ilr", "one", "okddip", "tsa", "u_tsa", "ahbf", "pcl", "kdcl", "okdph"]
PILOT_HAND_METHODS = ["baseline", "one", "tsa", "dml"]
DEFAULT_OUT = "benchmarks/results/accuracy_cpu"
PILOT_OUT = "benchmarks/results/pilot_cpu"


PILOT_REGIMES = [  # in the order they ran; cost relative to the first row in the comments
    Regime("r8-14px-1k-100ep"),
    Regime("r8-14px-500-200ep", train_size=500, epochs=200),
    Regime("r14-14px-500-200ep", depth=14, train_size=500, epochs=200),        # 1.7x
    Regime("r8-14px-250-400ep", train_size=250, epochs=400),
    Regime("r8-14px-1k-100ep-noaug", augment=False),
    Regime("r14-14px-500-200ep-b128", depth=14, train_size=500, epochs=200, batch_size=128),  # 1.7x
]

# The regime the full benchmark runs (chosen from the pilot; see benchmarks/README.md).
BENCHMARK_REGIME = CPU_REGIME
# Where the AHBF variants (lambdas, init of the deepened blocks) were compared before the benchmark.
AHBF_VARIANTS_REGIME = Regime("r14-14px-1k-100ep", depth=14)


# ---------------------------------------------------------------------- models and losses
def _ramp(epoch: int, length: float) -> float:
    """The sigmoid ramp ``exp(-5 (1 - e/L)^2)`` (ONE's code), written out for the hand-written ONE."""
    if length <= 0 or epoch >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / length) ** 2)


class HandTrainee:
    """A hand-written tree (``benchmarks/handwritten.py``) with its loss, trained like a branchify preset."""

    def __init__(self, method: str, regime: Regime) -> None:
        from benchmarks import handwritten as hw

        net_fn = regime_net_fn(regime)
        self.method, self.epochs = method, regime.epochs
        if method == "pcl":
            self.pcl = HandPCLTrainee(regime)
            self.model = self.pcl.model
            self.target = 0
            return
        self.model: nn.Module = {
            "baseline": lambda: hw.HandBaseline(net_fn),
            "one": lambda: hw.HandONE(3, net_fn=net_fn),
            "tsa": lambda: hw.HandTSA(net_fn=net_fn),
            "dml": lambda: hw.HandDML(2, net_fn=net_fn),
        }[method]()
        self.target = 0

    def loss(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        from benchmarks import handwritten as hw

        if self.method == "pcl":
            return self.pcl.loss(x, y, epoch)
        if self.method == "baseline":
            return F.cross_entropy(self.model(x)[0], y)
        if self.method == "one":  # ONE's ramp: 80 of 300 epochs, scaled to the run (branchify's default)
            logits, trunk = self.model.forward_tree(x)
            return hw.one_loss(logits, trunk, self.model.gate, y, T=3.0, ramp=_ramp(epoch, 80 / 300 * self.epochs))
        if self.method == "tsa":
            return hw.pairwise_loss(self.model(x), y, T=3.0, alpha=0.5)
        return hw.pairwise_loss(self.model(x), y, T=1.0)  # dml

    def leaves(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.method == "pcl":
            return self.pcl.leaves(x)
        return self.model(x)

    def set_epoch(self, epoch: int) -> None:
        pass


class HandPCLTrainee:
    """``benchmarks/handwritten_pcl.py`` trained like the preset: 3 peers on their own crop + flip of
    the un-augmented batch, the mean model updated after every optimiser step (applied before the
    next forward, which is when it is first read), the mean model's peer 0 scored."""

    def __init__(self, regime: Regime) -> None:
        from benchmarks import handwritten_pcl as hp
        from branchify.recipes.regime import peer_views

        self.hp, self.epochs = hp, regime.epochs
        net = hp.HandPCL(3, net_fn=regime_net_fn(regime))
        self.mean = hp.MeanModel(net)
        self.model = nn.ModuleDict({"net": net, "mean": self.mean.net})  # train()/eval() reach both
        self.view = peer_views(regime) if regime.augment else (lambda x, k: x)
        self.stepped = False

    def _catch_up(self) -> None:  # the EMA update that follows each optimiser step
        if self.stepped:
            self.mean.update(self.model["net"])
        self.stepped = False

    def loss(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> torch.Tensor:
        self._catch_up()
        views = [self.view(x, k) for k in range(3)]
        logits, en = self.model["net"](views)
        loss = self.hp.pcl_loss(logits, en, self.mean(views), y, w=self.hp.ramp(epoch, self.epochs))
        self.stepped = True
        return loss

    def leaves(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._catch_up()
        return self.mean([x] * 3)


def trainee_factory(method: str, implementation: str, regime: Regime):
    """What :func:`train_run` builds for one job (after seeding)."""
    if implementation == "handwritten":
        return lambda: HandTrainee(method, regime)
    return lambda: BranchifyTrainee(method, regime)


# ---------------------------------------------------------------------- the pool
def run_path(out: Path, regime: str, implementation: str, method: str, seed: int) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in method.replace(":", "__").replace("=", "-"))
    return out / "runs" / regime / f"{implementation}-{safe}-seed{seed}.json"


def _worker(job: tuple[dict, str, str, int, str, str | None]) -> str:
    regime_dict, method, implementation, seed, out, root = job
    torch.set_num_threads(1)
    regime = Regime(**regime_dict)
    path = run_path(Path(out), regime.name, implementation, method, seed)
    if path.exists():  # finished meanwhile (another run of the benchmark, or copied in)
        return f"{regime.name:24s} {implementation:11s} {method:8s} seed {seed}: already on disk"
    try:
        rec = train_run(regime, trainee_factory(method, implementation, regime), seed, method=method,
                        implementation=implementation, data_root=root)
    except Exception as exc:  # one failed run must not stop the others; it is retried on resume
        return f"FAILED {regime.name} {implementation} {method} seed {seed}: {type(exc).__name__}: {exc}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(path)  # atomic: a killed run leaves no half-written result
    return (f"{regime.name:24s} {implementation:11s} {method:8s} seed {seed}: target {rec['target_acc']:.2f}% "
            f"ensemble {rec['ensemble_acc']:.2f}% ({rec['train_seconds']:.0f}s)")


def run_jobs(jobs: list[tuple[Regime, str, str, int]], out: Path, workers: int, root: str | None) -> None:
    """Run every job whose result file is missing, ``workers`` processes at a time."""
    todo = [j for j in jobs if not run_path(out, j[0].name, j[2], j[1], j[3]).exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already on disk under {out}/runs; {len(todo)} to go "
          f"on {workers} worker(s)", flush=True)
    for regime, *_ in todo:
        (out / "runs" / regime.name).mkdir(parents=True, exist_ok=True)
    run_pool(_worker, [(asdict(r), m, impl, s, str(out), root) for r, m, impl, s in todo], workers)


# ---------------------------------------------------------------------- summary
def load_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]


def summarise(records: list[dict]) -> list[dict]:
    """One row per (regime, implementation, method): mean +- std and the paired gain over the
    baseline of the same seeds (mean +- standard error)."""
    rows = []
    by_key: dict[tuple, dict[int, dict]] = {}
    for r in records:
        by_key.setdefault((r["regime"], r["implementation"], r["method"]), {})[r["seed"]] = r
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    for (regime, impl, method), seeds in sorted(by_key.items(),
                                                key=lambda kv: (kv[0][0], kv[0][2] != "baseline",
                                                                order.get(kv[0][2].split(":")[0], 99),
                                                                kv[0][2], kv[0][1])):
        base = by_key.get((regime, "handwritten", "baseline"), {})
        accs = [seeds[s]["target_acc"] for s in sorted(seeds)]
        ens = [seeds[s]["ensemble_acc"] for s in sorted(seeds)]
        diffs = paired_differences(seeds, base, "target_acc")
        m, sd = mean_std(accs)
        em, esd = mean_std(ens)
        row = {"regime": regime, "implementation": impl, "method": method, "seeds": len(accs),
               "target_mean": m, "target_std": sd, "ensemble_mean": em, "ensemble_std": esd,
               "train_seconds": statistics.fmean(seeds[s]["train_seconds"] for s in seeds)}
        if method != "baseline" and len(diffs) > 0:
            dm, dse = mean_se(diffs)
            row.update(gain_mean=dm, gain_se=dse, paired_seeds=len(diffs))
        rows.append(row)
    return rows


def twin_check(rows: list[dict]) -> list[dict]:
    """branchify vs its hand-written twin: difference of mean target accuracy and its standard error."""
    index = {(r["regime"], r["implementation"], r["method"]): r for r in rows}
    out = []
    for (regime, impl, method), r in index.items():
        hand = index.get((regime, "handwritten", method))
        if impl != "branchify" or hand is None:
            continue
        se = math.sqrt(r["target_std"] ** 2 / r["seeds"] + hand["target_std"] ** 2 / hand["seeds"])
        diff = r["target_mean"] - hand["target_mean"]
        out.append({"regime": regime, "method": method, "diff": diff, "se": se,
                    "within_2se": bool(diff >= -2 * se)})
    return out


def format_rows(rows: list[dict]) -> str:
    return markdown_table(
        ["regime", "implementation", "method", "seeds", "target acc (%)", "gain vs baseline (paired, ±SE)",
         "ensemble acc (%)", "train s/run"],
        [[r["regime"], r["implementation"], r["method"], r["seeds"], f"{r['target_mean']:.2f} ± {r['target_std']:.2f}",
          paired_cell(r, "gain", "-"), f"{r['ensemble_mean']:.2f} ± {r['ensemble_std']:.2f}",
          f"{r['train_seconds']:.0f}"] for r in rows])


def plot(records: list[dict], path: Path, regime: str) -> Path:
    """Per-method target accuracy of every seed, hand-written and branchify side by side, with the
    baseline's mean +- std as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r["regime"] == regime]
    base = [r["target_acc"] for r in recs if r["method"] == "baseline"]
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in recs)]
    fig, ax = plt.subplots(figsize=(1.1 * len(methods) + 2.5, 4.2))
    if base:
        bm, bsd = mean_std(base)
        ax.axhspan(bm - bsd, bm + bsd, color="0.85", label=f"baseline {bm:.2f} ± {bsd:.2f}")
        ax.axhline(bm, color="0.5", lw=1)
    colours = {"handwritten": "tab:blue", "branchify": "tab:red"}
    for i, m in enumerate(methods):
        for j, impl in enumerate(("handwritten", "branchify")):
            pts = [r["target_acc"] for r in recs if r["method"] == m and r["implementation"] == impl]
            if not pts:
                continue
            x = i + (j - 0.5) * 0.3 if m != "baseline" else i
            ax.scatter([x] * len(pts), pts, color=colours[impl], s=18, alpha=0.8,
                       label=impl if i == 1 or (m == "baseline" and impl == "handwritten") else None)
            ax.hlines(statistics.fmean(pts), x - 0.12, x + 0.12, color=colours[impl], lw=2)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("target-leaf test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, {regime}: every seed (dots), mean (bar)")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(out: Path, title: str) -> str:
    records = load_records(out)
    rows = summarise(records)
    twins = twin_check(rows)
    text = [f"# {title}", "", format_rows(rows)]
    if twins:
        text += ["", markdown_table(["regime", "method", "branchify - hand-written", "2 SE", "within 2 SE"],
                                    [[t["regime"], t["method"], f"{t['diff']:+.2f}", f"{2 * t['se']:.2f}",
                                      "yes" if t["within_2se"] else "NO"] for t in twins])]
    write_summary_files(out, "\n".join(text), {
        "machine": machine_info(torch.device("cpu")), "summary": rows, "twins": twins,
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in records]})
    for regime in sorted({r["regime"] for r in records}):
        plot(records, out / f"accuracy_{regime}.png", regime)
    return "\n".join(text)


# ---------------------------------------------------------------------- CLI
def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["pilot", "run", "variants", "summarise"])
    p.add_argument("--seeds", type=_seeds, default=None, help="comma-separated (pilot: 0,1,2; run: 0..4)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--regimes", default=None, help="pilot: comma-separated names to run (default all); "
                                                   "variants: the one regime (a pilot regime's name)")
    p.add_argument("--variants", default=None,
                   help="variants: ';'-separated branchify variants, e.g. 'ahbf:lambdas=[1,1];ahbf:aux=1' "
                        "(the hand-written baseline of the same seeds is added)")
    args = p.parse_args(argv)
    out = Path(args.out or (PILOT_OUT if args.command == "pilot" else DEFAULT_OUT))
    if args.command == "pilot":
        seeds = args.seeds or [0, 1, 2]
        regimes = PILOT_REGIMES if args.regimes is None else [r for r in PILOT_REGIMES if r.name in args.regimes.split(",")]
        jobs = [(r, m, "handwritten", s) for r in regimes for s in seeds for m in PILOT_HAND_METHODS]
        run_jobs(jobs, out, args.workers, args.data_root)
        title = "CPU pilot: hand-written trees over regimes"
    elif args.command == "run":
        seeds = args.seeds or [0, 1, 2, 3, 4]
        r = BENCHMARK_REGIME
        # Seed-major, so an interrupted run has whole seeds (every method) on disk.
        jobs = [(r, m, impl, s) for s in seeds
                for impl, ms in (("handwritten", HAND_METHODS), ("branchify", BRANCHIFY_METHODS)) for m in ms]
        run_jobs(jobs, out, args.workers, args.data_root)
        title = f"CPU accuracy benchmark: {r.name}"
    elif args.command == "variants":
        seeds = args.seeds or [0, 1, 2]
        regimes = {r.name: r for r in [*PILOT_REGIMES, BENCHMARK_REGIME, AHBF_VARIANTS_REGIME]}
        if args.regimes not in regimes or not args.variants:
            p.error(f"variants needs --regimes <one of {sorted(regimes)}> and --variants 'm:k=v;...'")
        r = regimes[args.regimes]
        labels = [v for v in args.variants.split(";") if v]
        for v in labels:
            parse_variant(v)  # malformed labels fail here, before anything trains
        jobs = [(r, "baseline", "handwritten", s) for s in seeds]
        jobs += [(r, v, "branchify", s) for s in seeds for v in labels]
        run_jobs(jobs, out, args.workers, args.data_root)
        title = f"CPU variants: {r.name}"
    else:
        title = "CPU accuracy benchmark"
    print(write_summary(out, title))


if __name__ == "__main__":
    main()
