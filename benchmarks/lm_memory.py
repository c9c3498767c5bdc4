"""Peak memory and step time of token-level online KD on Llama-shaped decoders, unchunked vs chunked.

Every configuration runs in a fresh Python process (one at a time) and trains a randomly
initialised ``LlamaForCausalLM`` (4 layers, hidden 512, 8 heads, MLP 1,408, untied head) on random
tokens through :class:`~branchify.integrations.hf.BranchedHFModel` - the path the HF ``Trainer``
calls - with plain SGD (no optimiser state: the peak is the model, its gradients and the step's
activations). Variants per vocabulary:

* ``plain``: the original model and its own HF loss (the reference of the branched/plain ratio);
* ``<tree>/ce``: the branched tree of ONE (3 leaves after the last block) or TSA (fanout [2, 2]
  at the last two blocks, 4 leaves) trained with each leaf's cross-entropy only;
* ``<tree>/kd``: the same tree with its method's loss (ONE: gate teacher, its CE and 3 KD terms;
  TSA: 12 pairwise KD terms);
* each loss ``unchunked`` (``OnlineKD(token_chunk=None)``) and ``chunked`` (``token_chunk="auto"``);
* ``head=shared``: the ONE tree whose leaves share one LM head (the replicated heads' weights
  are made one parameter) instead of replicating it.

Peak memory: the process's resident-set high-water mark (``VmHWM``) during one training step,
reset just before it (``/proc/self/clear_refs``), with glibc told to serve every block of 64 KiB or
more by ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave the resident set
at once instead of staying cached in the heap; ``peak_mib`` is that high-water mark (weights,
gradients, activations, the interpreter), ``step_mib`` the part above the resident set before the
step. Why not something else: torch keeps no CPU allocator statistics and ``tracemalloc`` does
not see its buffers; without the mmap threshold the resident set hides reuse inside glibc's cache
(see ``benchmarks/memory.py``). The ``calibration`` entry allocates a known 256 MiB inside the
measured region and reports what this method sees.

Run (about 15 minutes on one CPU thread; one configuration at a time, at most ~7 GiB):

    python -m benchmarks.lm_memory --out benchmarks/results/lm_memory_cpu.json
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

import torch

from .common import machine_info, table, write_results

LAYERS, HIDDEN, HEADS, MLP = 4, 512, 8, 1408


def _status() -> dict[str, float]:
    text = open("/proc/self/status").read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(cfg: dict):
    """The model to train and a ``step()`` closure for one configuration."""
    import transformers as T

    from branchify.integrations.hf import branchify_hf

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=cfg["vocab"], hidden_size=HIDDEN, intermediate_size=MLP,
                           num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                           max_position_embeddings=cfg["seq"], tie_word_embeddings=False)
    model = T.LlamaForCausalLM(config)
    if cfg["tree"] != "plain":
        wrapper = branchify_hf(model, cfg["tree"])
        del model
        if cfg["loss"] == "ce":
            wrapper.branched.attach(None)  # the same tree, each leaf's CE only
        wrapper.okd.token_chunk = cfg["chunk"]
        wrapper.okd.set_epoch(300, 300)  # ramp at its end: the full KD weight
        if cfg["head"] == "shared":
            _share_heads(wrapper)
        model = wrapper
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    labels = ids.clone()
    labels[:, : cfg["seq"] // 8] = -100  # a masked prompt, as in instruction tuning
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def _share_heads(wrapper) -> None:
    """Make every leaf's ``lm_head`` use the first leaf's weight (one parameter, not replicated)."""
    heads = [m for n, m in wrapper.branched.named_modules() if n.endswith("lm_head")]
    if len(heads) < 2:
        raise RuntimeError(f"expected one lm_head per leaf, found {len(heads)}")
    for m in heads[1:]:
        m.weight = heads[0].weight


def _loss_only(cfg: dict):
    """ONE's loss alone (3 leaves, a teacher mixing them, its CE and 3 detached KD terms) on random
    logits: what the chunking saves and costs, without a model around it."""
    from branchify.functional import cross_entropy, kl_div_logits, valid_mask
    from branchify.token_chunks import AUTO_CHUNK_ELEMENTS, chunked_terms

    g = torch.Generator().manual_seed(0)
    shape = (cfg["batch"], cfg["seq"], cfg["vocab"])
    z = [torch.randn(*shape, generator=g).requires_grad_() for _ in range(3)]
    w = torch.full((3,), 1 / 3, requires_grad=True)
    y = torch.randint(0, cfg["vocab"], shape[:2], generator=g)
    y[:, : cfg["seq"] // 8] = -100
    chunk = max(1, AUTO_CHUNK_ELEMENTS // (cfg["vocab"] * 4)) if cfg["chunk"] else None

    def step() -> None:
        t = sum(w[k] * zk for k, zk in enumerate(z))
        if chunk is None:
            mask = valid_mask(y, t)
            values = [cross_entropy(v, y) for v in [*z, t]] + [kl_div_logits(t.detach(), zk, 3.0, mask) for zk in z]
        else:
            r = chunked_terms(z, [t], [(t, zk, True) for zk in z], y, temperature=3.0, chunk=chunk)
            values = r.ce + r.kd
        sum(values).backward()
        for p in (*z, w):
            p.grad = None

    return torch.nn.ParameterList([torch.nn.Parameter(w.detach())]), step


def worker(cfg: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    torch.set_num_threads(cfg["threads"])
    if cfg["tree"] == "calibration":
        rss = _status()["VmRSS"]
        _reset_peak()
        x = torch.ones(64 * 2**20)  # 256 MiB
        del x
        return {"expected_mib": 256.0, "step_mib": _status()["VmHWM"] - rss}
    model, step = _loss_only(cfg) if cfg["tree"] == "loss" else _build(cfg)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for _ in range(cfg["warmup"]):  # lazy initialisation, first touch of buffers
        step()
    rss = _status()["VmRSS"]
    _reset_peak()
    t0 = time.perf_counter()
    step()
    times = [time.perf_counter() - t0]
    peak = _status()["VmHWM"]
    if cfg["reps"]:  # time with glibc's usual reuse of freed blocks (up to 32 MiB): no mmap per temporary
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        step()
        times = []
    for _ in range(cfg["reps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"params_m": params / 1e6, "rss_before_mib": rss, "peak_mib": peak, "step_mib": peak - rss,
            "step_s": statistics.median(times), "timed": "reps" if cfg["reps"] else "measured step (mmap per block)"}


def configs(args: argparse.Namespace) -> list[dict]:
    base = dict(seq=args.seq, batch=args.batch, threads=args.threads, reps=args.reps, warmup=args.warmup,
                head="replicated",
                chunk=None, loss="ce")
    out = [dict(base, vocab=0, tree="calibration")]
    for tokens in args.loss_tokens:  # the loss alone: where chunking starts to pay
        for chunk in (None, "auto"):
            out.append(dict(base, vocab=32000, seq=tokens, batch=1, tree="loss", loss="kd", chunk=chunk))
    for vocab in args.vocab:
        if args.plain:
            out.append(dict(base, vocab=vocab, tree="plain"))
        for tree in args.trees:
            for loss in ("ce", "kd"):
                for chunk in [None if c == "none" else c for c in args.chunks]:
                    out.append(dict(base, vocab=vocab, tree=tree, loss=loss, chunk=chunk))
        if args.shared_head:
            for loss in ("ce", "kd"):
                out.append(dict(base, vocab=vocab, tree="one", loss=loss, chunk="auto", head="shared"))
    return out


def _available_gib() -> float:
    text = open("/proc/meminfo").read()
    return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) / 2**20


def run(cfg: dict, tries: int = 2, min_free_gib: float = 0.0) -> dict:
    """One configuration in a fresh process (a failed start, e.g. an import error, is retried once).

    On a shared machine it first waits up to 5 minutes for ``min_free_gib`` of available memory
    and skips the configuration otherwise (never pushing other processes out of memory)."""
    deadline = time.time() + 300
    while _available_gib() < min_free_gib:
        if time.time() > deadline:
            return {"skipped": f"less than {min_free_gib} GiB available"}
        time.sleep(10)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(cfg["threads"]),
               MKL_NUM_THREADS=str(cfg["threads"]))
    for _ in range(tries):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.lm_memory", "--worker", json.dumps(cfg)],
                              capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
        time.sleep(5)
    return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}


def _label(cfg: dict) -> str:
    if cfg["tree"] in ("plain", "calibration"):
        return cfg["tree"]
    if cfg["tree"] == "loss":
        return f"ONE loss only, {cfg['seq']} tokens, {'chunked' if cfg['chunk'] else 'unchunked'}"
    chunk = "chunked" if cfg["chunk"] else "unchunked"
    head = "" if cfg["head"] == "replicated" else " head=shared"
    return f"{cfg['tree']}/{cfg['loss']} {chunk}{head}"


def summarise(rows: list[dict]) -> dict:
    """KD over CE-only overhead (same tree, same chunking) and branched/plain ratios, per vocabulary."""
    peak = {(r["vocab"], r["variant"]): r.get("peak_mib") for r in rows}
    out: dict = {}
    for vocab in sorted({r["vocab"] for r in rows if r["vocab"]}):
        s = {}
        plain = peak.get((vocab, "plain"))
        for r in rows:
            if r["vocab"] != vocab or r.get("peak_mib") is None or r["tree"] in ("plain", "calibration", "loss"):
                continue
            if plain:
                s[f"{r['variant']} / plain"] = round(r["peak_mib"] / plain, 3)
            if r["loss"] == "kd":
                ce = peak.get((vocab, r["variant"].replace("/kd", "/ce")))
                if ce:
                    s[f"{r['variant']} over CE-only"] = f"{100 * (r['peak_mib'] / ce - 1):+.1f}%"
        out[str(vocab)] = s
    return out


def _merge(args: argparse.Namespace) -> dict:
    """One results file from the rows several (possibly interrupted) runs printed, last row wins."""
    rows: dict[tuple, dict] = {}
    for log in args.merge:
        for line in open(log):
            if line.startswith("{") and '"variant"' in line:
                r = json.loads(line)
                if "error" not in r and "skipped" not in r:
                    rows[(r["vocab"], r["variant"], r["seq"], r["batch"])] = r
    merged = sorted(rows.values(), key=lambda r: (r["vocab"], r["variant"]))
    payload = {"machine": machine_info(torch.device("cpu")), "model": dict(layers=LAYERS, hidden=HIDDEN, heads=HEADS,
                                                                        mlp=MLP), "merged_from": args.merge,
               "rows": merged, "summary": summarise(merged)}
    print(table([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in merged],
                ["vocab", "seq", "batch", "variant", "params_m", "peak_mib", "step_mib", "step_s"]))
    print(json.dumps(payload["summary"], indent=2))
    print("wrote", write_results(args.out, payload))
    return payload


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="*", default=[32000, 152064])
    p.add_argument("--trees", nargs="+", default=["one", "tsa"], choices=["one", "tsa"])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help=">= 2: ONE's gate has a BatchNorm over the batch")
    p.add_argument("--reps", type=int, default=1,
                   help="timed steps after the measured one (0: time the measured step, slowed by an mmap per block)")
    p.add_argument("--warmup", type=int, default=1, help="steps before the measured one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunks", nargs="+", default=["none", "auto"], choices=["none", "auto"],
                   help="token_chunk settings of the branched variants")
    p.add_argument("--no-plain", dest="plain", action="store_false")
    p.add_argument("--min-free-gib", type=float, default=0.0, help="wait for this much available memory")
    p.add_argument("--only", nargs="*", default=None, help="run only these variant labels")
    p.add_argument("--no-shared-head", dest="shared_head", action="store_false")
    p.add_argument("--loss-tokens", type=int, nargs="*", default=[64, 256, 1024],
                   help="token counts of the loss-only sweep (vocabulary 32,000)")
    p.add_argument("--merge", nargs="+", default=None, metavar="LOG",
                   help="combine the JSON rows printed by earlier runs (their stdout logs) into --out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/lm_memory_cpu.json")
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if args.merge is not None:
        return _merge(args)
    rows = []
    for cfg in configs(args):
        if args.only is not None and cfg["tree"] != "calibration" and _label(cfg) not in args.only:
            continue
        t0 = time.perf_counter()
        res = run(cfg, min_free_gib=args.min_free_gib)
        row = {**cfg, "variant": _label(cfg), **res, "wall_s": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    payload = {"machine": machine_info(torch.device("cpu")), "model": dict(layers=LAYERS, hidden=HIDDEN, heads=HEADS,
                                                                        mlp=MLP, seq=args.seq, batch=args.batch),
               "rows": rows, "summary": summarise(rows)}
    print(table([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                ["vocab", "variant", "params_m", "peak_mib", "step_mib", "step_s"]))
    print(json.dumps(payload["summary"], indent=2))
    print("wrote", write_results(args.out, payload))
    return payload


if __name__ == "__main__":
    main()
