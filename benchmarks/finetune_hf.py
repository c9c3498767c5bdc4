"""CPU fine-tuning benchmark, Hugging Face path: a tiny ViT pretrained here, fine-tuned with the Trainer.

The Hugging Face half of ``benchmarks/finetune_cpu.py``, done as a user of ``transformers`` would:

* **pretrain** a tiny ``ViTForImageClassification`` (28x28, patch 7, hidden 64, 4 layers, 4 heads,
  1 channel; ~139k parameters) on the 30,000 Fashion-MNIST training images of classes 0-4 with the
  unchanged ``transformers.Trainer``, report its accuracy on their test images, and
  ``save_pretrained`` its backbone (``ViTModel``, 0.6 MB, committed under
  ``benchmarks/results/finetune_cpu/hf_pretrained/<checkpoint>/``). Why the backbone: the new task
  also has 5 classes, so a saved 5-way head would load as it is (``ignore_mismatched_sizes`` only
  replaces heads of another shape); ``ViTForImageClassification.from_pretrained(path, num_labels=5)``
  on the backbone gives the fresh classifier a new task needs (as ``bert-base`` does);
* **fine-tune**, per seed, on 500 images of classes 5-9 (labels -> 0-4; the same images, data order,
  augmentation and fresh classifier for every row of a seed): ``plain`` (the loaded model, its own
  loss) vs ONE and DML through ``branchify_hf`` with ``init="hf"`` (random peers: whole replicas
  re-initialised by the model's ``_init_weights``) and with the automatic default (``"pretrained"``
  for a ``from_pretrained`` model: replicas copy the pretrained weights, leaves 1.. get a fresh
  classifier; each record's ``init_used`` says so), trained by the unchanged ``transformers.Trainer``
  + ``BranchifyCallback``; the deployed model is the exported target as ``save_pretrained`` wrote it
  (``<output_dir>/exported-target``), reloaded and tested on all 5,000 test images of classes 5-9.

Each finished run is written at once to ``<out>/runs/hf-<setting>/...json`` (a sweep resumes);
``summarise`` rebuilds ``hf_results.json`` (machine, config, one record per run) and ``hf_summary.md``
(mean +- std; gains over plain fine-tuning and pretrained - random peers paired per seed, +- SE).

    python -m benchmarks.finetune_hf pretrain      # ~5 CPU-minutes; skipped when the checkpoint is there
    python -m benchmarks.finetune_hf run --seeds 0,1,2,3,4
    python -m benchmarks.finetune_hf summarise

Recipe: AdamW, weight decay 0.05, linear decay after 10% warm-up (pretraining: cosine, 5%, no
augmentation), random 2-pixel-padded crop + flip from a generator seeded by the seed, fp32, 1 thread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    machine_info,
    markdown_table,
    mean_se,
    paired_cell,
    paired_differences,
    write_summary_files,
)
from benchmarks.finetune_cpu import DEFAULT_OUT, FT_CLASSES, PRE_CLASSES, images, pretrained_start

IMPLEMENTATION = "hf-trainer"
ROWS = [("plain", "pretrained"), ("one", "random"), ("one", "pretrained"), ("dml", "random"), ("dml", "pretrained")]
"""(method, init) of every run of a seed; ``plain`` fine-tunes the pretrained model alone (the baseline)."""


@dataclass(frozen=True)
class HFSetting:
    """The tiny ViT, its pretraining and the fine-tuning regime (``name`` labels results and checkpoint)."""

    name: str = "vit-p7-h64-l4-pre5ep-ft500-20ep"
    checkpoint: str = "vit-p7-h64-l4-pre5ep"   # names the pretrained backbone (the fields up to pre_augment)
    image_size: int = 28               # Fashion-MNIST's own size
    patch_size: int = 7
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 128
    pre_images: int | None = None      # None: every training image of classes 0-4 (30,000)
    pre_epochs: int = 5
    pre_lr: float = 3e-3
    pre_batch: int = 128
    pre_augment: bool = False          # 5 epochs underfit 30,000 images: crops and flips only slow it
    ft_images: int = 500               # class-stratified, drawn from the seed
    ft_epochs: int = 20
    ft_lr: float = 1e-3
    batch_size: int = 32
    test_size: int | None = None       # None: all 5,000 test images of classes 5-9 (and 0-4 for pretraining)


TINY = HFSetting("tiny", "tiny", hidden=16, layers=3, heads=2, intermediate=32, pre_images=200, pre_epochs=1,
                 ft_images=40, ft_epochs=1, batch_size=20, test_size=100)
"""The smoke test's setting (seconds)."""


