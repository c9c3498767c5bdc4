"""MD accuracy benchmark: independent training vs MD (and variants of it) over several seeds,
one ``branchify.recipes.md`` subprocess per (variant, seed), several at once.

Each job trains the whole cohort for one run kind (``branchify.recipes.md --runs KIND --seed S``); every
kind builds its peers, data subset and data order from the seed alone, so the variants of one
seed start from the same weights and see the same batches. Small models are launch-bound on a
GPU, so a pool of ``--workers`` concurrent jobs keeps it busy.

A variant is a run kind (``independent``, ``md``, ``md_fixed``), optionally followed by ``:`` and
``branchify.recipes.md`` flags without their dashes (``md:kd-t2``, ``md:temperature=4``,
``md:kd-t2:temperature=4``), optionally followed by ``@`` and ``+``-separated seeds that
replace ``--seeds`` for that variant (``md_fixed@0``, ``md:kd-t2@0+1``). Arguments after
``--`` go to every job.

    python -m benchmarks.md_accuracy --models resnet32,vgg16,mobilenetv2_0.5 --seeds 0,1,2 \\
        --variants independent,md,md:kd-t2,md_fixed@0 --workers 10 --out benchmarks/results/md_accuracy \\
        -- --subset 5000 --test-subset 0 --epochs 60 --t-in 10 --t-d 30 --batch-size 128 --lr 0.1
    python -m benchmarks.md_accuracy --summarise --out benchmarks/results/md_accuracy
    python -m benchmarks.md_accuracy --variants md,md:temperature=4 --dry-run    # only print the commands
    python -m benchmarks.md_accuracy --seeds 0 --variants independent,md:kd-t2 --workers 2 -- --smoke

Writes ``<out>/runs/<variant>-seed<k>/`` as each job finishes (``branchify.recipes.md``'s ``results.json``
and ``summary.md``, plus ``job.json``: variant, seed, command, exit status, wall time) and the
job's output to ``<out>/runs/<variant>-seed<k>.log``, so an interrupted benchmark keeps what it
finished; ``--summarise`` rebuilds the tables from every folder under ``<out>/runs``. Then
``<out>/summary.md`` (the settings read from the runs, per-peer and ensemble accuracy as mean ±
std over seeds with each variant's difference to ``independent``, mean train time per variant)
and ``<out>/results.json`` (every job's accuracies, time and MD weights per cycle, the summary
rows, the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from branchify.recipes.cli import machine
from branchify.recipes.md import RUNS, build_parser
from branchify.recipes.md import parse_args as md_parse_args

#: branchify.recipes.md flags the benchmark sets per job (or that cannot work in a pool of one-kind jobs).
RESERVED = {
    "runs": "the variant's run kind sets it",
    "fixed-weights": "use the md_fixed variant",
    "seed": "use --seeds or VARIANT@SEEDS",
    "out": "each job writes <out>/runs/<variant>-seed<k>",
    "models": "use the benchmark's --models",
    "threads": "use the benchmark's --threads",
    "distributed": "jobs are single processes",
    "checkpoint-dir": "concurrent jobs would share one checkpoint folder",
}
#: Rough relative cost, so the longest jobs start first and the pool's tail is short.
COST = {"md": 2, "md_fixed": 2, "independent": 1}
REPO = Path(__file__).resolve().parents[1]
"""The repository root (above ``benchmarks/``): put on the jobs' PYTHONPATH so ``python -m
branchify.recipes.md`` imports this checkout's branchify."""


@dataclass
class Job:
    variant: str  # the label, e.g. "md:kd-t2"
    kind: str
    flags: list[str]  # the variant's branchify.recipes.md flags
    seed: int
    folder: Path

    @property
    def log(self) -> Path:
        return self.folder.with_name(self.folder.name + ".log")

    def command(self, models: str, threads: int, extra: list[str]) -> list[str]:
        return [sys.executable, "-m", "branchify.recipes.md", "--runs", self.kind, "--seed", str(self.seed),
                *self.flags, "--out", str(self.folder), "--models", models, "--threads", str(threads), *extra]


# ---------------------------------------------------------------------- variants and jobs
def md_options() -> set[str]:
    """The long option names branchify.recipes.md accepts, without dashes."""
    return {o[2:] for a in build_parser()._actions for o in a.option_strings if o.startswith("--")}


