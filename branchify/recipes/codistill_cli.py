"""``branchify-train --codistill G``: codistillation of G model copies on ``--nproc N`` processes.

    branchify-train --codistill 2 --exchange-every 10 --nproc 4 --model resnet20 --out runs/codistill
    branchify-train --resume runs/codistill --nproc 4             # every unfinished group continues
    branchify-train --resume runs/codistill --group 1 --nproc 4   # one killed group rejoins (on 4/2 ranks)

``N`` must be a multiple of ``G``: each group trains data parallel on ``N / G`` processes (gloo on
the CPU, nccl on CUDA). Options beyond the flags go through ``--set method_args.KEY=VALUE``:
``exchange`` (``weights`` | ``logits``), ``topk``, ``shared_batch``, ``temperature``,
``kd_weight``, ``aggregator`` (``pairwise`` = DML, ``peer_mean``, ``mean``), ``max_stale``,
``wait_s``, ``burn_in``, ``models`` (one architecture per group), ``parallel`` (inside each group:
``ddp``, or ``fsdp2`` to shard the model with ``fully_shard``, see
:mod:`branchify.recipes.codistill_fsdp`) and ``via``:

* ``via=files`` (default, fault tolerant): one ``torchrun`` job per group, each with its own
  process group; the groups exchange through snapshots in ``<out>/exchange/``. A group that
  dies or lags leaves the others' teacher set (a log line) instead of blocking them; resume it
  with ``--resume DIR --group g``.
* ``via=collective``: one ``torchrun`` job, a 2-D ``DeviceMesh`` (``"group"`` x ``"dp"``), the
  exchange is an ``all_gather_object`` on the cross-group sub-mesh. Fastest, not fault tolerant.

Outputs in ``--out``: ``run.json``, ``log.jsonl`` (epoch records per group, teacher-set events),
``checkpoints/codistill-g<g>.pt``, ``exported/group<g>/`` (each group's model, reloadable with
:func:`~branchify.recipes.train.load_exported`), ``results/group<g>.json``, and once every
group has finished ``results.json`` + ``summary.md`` with each group, their ensemble (mean of
the softmax) and the bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..distributed import barrier, launched_by_torchrun, on_main, shutdown
from ..distributed.codistill import CodistillError, check_configs
from ..distributed.codistill_transport import CollectiveTransport, FileTransport
from . import ddp
from .checkpoint import CheckpointError, atomic_write_text
from .codistill import GroupContext, fingerprint, models_of, options_of, train_group
from .rundir import RUN_FILE, RunDirError, RunPlan, append_log, check_fresh, check_resumable, machine, read_plan

READY = "BRANCHIFY_CODISTILL_READY"


def wants_codistill(args: argparse.Namespace) -> bool:
    """Whether the flags ask for codistillation (``--codistill``, or ``--resume`` of such a run)."""
    if getattr(args, "codistill", None):
        return True
    if args.resume and (Path(args.resume) / RUN_FILE).is_file():
        try:
            return read_plan(args.resume).config.method == "codistill"
        except RunDirError:
            return False
    return False


def plan_of(args: argparse.Namespace, plan_from_args: Callable) -> tuple[RunPlan, Path, bool]:
    """(plan, run dir, resume?) with the codistillation options folded into ``method_args``
    (``plan_from_args``: the CLI's, which reads ``--resume``'s ``run.json``)."""
    plan, out, resume = plan_from_args(args)
    cfg = plan.config
    extra = dict(cfg.method_args)
    if args.codistill:
        extra["groups"] = args.codistill
    if args.exchange_every:
        extra["exchange_every"] = args.exchange_every
    if resume and extra != plan.config.method_args:
        raise RunDirError(f"--resume {out}: --codistill/--exchange-every differ from the run's "
                          f"{ {k: plan.config.method_args.get(k) for k in ('groups', 'exchange_every')} }; drop them")
    cfg = cfg.replace(method="codistill", method_args=extra)
    options = options_of(cfg)
    models_of(cfg, options.groups)
    if extra.get("via", "files") not in ("files", "collective"):
        raise CodistillError(f"method_args.via must be 'files' or 'collective', got {extra['via']!r}")
    if extra.get("parallel", "ddp") not in ("ddp", "fsdp2"):
        raise CodistillError(f"method_args.parallel must be 'ddp' or 'fsdp2' (inside each group), got "
                             f"{extra['parallel']!r}")
    return RunPlan(cfg, ["codistill"], [cfg.seed]), out, resume


def prepare(out: Path, plan: RunPlan, resume: bool, joining: bool) -> None:
    """A fresh run dir with ``run.json``, or the checked run to resume; ``joining``: one group of a
    run whose other groups were started separately (same ``run.json`` required)."""
    if resume:
        check_resumable(out, plan)
        return
    if joining and (out / RUN_FILE).is_file():
        check_resumable(out, plan)
    else:
        check_fresh(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RUN_FILE, json.dumps(plan.to_dict(), indent=2, default=str))


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not any(a.startswith(f + "=") for f in flags):
            out.append(a)
    return out


def main(args: argparse.Namespace, argv: list[str], plan_from_args: Callable, fail: Callable) -> int:
    """Launch (outside torchrun) or run one rank (under torchrun); 0 on success, 2 (``fail``) on a
    bad setup. ``plan_from_args``/``fail``: the CLI's (see :func:`plan_of`)."""
    try:
        plan, out, resume = plan_of(args, plan_from_args)
        options = options_of(plan.config)
        via = plan.config.method_args.get("via", "files")
        if not launched_by_torchrun():
            if args.nproc < options.groups or args.nproc % options.groups:
                raise CodistillError(f"--nproc {args.nproc} must be a multiple of --codistill {options.groups} "
                                     f"(every group trains on --nproc / groups processes)")
            if args.group is not None and not 0 <= args.group < options.groups:
                raise CodistillError(f"--group {args.group} is outside 0..{options.groups - 1}")
            prepare(out, plan, resume, joining=args.group is not None)
            os.environ[READY] = "1"
            if via == "collective":
                if args.group is not None:
                    raise CodistillError("--group needs via=files (a collective run starts all groups together)")
                return ddp.launch(argv, args.nproc)
            return _launch_groups(argv, args.nproc // options.groups, options.groups, args.group)
        return _worker(plan, out, resume, via, args.group, fail)
    except (ValueError, FileNotFoundError, CodistillError, CheckpointError) as exc:
        return fail(exc)


def _launch_groups(argv: list[str], per_group: int, groups: int, only: int | None) -> int:
    """One ``torchrun`` job per group (its own process group), all waited for."""
    base = _strip(argv, ("--nproc", "--group"))
    todo = range(groups) if only is None else [only]
    procs = {}
    for g in todo:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(per_group),
               "-m", "branchify.recipes.cli", *base, "--group", str(g)]
        procs[g] = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    print(f"launched {len(procs)} group(s) x {per_group} processes (one torchrun job per group)",
          file=sys.stderr, flush=True)
    codes = {g: p.wait() for g, p in procs.items()}
    failed = {g: c for g, c in codes.items() if c}
    if failed:
        print(f"branchify-train: codistillation group(s) {sorted(failed)} failed (exit codes {failed}); the others "
              f"finished. Continue a failed group with --resume <out> --group <g>", file=sys.stderr, flush=True)
        return next(iter(failed.values()))
    return 0