# ---------------------------------------------------------------------- data
class Images(torch.utils.data.Dataset):
    """Map-style dataset of ``{"pixel_values": uint8 [1, H, W], "labels": int}`` (what the Trainer batches)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> Fashion-MNIST-normalised floats."""
    from branchify.recipes.data import DATASETS

    meta = DATASETS["fashion_mnist"]
    return (x.float() / 255.0 - meta.mean[0]) / meta.std[0]


class Collate:
    """The Trainer's ``data_collator``: stacks, random padded crop + flip from its own seeded generator
    (so every row of a seed sees the same augmentation, whatever the model draws), normalises."""

    def __init__(self, seed: int, padding: int = 2, augment: bool = True) -> None:
        self.gen, self.padding, self.augment = torch.Generator().manual_seed(seed), padding, augment

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        x = torch.stack([f["pixel_values"] for f in features]).float()
        labels = torch.stack([f["labels"] for f in features])
        if not self.augment:
            return {"pixel_values": normalise(x), "labels": labels}
        (b, _, h, w), p = x.shape, self.padding
        padded = F.pad(x, (p, p, p, p))
        dy, dx = (torch.randint(0, 2 * p + 1, (b,), generator=self.gen) for _ in range(2))
        flip = torch.rand(b, generator=self.gen) < 0.5
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
        out = torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)
        return {"pixel_values": normalise(out), "labels": labels}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy (%) of a classifier taking ``pixel_values`` (put in eval mode)."""
    model.eval()
    hits = sum(int((model(pixel_values=normalise(x[i:i + batch])).logits.argmax(-1) == y[i:i + batch]).sum())
               for i in range(0, len(y), batch))
    return 100.0 * hits / len(y)


def trainer_args(out: str, seed: int, epochs: int, lr: float, batch: int, **kw):
    """``TrainingArguments`` of every run: CPU, no reporting, no checkpoints, no tqdm, seeded."""
    from transformers import TrainingArguments

    base = dict(num_train_epochs=epochs, per_device_train_batch_size=batch, learning_rate=lr, weight_decay=0.05,
                warmup_steps=0.1, lr_scheduler_type="linear", optim="adamw_torch", report_to=[], use_cpu=True,
                disable_tqdm=True, save_strategy="no", logging_strategy="no", seed=seed, data_seed=seed,
                dataloader_num_workers=0)
    return TrainingArguments(out, **{**base, **kw})


# ---------------------------------------------------------------------- pretraining
def pretraining_fields(s: HFSetting) -> dict:
    """The fields of ``s`` that make the pretrained backbone (``checkpoint`` .. ``pre_augment``)."""
    fields = list(asdict(s))
    return {k: getattr(s, k) for k in fields[fields.index("checkpoint"):fields.index("pre_augment") + 1]}


def checkpoint_dir(s: HFSetting, out: str | Path = DEFAULT_OUT) -> Path:
    """Where the pretrained backbone lives (``save_pretrained`` format)."""
    return Path(out) / "hf_pretrained" / s.checkpoint


def pretrain(s: HFSetting, folder: Path, root: str | None = None, force: bool = False) -> Path:
    """Pretrain the ViT on classes 0-4 (seed 0) with the Trainer unless ``folder`` already holds it;
    ``save_pretrained`` the backbone there with ``pretraining.json`` (accuracy, seconds, machine)."""
    import transformers

    if not force and (folder / "config.json").exists():
        return folder
    (x, y), (xt, yt) = images(s, PRE_CLASSES, s.pre_images, 0, root)
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=s.image_size, patch_size=s.patch_size, num_channels=1,
                                    hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                                    intermediate_size=s.intermediate, num_labels=len(PRE_CLASSES))
    net = transformers.ViTForImageClassification(config)
    with tempfile.TemporaryDirectory() as tmp:
        args = trainer_args(tmp, 0, s.pre_epochs, s.pre_lr, s.pre_batch, lr_scheduler_type="cosine",
                            warmup_steps=0.05)
        trainer = transformers.Trainer(model=net, args=args, train_dataset=Images(x, y),
                                       data_collator=Collate(0, augment=s.pre_augment))
        t0 = time.perf_counter()
        loss = trainer.train().training_loss
        seconds = time.perf_counter() - t0
    acc = accuracy(net, xt, yt)
    folder.mkdir(parents=True, exist_ok=True)
    net.vit.save_pretrained(folder)
    (folder / "pretraining.json").write_text(json.dumps({
        "setting": pretraining_fields(s), "train_images": len(y), "test_images": len(yt), "test_acc_classes_0_4": acc,
        "train_loss": loss, "train_seconds": seconds, "machine": machine_info(torch.device("cpu"))}, indent=1))
    return folder


# ---------------------------------------------------------------------- fine-tuning
def load(folder: Path, seed: int):
    """The pretrained backbone with a fresh 5-way classifier drawn from ``seed`` (``from_pretrained``)."""
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialized: classifier" is the point here
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification.from_pretrained(folder, num_labels=len(FT_CLASSES))


def run_one(s: HFSetting, method: str, init: str, seed: int, folder: Path, root: str | None = None) -> dict:
    """Fine-tune one (method, init) for one seed with the Trainer; the result record."""
    import transformers

    from branchify.integrations.hf import EXPORT_SUBDIR, BranchifyCallback, branchify_hf

    (x, y), (xt, yt), model = *images(s, FT_CLASSES, s.ft_images, seed, root), load(folder, seed)
    callbacks, init_used = [], None
    if method != "plain":
        model = branchify_hf(model, method, **({"init": "hf"} if init == "random" else {}))
        callbacks, init_used = [BranchifyCallback()], model.branched.init_used
    with tempfile.TemporaryDirectory() as tmp:
        args = trainer_args(tmp, seed, s.ft_epochs, s.ft_lr, s.batch_size)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Images(x, y),
                                       data_collator=Collate(seed), callbacks=callbacks)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = trainer.train().training_loss
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        deployed = (model if method == "plain" else
                    transformers.ViTForImageClassification.from_pretrained(Path(tmp) / EXPORT_SUBDIR))
        acc = accuracy(deployed, xt, yt)
    return {"setting": s.name, "method": method, "init": init, "implementation": IMPLEMENTATION, "seed": seed,
            "target_acc": acc, "deployed_class": type(deployed).__name__, "init_used": init_used,
            "train_loss": loss, "train_seconds": seconds, "train_cpu_seconds": cpu, "test_images": len(yt)}


def run_path(out: Path, s: HFSetting, method: str, init: str, seed: int) -> Path:
    return out / "runs" / f"hf-{s.name}" / f"{method}-{init}-seed{seed}.json"


def sweep(s: HFSetting, seeds: list[int], out: Path, folder: Path, root: str | None = None,
          which: list[tuple[str, str]] = ROWS) -> None:
    """Every row of every seed (seed-major) not yet on disk, one after the other in this process."""
    jobs = [(seed, m, init) for seed in seeds for m, init in which if not run_path(out, s, m, init, seed).exists()]
    print(f"{len(jobs)} runs to go", flush=True)
    t0 = time.perf_counter()
    for i, (seed, method, init) in enumerate(jobs, 1):
        rec = run_one(s, method, init, seed, folder, root)
        path = run_path(out, s, method, init, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(rec))
        path.with_suffix(".tmp").replace(path)
        print(f"[{i}/{len(jobs)} {time.perf_counter() - t0:5.0f}s] {method:5s} {init:10s} seed {seed}: "
              f"target {rec['target_acc']:.2f}% ({rec['train_seconds']:.0f}s)", flush=True)


# ---------------------------------------------------------------------- summary
def summarise(records: list[dict]) -> list[dict]:
    """One row per (method, init): accuracy mean +- std, the paired gain over ``plain`` fine-tuning of
    the same seeds and, for pretrained peers, the paired gain over random peers (each mean +- SE)."""
    by: dict[tuple[str, str], dict[int, float]] = {}
    for r in records:
        by.setdefault((r["method"], r["init"]), {})[r["seed"]] = r["target_acc"]
    base = by.get(("plain", "pretrained"), {})
    rows = []
    for key in [k for k in ROWS if k in by]:
        runs = by[key]
        accs = [runs[s] for s in sorted(runs)]
        row = {"method": key[0], "init": key[1], "seeds": len(accs), "target_mean": statistics.fmean(accs),
               "target_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               **{k: statistics.fmean(r[k] for r in records if (r["method"], r["init"]) == key)
                  for k in ("train_seconds", "train_cpu_seconds")}}
        gains = paired_differences(runs, base)
        if key != ("plain", "pretrained") and gains:
            row["gain_mean"], row["gain_se"] = mean_se(gains)
        other = by.get((key[0], "random"), {})
        if key[1] == "pretrained" and key[0] != "plain" and other:
            row["vs_random_mean"], row["vs_random_se"] = mean_se(paired_differences(runs, other))
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The markdown table of :func:`summarise`'s rows."""
    return markdown_table(
        ["method", "peers init", "seeds", "target acc (%)", "gain vs plain fine-tuning (paired ± SE)",
         "pretrained - random peers (paired ± SE)", "train s/run (wall / CPU)"],
        [[r["method"], r["init"], r["seeds"], f"{r['target_mean']:.2f} ± {r['target_std']:.2f}",
          paired_cell(r, "gain", "-"), paired_cell(r, "vs_random"),
          f"{r['train_seconds']:.0f} / {r['train_cpu_seconds']:.0f}"] for r in rows])