def parse_variant(text: str) -> tuple[str, str, list[str], list[int] | None]:
    """``"md:kd-t2:temperature=4@0+1"`` -> ``("md:kd-t2:temperature=4", "md",
    ["--kd-t2", "--temperature", "4"], [0, 1])``: label, run kind, branchify.recipes.md flags, seeds.

    Raises:
        SystemExit: for an unknown run kind or flag, a flag the benchmark sets itself, or bad seeds.
    """
    label, at, seed_text = text.strip().partition("@")
    kind, *pairs = label.split(":")
    if kind not in RUNS:
        raise SystemExit(f"variant {text!r}: unknown run kind {kind!r}; a variant is a run kind out of "
                         f"{', '.join(RUNS)}, optionally followed by ':' and branchify.recipes.md flags without "
                         f"their dashes (md:kd-t2, md:temperature=4) and '@' seeds (md_fixed@0)")
    options, flags = md_options(), []
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if name in RESERVED:
            raise SystemExit(f"variant {text!r}: --{name} is set by the benchmark ({RESERVED[name]})")
        if name not in options:
            raise SystemExit(f"variant {text!r}: branchify.recipes.md has no flag --{name}; "
                             f"valid flags: {', '.join(sorted(options - set(RESERVED) - {'help'}))}")
        flags += [f"--{name}", value] if eq else [f"--{name}"]
    seeds = None
    if at:
        try:
            seeds = [int(s) for s in seed_text.split("+")]
        except ValueError:
            raise SystemExit(f"variant {text!r}: seeds after '@' must be integers joined by '+', "
                             f"e.g. md_fixed@0+1") from None
    return label, kind, flags, seeds


def check_extra(extra: list[str]) -> None:
    """Refuse arguments after ``--`` that the benchmark sets per job."""
    for token in extra:
        name = token[2:].partition("=")[0] if token.startswith("--") else None
        if name in RESERVED:
            raise SystemExit(f"argument {token!r} after '--': --{name} is set by the benchmark ({RESERVED[name]})")


def folder_name(label: str, seed: int) -> str:
    """``"md:kd-t2", 1`` -> ``"md_kd-t2-seed1"``: a file-system-safe folder name."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", label.replace(":", "_").replace("=", "-")) + f"-seed{seed}"


def make_jobs(variants: list[str], seeds: list[int], out: Path) -> list[Job]:
    jobs, seen = [], set()
    for text in variants:
        label, kind, flags, own_seeds = parse_variant(text)
        for s in own_seeds if own_seeds is not None else seeds:
            name = folder_name(label, s)
            if name in seen:
                raise SystemExit(f"variant {text!r}: {label} seed {s} is given twice")
            seen.add(name)
            jobs.append(Job(label, kind, flags, s, out / "runs" / name))
    # Longest first, so the pool's tail is short.
    return sorted(jobs, key=lambda j: -COST.get(j.kind, 1))


def validate(job: Job, models: str, threads: int, extra: list[str]) -> None:
    """Parse the job's command line as branchify.recipes.md would, before anything is launched."""
    args = job.command(models, threads, extra)[3:]
    try:
        md_parse_args(args)
    except SystemExit:
        raise SystemExit(f"branchify.recipes.md rejects the arguments of variant {job.variant!r} "
                         f"(see its error above): {' '.join(args)}") from None