def _worker(plan: RunPlan, out: Path, resume: bool, via: str, group: int | None, fail: Callable) -> int:
    from torch.distributed.device_mesh import init_device_mesh

    cfg = plan.config
    options = options_of(cfg)
    rank, world = ddp.setup(cfg.device)
    dev = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    try:
        if via == "collective":
            if world % options.groups:
                raise CodistillError(f"world size {world} is not a multiple of {options.groups} groups")
            mesh = init_device_mesh(dev, (options.groups, world // options.groups), mesh_dim_names=("group", "dp"))
            group = rank // (world // options.groups)
            check_configs(cfg.to_dict())
            if os.environ.get(READY) != "1":  # started by torchrun directly, not by the launcher
                on_main(lambda: prepare(out, plan, resume, joining=False))
            dp = mesh["dp"].get_group()
            transport: Any = CollectiveTransport(group, mesh["group"].get_group(), dp,
                                                 per_rank=options.exchange == "logits")
        else:
            if group is None:
                raise CodistillError("via=files runs one torchrun job per group: pass --group g")
            mesh = init_device_mesh(dev, (world,), mesh_dim_names=("dp",))
            dp = mesh.get_group()
            check_configs({**cfg.to_dict(), "group": group}, dp)
            if rank == 0 and os.environ.get(READY) != "1":
                prepare(out, plan, resume, joining=True)
            barrier()
            per_rank = options.exchange == "logits"  # each rank's slice of the shared micro-batch
            transport = FileTransport(out / "exchange", group, options, writer=rank == 0 or per_rank,
                                      fingerprint=fingerprint(cfg), channel=rank if per_rank else 0)
        main_rank = torch.distributed.get_rank(dp) == 0

        def say(line: str) -> None:
            if main_rank:
                print(f"[codistill] {line}", flush=True)
                append_log(out, {"event": "codistill", "group": group, "message": line})

        transport.on_event = say
        ctx = GroupContext(group, dp, transport, say, dp_mesh=mesh["dp"], lockstep=via == "collective")
        result = train_group(cfg, out, ctx, resume=resume, log=lambda r: append_log(out, r))
        if main_rank:
            atomic_write_text(out / "results" / f"group{group}.json", json.dumps(result, indent=2, default=float))
            write_summary(out, plan, say)
    except (CodistillError, CheckpointError, RunDirError) as exc:
        return fail(exc)
    finally:
        shutdown()
    return 0


def load_ensemble(run_dir: str | Path, groups: int | None = None) -> torch.nn.Module:
    """Every group's exported model of a finished codistillation run, as one ensemble (the mean
    of their softmax, a :class:`~branchify.cohort.CohortEnsemble`).

    Examples:
        >>> ens = load_ensemble("runs/codistill")          # doctest: +SKIP
        >>> probs = ens(x)                                 # doctest: +SKIP
    """
    from ..cohort import CohortEnsemble
    from .train import load_exported

    run_dir = Path(run_dir)
    if groups is None:
        groups = options_of(read_plan(run_dir).config).groups
    missing = [g for g in range(groups) if not (run_dir / "exported" / f"group{g}" / "model.safetensors").is_file()]
    if missing:
        raise RunDirError(f"{run_dir} has no exported model for group(s) {missing}: finish them first "
                          f"(branchify-train --resume {run_dir} --group <g>)")
    return CohortEnsemble([load_exported(run_dir / "exported" / f"group{g}") for g in range(groups)]).eval()


def write_summary(out: Path, plan: RunPlan, say=print) -> dict[str, Any] | None:
    """Once every group has finished: the ensemble's accuracy, ``results.json`` and ``summary.md``."""
    from .train import _loaders

    cfg = plan.config
    options = options_of(cfg)
    files = [out / "results" / f"group{g}.json" for g in range(options.groups)]
    missing = [g for g, f in enumerate(files) if not f.is_file()]
    if missing:
        say(f"the ensemble is written when group(s) {missing} finish (a group that died: --resume {out} "
            f"--group <g>)")
        return None
    groups = [json.loads(f.read_text()) for f in files]
    _, test_loader, _ = _loaders(cfg.replace(device="cpu"), torch.device("cpu"))
    ens = load_ensemble(out, options.groups)
    correct = n = 0
    with torch.no_grad():
        for x, y in test_loader:
            if cfg.test_subset is not None and n >= cfg.test_subset:
                break
            correct += int((ens(x).argmax(-1) == y).sum())
            n += len(y)
    ensemble = correct / n * 100
    rows = [f"| group {r['group']} ({r['model']}) | {r.get('target_acc', float('nan')):.2f} | "
            f"{r['history'][-1]['bytes/cross_group_received']:,} | "
            f"{r['allreduce']['ring_bytes_per_rank'] * r['epochs'] * r['steps_per_epoch']:,.0f} |"
            for r in groups]
    table = "\n".join(["| model | accuracy (%) | cross-group bytes received | in-group all-reduce bytes per rank |",
                       "|---|---|---|---|", *rows, f"| ensemble (mean softmax) | {ensemble:.2f} | | |"])
    header = (f"codistillation: {options.groups} groups, exchange={options.exchange} every {options.exchange_every} "
              f"steps, {cfg.dataset}, {cfg.epochs} epochs, seed {cfg.seed}")
    atomic_write_text(out / "summary.md", header + "\n\n" + table + "\n")
    summary = {"header": header, "machine": machine(), "options": options.to_dict(), "ensemble_acc": ensemble,
               "groups": groups}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2, default=float))
    atomic_write_text(out / "exported" / "ensemble.json", json.dumps(
        {"members": [f"group{g}" for g in range(options.groups)], "combine": "mean of softmax",
         "test_acc": ensemble}, indent=2))
    say(f"all {options.groups} groups finished; ensemble accuracy {ensemble:.2f}%\n" + table)
    return summary