def write_summary(out: Path, s: HFSetting, folder: Path) -> str:
    """``hf_results.json`` and ``hf_summary.md`` in ``out`` from the run records on disk; the summary text."""
    records = [json.loads(p.read_text()) for p in sorted((out / "runs" / f"hf-{s.name}").glob("*.json"))]
    rows = summarise(records)
    info = folder / "pretraining.json"
    pretraining = json.loads(info.read_text()) if info.exists() else None
    text = [f"# CPU fine-tuning benchmark, Hugging Face path: {s.name}", "",
            "Tiny `ViTForImageClassification` backbone loaded with `from_pretrained` (fresh 5-way classifier), "
            "fine-tuned by the unchanged `transformers.Trainer` (+ `BranchifyCallback` for ONE / DML); "
            "target = the exported target reloaded with `from_pretrained`. Random peers: `init=\"hf\"`; "
            "pretrained peers: the automatic default for a `from_pretrained` model.", "", table(rows)]
    text += pretrained_start(pretraining, s.pre_epochs)
    write_summary_files(out, "\n".join(text), {
        "machine": machine_info(torch.device("cpu")), "config": asdict(s), "pretraining": pretraining,
        "summary": rows, "runs": records}, prefix="hf_")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["pretrain", "run", "summarise"])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--data-root", default=None)
    p.add_argument("--force", action="store_true", help="pretrain again even if the checkpoint exists")
    p.add_argument("--tiny", action="store_true", help="the smoke test's tiny setting (seconds)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s, out = (TINY if args.tiny else HFSetting()), Path(args.out)
    folder = checkpoint_dir(s, out)  # --force rebuilds it (seeded: seed 0, one thread)
    if args.command in ("pretrain", "run"):
        t0 = time.perf_counter()
        pretrain(s, folder, args.data_root, force=args.force)
        info = json.loads((folder / "pretraining.json").read_text())
        size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        print(f"pretrained backbone {folder} ({size:.2f} MB): {info['test_acc_classes_0_4']:.2f}% on classes 0-4 "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    if args.command == "run":
        sweep(s, [int(x) for x in args.seeds.split(",") if x.strip()], out, folder, args.data_root)
    if args.command != "pretrain":
        print(write_summary(out, s, folder))


if __name__ == "__main__":
    main()