# ---------------------------------------------------------------------- running
def job_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def run_job(job: Job, command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one job to completion; write its log and job.json; a stale results.json is removed first."""
    job.folder.mkdir(parents=True, exist_ok=True)
    for stale in ("results.json", "summary.md", "job.json"):
        (job.folder / stale).unlink(missing_ok=True)
    t0 = time.perf_counter()
    with job.log.open("w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path.cwd()).returncode
    info = {"variant": job.variant, "kind": job.kind, "seed": job.seed, "command": command, "returncode": rc,
            "wall_seconds": time.perf_counter() - t0}
    (job.folder / "job.json").write_text(json.dumps(info, indent=2))
    return info


def describe(job: Job, info: dict[str, Any], tail: int = 20) -> tuple[bool, str]:
    """Whether a finished job succeeded, and its progress line (a failed job's log tail follows it)."""
    what = f"{job.variant} seed {job.seed}"
    if info["returncode"] != 0 or not (job.folder / "results.json").is_file():
        lines = job.log.read_text(errors="replace").splitlines()[-tail:]
        return False, (f"{what}: FAILED (exit status {info['returncode']}, {info['wall_seconds']:.0f}s), "
                       f"last lines of {job.log}:\n    " + "\n    ".join(lines))
    rec = read_run(job.folder)
    accs = "  ".join(f"{m} {a:.2f}" for m, a in zip(rec["models"], rec["acc"]))
    return True, (f"{what}: {accs}  ensemble {rec['ensemble_acc']:.2f}  "
                  f"(train {rec['seconds']:.0f}s, wall {info['wall_seconds']:.0f}s)")


def run_all(jobs: list[Job], models: str, threads: int, workers: int, extra: list[str]) -> list[Job]:
    """Run the jobs through a pool of ``workers`` subprocesses; returns the jobs that failed."""
    env, failed, t0 = job_env(threads), [], time.time()
    print(f"{len(jobs)} job(s), {workers} at a time; logs in {jobs[0].folder.parent}/", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(run_job, j, j.command(models, threads, extra), env): j for j in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            ok, line = describe(job, future.result())
            if not ok:
                failed.append(job)
            print(f"[{time.time() - t0:6.0f}s {done}/{len(jobs)}] {line}", flush=True)
    return failed


# ---------------------------------------------------------------------- summary
def read_run(folder: Path) -> dict[str, Any]:
    """One finished job: its job.json and the one run kind of branchify.recipes.md's results.json."""
    job = json.loads((folder / "job.json").read_text())
    res = json.loads((folder / "results.json").read_text())
    r = res["results"][job["kind"]]
    return {"variant": job["variant"], "kind": job["kind"], "seed": job["seed"], "folder": folder.name,
            "models": res["models"], "acc": r["acc"], "ensemble_acc": r["ensemble_acc"], "seconds": r["seconds"],
            "wall_seconds": job["wall_seconds"], "params": r.get("params"),
            "cycles": [{k: c[k] for k in ("cycle", "epoch", "source", "accuracies", "weights")} for c in r["cycles"]],
            "config": res["config"], "sizes": res.get("sizes"), "machine": res.get("machine", {}),
            "device": res.get("device", res["config"]["device"])}


def load_runs(out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every finished job under ``<out>/runs``, in variant then seed order, and the unfinished ones."""
    runs, missing = [], []
    for job_file in sorted((out / "runs").glob("*/job.json")):
        if (job_file.parent / "results.json").is_file():
            runs.append(read_run(job_file.parent))
        else:
            missing.append(job_file.parent.name)
    return sorted(runs, key=lambda r: (*variant_key(r["variant"]), r["seed"])), missing


def variant_key(label: str) -> tuple[int, bool, str]:
    kind = label.partition(":")[0]
    return RUNS.index(kind) if kind in RUNS else len(RUNS), label != kind, label


def peer_names(models: list[str]) -> list[str]:
    """Model names as row labels; a model used twice gets its peer index."""
    return [m if models.count(m) == 1 else f"{m} #{i}" for i, m in enumerate(models)]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per peer and the ensemble: each variant's mean, std (population, over seeds), n and
    values, and each variant's mean minus independent's."""
    models = runs[0]["models"]
    other = sorted({f"{r['folder']} ({','.join(r['models'])})" for r in runs if r["models"] != models})
    if other:
        raise SystemExit(f"the runs do not train the same models ({','.join(models)} in {runs[0]['folder']}); "
                         f"different: {'; '.join(other)}")
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    rows = []
    for i, peer in enumerate([*peer_names(models), "ensemble"]):
        cells = {}
        for v in variants:
            values = [r["acc"][i] if peer != "ensemble" else r["ensemble_acc"] for r in runs if r["variant"] == v]
            cells[v] = {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                        "n": len(values), "values": values}
        base = cells.get("independent")
        rows.append({"peer": peer, "variants": cells,
                     "vs_independent": {v: c["mean"] - base["mean"] for v, c in cells.items() if v != "independent"}
                     if base else {}})
    return rows


def timing(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for v in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == v]
        rows.append({"variant": v, "jobs": len(rs), "train_seconds": statistics.mean(r["seconds"] for r in rs),
                     "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    variants = list(rows[0]["variants"])
    deltas = list(rows[0]["vs_independent"])
    show_n = len({c["n"] for c in rows[0]["variants"].values()}) > 1
    head = ("| peer | " + " | ".join(f"{v} (%)" for v in variants)
            + "".join(f" | {v} vs independent" for v in deltas) + " |")
    lines = [head, "|" + "---|" * (1 + len(variants) + len(deltas))]

    def cell(c: dict[str, Any]) -> str:  # no spread is shown when one seed measured none
        text = f"{c['mean']:.2f} ± {c['std']:.2f}" if c["n"] > 1 else f"{c['mean']:.2f}"
        return text + (f" (n={c['n']})" if show_n else "")

    for r in rows:
        cells = [cell(r["variants"][v]) for v in variants] + [f"{r['vs_independent'][v]:+.2f}" for v in deltas]
        lines.append(f"| {r['peer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_timing(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | jobs | train time (s, mean) | wall time (s, mean) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['jobs']} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


def settings(runs: list[dict[str, Any]]) -> dict[str, str]:
    """The training settings read from the runs' configs; a setting that differs lists its values."""

    def one(r: dict[str, Any]) -> dict[str, Any]:
        c, sizes, m = r["config"], r["sizes"] or {}, r["machine"]
        return {"dataset": c["dataset"], "train size": sizes.get("train", c["subset"] or "all"),
                "validation": c.get("val", 0), "test size": sizes.get("test", c["test_subset"] or "all"),
                "epochs": c["epochs"], "T_in": c["t_in"], "T_d": c["t_d"], "temperature": c["temperature"],
                "batch size": c["batch_size"], "lr": c["lrs"] or c["lr"], "momentum": c["momentum"],
                "weight decay": c["weight_decay"], "device": r["device"],
                "machine": f"{m.get('gpu', 'CPU')}, {m.get('cpu_count', '?')} CPU cores"}

    per_run = [one(r) for r in runs]
    merged = {}
    for key in per_run[0]:
        values = list(dict.fromkeys(str(p[key]) for p in per_run))
        merged[key] = values[0] if len(values) == 1 else " / ".join(values) + " (differs between runs)"
    return merged


def format_header(s: dict[str, str], runs: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    val = f", {s['validation']} validation images for MD's weights" if s["validation"] != "0" else ""
    return (f"MD benchmark: {s['dataset']}, {s['train size']} training images{val}, {s['test size']} test images, "
            f"{s['epochs']} epochs, MD T_in={s['T_in']} T_d={s['T_d']} t={s['temperature']}, batch {s['batch size']}, "
            f"cosine lr {s['lr']}, momentum {s['momentum']}, wd {s['weight decay']}; {len(runs)} runs, "
            f"seeds {','.join(map(str, seeds))}; machine: {s['machine']} (device {s['device']}, 1 process per run)")


def write_summary(out: Path) -> str:
    """Build the tables from every finished run under ``<out>/runs``; write summary.md and results.json."""
    runs, missing = load_runs(out)
    if not runs:
        raise SystemExit(f"no finished runs under {out / 'runs'} (each needs job.json and results.json)")
    rows, times, s = summarise(runs), timing(runs), settings(runs)
    header = format_header(s, runs)
    note = f"\n\nNot finished (no results.json): {', '.join(missing)}" if missing else ""
    text = (f"{header}\n\n{format_table(rows)}\n\nMean train seconds per run (wall: the whole subprocess):\n\n"
            f"{format_timing(times)}{note}\n")
    (out / "summary.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "header": header, "settings": s, "machine": runs[0]["machine"], "host": machine(),
        "models": runs[0]["models"], "variants": list(rows[0]["variants"]), "summary": rows, "timing": times,
        "missing": missing,
        "jobs": [{k: r[k] for k in ("variant", "kind", "seed", "folder", "models", "acc", "ensemble_acc", "seconds",
                                    "wall_seconds", "cycles")} for r in runs],
    }, indent=2))
    return text


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="benchmarks.md_accuracy", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [options] [-- branchify.recipes.md arguments for every job]")
    p.add_argument("--models", default="resnet20,mobilenetv2_0.5", help="comma-separated branchify.recipes.zoo names")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="independent,md",
                   help="comma-separated KIND[:flag[=value]...][@seed+seed...], e.g. independent,md,md:kd-t2")
    p.add_argument("--workers", type=int, default=1, help="concurrent branchify.recipes.md subprocesses")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per job")
    p.add_argument("--out", default="benchmarks/results/md_accuracy")
    p.add_argument("--summarise", action="store_true", help="only rebuild the tables from finished runs")
    p.add_argument("--dry-run", action="store_true", help="print each job's command line and stop")
    args = p.parse_args(own)
    out = Path(args.out)
    failed: list[Job] = []
    if not args.summarise:
        check_extra(extra)
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(f"--seeds expects comma-separated integers, got {args.seeds!r}") from None
        jobs = make_jobs([v for v in args.variants.split(",") if v.strip()], seeds, out)
        if not jobs:
            raise SystemExit("no jobs: give --variants and --seeds")
        for job in jobs:
            validate(job, args.models, args.threads, extra)
        if args.dry_run:
            print("\n".join(" ".join(j.command(args.models, args.threads, extra)[1:]) for j in jobs))
            return 0
        failed = run_all(jobs, args.models, args.threads, args.workers, extra)
        if failed:
            print(f"{len(failed)} job(s) failed: {', '.join(f'{j.variant} seed {j.seed} ({j.log})' for j in failed)}")
    text = write_summary(out)
    print(f"\n{text}\nwrote {out}/summary.md and results.json")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
