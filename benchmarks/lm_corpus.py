"""A small byte-level decoder LM trained from scratch on the Python standard library's own source:
validation perplexity of the exported target, baseline vs ONE, TSA and DML, paired by seed.

Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` outside ``site-packages``
and test directories (``test``, ``tests``, ``idle_test``) - text no one here wrote, shipped with every
CPython. The split is by file and deterministic: a file is in validation when the SHA-1 of its
path relative to the stdlib root is 0 mod 10 (about a tenth of the files). Documents are joined
with a NUL byte. The corpus digest and the Python version are recorded (another CPython version
ships other files, so compare results from one version).

Model: ``LlamaForCausalLM`` (vocabulary 256 bytes, ``--hidden`` 128, ``--layers`` 4, 4 heads,
MLP 352, untied head: ~0.9M parameters). Training: ``--steps`` AdamW steps (lr 3e-3, weight decay
0.01, linear warm-up over 5% then cosine to 0, gradient clipping 1.0) on ``--batch`` random
windows of ``--seq`` + 1 bytes; the windows and the initialisation come from the seed, so the
methods of one seed see the same batches from the same trunk initialisation. The branched
methods train through :class:`~branchify.integrations.hf.BranchedHFModel` (the Trainer's path)
with their presets (ONE's KD ramp runs over 80/300 of the run via ``set_step``); the baseline is
the plain model with its own HF loss. Evaluation: the exported target (``export_pretrained()``,
the original class) on every non-overlapping ``--seq`` window of the validation stream; the
perplexity is ``exp`` of the mean next-byte NLL (nats) over all predicted bytes.

Each run is a separate process with one thread (``--jobs`` in parallel) and writes
``<out>/runs/<method>-seed<k>.json`` when done (finished runs are skipped on a rerun);
a finished run is reused only when it was trained with the same settings. ``summary.md`` (the
table) and ``results.json`` (the machine, the corpus, every run) hold per-method means and the
paired differences vs the baseline with their standard errors (SE = sample std of the per-seed
differences / sqrt(seeds)).

    python -m benchmarks.lm_corpus --seeds 0 1 2 3 4 --steps 2000 --jobs 2 --out benchmarks/results/lm_cpu

(those are the defaults). Cost, measured as training time of 2,000 steps (batch 8 x 128 bytes) on one
thread: baseline ~290 s, ONE ~480 s, DML ~540 s, TSA ~650 s when two runs share an otherwise idle
2-core machine (up to 1.7x that with other work on it), plus ~60 s each to score the validation
set: about 15 minutes of wall time per seed for the four methods with ``--jobs 2``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

from .common import machine_info, markdown_table, mean_se, mean_std, paired_differences, write_summary_files

METHODS = ("baseline", "one", "tsa", "dml")
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}


def corpus(max_files: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(train bytes, validation bytes, info)`` of the stdlib corpus (uint8 tensors)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # pruned: site-packages is most of the tree
        files += [Path(parent) / n for n in names if n.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_files is not None:
        files = files[:max_files]
    train, val, digest = [], [], hashlib.sha1()
    for p in files:
        rel = p.relative_to(root).as_posix()
        data = p.read_bytes() + b"\0"
        digest.update(rel.encode() + data)
        (val if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10 == 0 else train).append(data)
    if not train or not val:
        raise RuntimeError(f"the split of {len(files)} files left an empty side; use more files")
    info = {"root": str(root), "files": len(files), "val_files": len(val), "train_bytes": sum(map(len, train)),
            "val_bytes": sum(map(len, val)), "sha1": digest.hexdigest(), "python": sys.version.split()[0]}
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(val), info


def make_model(args: argparse.Namespace):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=args.seq + 1, tie_word_embeddings=False,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return T.LlamaForCausalLM(cfg)


def perplexity(model: torch.nn.Module, val: torch.Tensor, seq: int, batch: int = 16) -> float:
    """``exp`` of the mean next-byte NLL over non-overlapping ``seq``-byte windows of ``val``."""
    n = (val.numel() - 1) // seq
    windows = val[: n * seq + 1]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch):
            idx = torch.arange(start, min(start + batch, n))
            x = torch.stack([windows[i * seq: i * seq + seq] for i in idx.tolist()]).long()
            y = torch.stack([windows[i * seq + 1: i * seq + seq + 1] for i in idx.tolist()]).long()
            logits = model(input_ids=x).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    return math.exp(total / count)


def train_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """Train ``method`` with ``seed`` and return the exported target's validation perplexity."""
    from branchify.integrations.hf import branchify_hf

    torch.set_num_threads(1)
    train, val, info = corpus(args.max_files)
    torch.manual_seed(seed)
    base = make_model(args)
    model = base if method == "baseline" else branchify_hf(base, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, s - warm) / max(1, args.steps - warm))))))
    g = torch.Generator().manual_seed(1000 + seed)  # the same windows for every method of this seed
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, train.numel() - args.seq - 1, (args.batch,), generator=g)
        ids = torch.stack([train[s: s + args.seq + 1] for s in starts.tolist()]).long()
        if method != "baseline":
            model.okd.set_step(step, args.steps, total_epochs=1)
        loss = model(input_ids=ids[:, :-1] if method == "baseline" else ids,
                     labels=ids[:, :-1] if method == "baseline" else ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    target = model if method == "baseline" else model.export_pretrained()
    return {"method": method, "seed": seed, "val_ppl": perplexity(target, val, args.seq), "train_s": train_s,
            "params_m": sum(p.numel() for p in params) / 1e6, "final_loss": float(loss.detach()), "corpus": info,
            "config": _config(args)}


def summarise(runs: list[dict]) -> dict:
    """Per-method mean perplexity and the paired (same-seed) difference to the baseline with its SE."""
    by = {m: {r["seed"]: r["val_ppl"] for r in runs if r["method"] == m} for m in METHODS}
    out = {}
    for method in METHODS:
        if not by[method]:
            continue
        mean, sd = mean_std(list(by[method].values()))
        row = {"seeds": sorted(by[method]), "mean_ppl": mean, "sd_ppl": sd,
               "per_seed": [by[method][s] for s in sorted(by[method])]}
        paired = paired_differences(by[method], by["baseline"])
        if method != "baseline" and paired:
            row["diff_vs_baseline"], row["se"] = mean_se(paired)
            row["paired_seeds"] = len(paired)
        out[method] = row
    return out


def markdown(summary: dict) -> str:
    """The perplexity table: mean ± sd over seeds, the paired difference to the baseline ± SE, per seed."""
    rows = []
    for method, r in summary.items():
        diff = f"{r['diff_vs_baseline']:+.3f} ± {r['se']:.3f}" if "diff_vs_baseline" in r else "-"
        rows.append([method, len(r["seeds"]), f"{r['mean_ppl']:.3f} ± {r['sd_ppl']:.3f}", diff,
                     ", ".join(f"{v:.3f}" for v in r["per_seed"])])
    return markdown_table(["method", "seeds", "val perplexity (mean ± sd)", "paired diff vs baseline (± SE)",
                           "per seed"], rows)


def _config(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("steps", "batch", "seq", "hidden", "layers", "lr", "max_files")}


def _job(method: str, seed: int, args: argparse.Namespace, out: Path) -> subprocess.Popen | None:
    path = out / "runs" / f"{method}-seed{seed}.json"
    if path.exists():
        # A finished run is reused only when it was trained with these settings: a table mixing
        # 1,500- and 2,000-step runs would pair unlike things.
        done = json.loads(path.read_text())["config"]
        if done != _config(args):
            raise ValueError(f"{path} was trained with {done}, not the requested {_config(args)}; "
                             "delete it or pass another --out")
        return None
    cmd = [sys.executable, "-m", "benchmarks.lm_corpus", "--one", method, str(seed), "--out", str(out)]
    for k in ("steps", "batch", "seq", "hidden", "layers", "lr"):
        cmd += [f"--{k}", str(getattr(args, k))]
    if args.max_files is not None:
        cmd += ["--max-files", str(args.max_files)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-files", type=int, default=None, help="only the first N files (smoke tests)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/lm_cpu")
    p.add_argument("--one", nargs=2, default=None, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.one is not None:
        result = train_one(args.one[0], int(args.one[1]), args)
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "runs" / f"{args.one[0]}-seed{args.one[1]}.json").write_text(json.dumps(result, indent=2))
        return result
    pending = [(m, s) for s in args.seeds for m in args.methods]
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < args.jobs:
            proc = _job(*pending.pop(0), args, out)
            if proc is not None:
                running.append(proc)
        time.sleep(0.5)
        for proc in [r for r in running if r.poll() is not None]:
            if proc.returncode != 0:
                raise RuntimeError(f"run {proc.args} failed with exit code {proc.returncode}")
            running.remove(proc)
    runs = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]
    runs = [r for r in runs if r["config"] == _config(args) and r["method"] in args.methods]
    command = "python -m benchmarks.lm_corpus " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"summary": summarise(runs), "config": _config(args), "corpus": runs[0]["corpus"] if runs else None,
               "command": command, "machine": machine_info(torch.device("cpu")),
               "runs": [{k: r[k] for k in ("method", "seed", "val_ppl", "final_loss", "train_s", "params_m")}
                        for r in runs]}
    text = f"`{command}`\n\n" + markdown(summary["summary"])
    write_summary_files(out, text, summary)
    print(text)
    return summary


if __name__ == "__main__":
    main()
