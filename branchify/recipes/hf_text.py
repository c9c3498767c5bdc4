"""Text recipes with the unchanged ``transformers.Trainer``: classification and translation, baseline vs online KD.

Two tasks, each trained once as is ("baseline") and once per online-KD method with
``branchify_hf`` + :class:`~branchify.integrations.hf.BranchifyCallback`:

* ``classify`` - a pre-trained encoder (default ``prajjwal1/bert-tiny``) fine-tuned on a
  ``datasets`` text-classification set (default GLUE SST-2); metric: accuracy of the target.
* ``translate`` - a pre-trained Marian model (default ``Helsinki-NLP/opus-mt-en-de``) fine-tuned
  on a ``datasets`` translation set (default ``wmt16`` de-en); metric: token accuracy of the
  target (teacher forcing) and, with ``--bleu N`` and ``sacrebleu`` installed, BLEU of the exported
  target's ``generate()`` on N sentences.

Real runs need ``pip install datasets`` and access to the Hugging Face hub (checkpoints and
data). ``--fake-data`` runs offline: random "sentences" over a small word-level tokenizer built
on the spot and a tiny randomly initialised model of the same family, through exactly the same
tokenisation, collation, Trainer, callback and export code - a smoke test, not a benchmark.

Replicas of a checkpoint loaded with ``from_pretrained`` start from its weights (``init="pretrained"``,
chosen automatically: every leaf but the target gets a fresh classifier; a translation model's LM head
is tied to its embeddings, so its leaves differ by dropout and, with ``--init-noise 0.01``, by noise);
``--init hf`` re-initialises whole replicas instead. Each row records the replica init it got.

Run::

    python -m branchify.recipes.hf_text classify --methods baseline,one,tsa --epochs 3
    python -m branchify.recipes.hf_text classify --dataset imdb --text-field text --split bert.encoder.layer.1
    python -m branchify.recipes.hf_text translate --train-subset 20000 --bleu 200
    python -m branchify.recipes.hf_text classify --fake-data        # offline, seconds
    python -m branchify.recipes.hf_text translate --fake-data

Examples:
    >>> from branchify.recipes.hf_text import main
    >>> rows = main(["classify", "--fake-data", "--methods", "baseline,one"])   # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .tables import fixed_width_table

DEFAULTS = {
    "classify": {"model": "prajjwal1/bert-tiny", "dataset": "glue", "config": "sst2", "text_field": "sentence",
                 "label_field": "label", "eval_split": "validation", "max_length": 128, "lr": 5e-5},
    "translate": {"model": "Helsinki-NLP/opus-mt-en-de", "dataset": "wmt16", "config": "de-en", "src": "en",
                  "tgt": "de", "eval_split": "validation", "max_length": 96, "lr": 5e-5},
}


# ---------------------------------------------------------------------- offline (fake) data
class ListDataset(torch.utils.data.Dataset):
    """A list of feature dicts (what ``datasets.Dataset.map`` would produce), for ``--fake-data``."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def fake_tokenizer(vocab_words: int = 60):
    """A word-level fast tokenizer over ``w0 ... w{n-1}`` (built locally, nothing downloaded).

    Examples:
        >>> fake_tokenizer()("w1 w2")["input_ids"]                        # doctest: +SKIP
        [2, 6, 7, 3]
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab_words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]")


def fake_model(task: str, tokenizer: Any, num_labels: int = 2):
    """A tiny random model of the default family (BERT for classify, Marian for translate)."""
    import transformers as T

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if task == "classify":
        cfg = T.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                           pad_token_id=tokenizer.pad_token_id)
        return T.BertForSequenceClassification(cfg)
    cfg = T.MarianConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         decoder_start_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                         forced_eos_token_id=tokenizer.sep_token_id)
    return T.MarianMTModel(cfg)


def fake_texts(task: str, n: int, seed: int, vocab_words: int = 60) -> list[dict[str, Any]]:
    """Random sentences: label 1 iff word ``w0`` occurs (classify); target = reversed source (translate)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [f"w{rng.randrange(vocab_words)}" for _ in range(rng.randint(3, 10))]
        if task == "classify":
            rows.append({"text": " ".join(words), "label": int("w0" in words or "w1" in words)})
        else:
            rows.append({"src": " ".join(words), "tgt": " ".join(reversed(words))})
    return rows


# ---------------------------------------------------------------------- data
def load_data(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any, int]:
    """Tokenised ``(train, eval, num_labels)``: a ``datasets`` dataset, or fake rows offline."""
    if args.fake_data:
        train_rows = fake_texts(args.task, args.train_subset or 256, args.seed)
        eval_rows = fake_texts(args.task, args.eval_subset or 64, args.seed + 1)
        train = ListDataset([tokenize_row(args, tokenizer, r) for r in train_rows])
        evals = ListDataset([tokenize_row(args, tokenizer, r) for r in eval_rows])
        return train, evals, 2
    try:
        import datasets
    except ImportError as exc:
        raise SystemExit("the real-data recipes need the datasets package: pip install datasets "
                         "(or run with --fake-data)") from exc
    raw = datasets.load_dataset(args.dataset, args.config) if args.config else datasets.load_dataset(args.dataset)
    train, evals = raw["train"], raw[args.eval_split]
    if args.train_subset:
        train = train.shuffle(seed=args.seed).select(range(min(args.train_subset, len(train))))
    if args.eval_subset:
        evals = evals.select(range(min(args.eval_subset, len(evals))))
    num_labels = 0
    if args.task == "classify":
        feature = train.features[args.label_field]
        num_labels = getattr(feature, "num_classes", None) or len(set(train[args.label_field]))
    columns = train.column_names

    def batched(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [tokenize_row(args, tokenizer, r) for r in rows]
        return {k: [o[k] for o in out] for k in out[0]}

    train = train.map(batched, batched=True, remove_columns=columns)
    evals = evals.map(batched, batched=True, remove_columns=columns)
    return train, evals, num_labels


def tokenize_row(args: argparse.Namespace, tokenizer: Any, row: dict[str, Any]) -> dict[str, Any]:
    """One example -> model features (``labels`` included)."""
    if args.task == "classify":
        fields = args.text_field.split(",") if not args.fake_data else ["text"]
        texts = [row[f] for f in fields]
        enc = tokenizer(*texts, truncation=True, max_length=args.max_length)
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        enc["labels"] = int(row[args.label_field] if not args.fake_data else row["label"])
        return enc
    if args.fake_data:
        src, tgt = row["src"], row["tgt"]
    else:
        src, tgt = row["translation"][args.src], row["translation"][args.tgt]
    enc = tokenizer(src, text_target=tgt, truncation=True, max_length=args.max_length)
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "labels")}


# ---------------------------------------------------------------------- metrics
def argmax_logits(logits: Any, labels: Any) -> torch.Tensor:
    """``preprocess_logits_for_metrics``: keep predicted ids, not ``[N, L, vocab]`` logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.argmax(-1)


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """Accuracy over examples (classify) or over non-ignored target tokens (translate)."""
    preds, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    mask = labels != -100
    return {"accuracy": float((preds[mask] == labels[mask]).mean()) if mask.any() else 0.0}


def bleu(model: Any, tokenizer: Any, evals: Any, n: int, max_length: int) -> float | None:
    """Corpus BLEU of ``model.generate`` on the first ``n`` eval examples (``None`` without sacrebleu)."""
    try:
        import sacrebleu
    except ImportError:
        print("[hf_text] sacrebleu is not installed: BLEU skipped (pip install sacrebleu)")
        return None
    model.eval()
    device = next(model.parameters()).device
    hyps, refs = [], []
    for i in range(0, min(n, len(evals)), 16):
        rows = [evals[j] for j in range(i, min(i + 16, n, len(evals)))]
        batch = tokenizer.pad([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in rows],
                              return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_length, num_beams=1)
        hyps += tokenizer.batch_decode(out, skip_special_tokens=True)
        refs += tokenizer.batch_decode([[t for t in r["labels"] if t != -100] for r in rows], skip_special_tokens=True)
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


# ---------------------------------------------------------------------- training
def run_method(method: str, args: argparse.Namespace, tokenizer: Any, train: Any, evals: Any,
               num_labels: int) -> dict[str, Any]:
    """Fine-tune one method with the unchanged Trainer; return its results row."""
    import transformers as T

    from ..integrations.hf import BranchifyCallback, branchify_hf

    out = Path(args.out) / args.task / method
    source = args.model
    if args.fake_data:  # the tiny random model goes through save_pretrained / from_pretrained like a checkpoint
        source = str(Path(args.out) / args.task / "fake-checkpoint")
        fake_model(args.task, tokenizer, num_labels).save_pretrained(source)
    if args.task == "classify":
        base = T.AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
    else:
        base = T.AutoModelForSeq2SeqLM.from_pretrained(source)
    callbacks = []
    if method == "baseline":
        model = base
    else:
        overrides = {"split": args.split.split(",") if args.split and "," in args.split else args.split,
                     "init": args.init, "init_noise": args.init_noise}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = branchify_hf(method, base, **{k: v for k, v in overrides.items() if v})
        callbacks.append(BranchifyCallback())
    if args.task == "classify":
        collator = T.DataCollatorWithPadding(tokenizer)
    else:
        collator = T.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    targs = T.TrainingArguments(
        str(out), num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr, weight_decay=0.01, warmup_steps=args.warmup, logging_steps=args.log_every,
        save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True)
    trainer = T.Trainer(model=model, args=targs, train_dataset=train, eval_dataset=evals, data_collator=collator,
                        compute_metrics=accuracy_metrics, preprocess_logits_for_metrics=argmax_logits,
                        callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    train_time = time.perf_counter() - start
    metrics = trainer.evaluate()
    row: dict[str, Any] = {"method": method, "accuracy": metrics["eval_accuracy"],
                           "train_time_s": round(train_time, 1),
                           "trained_params": sum(p.numel() for p in model.parameters())}
    if method == "baseline":
        deployed = model
    else:
        auto = T.AutoModelForSequenceClassification if args.task == "classify" else T.AutoModelForSeq2SeqLM
        deployed = auto.from_pretrained(out / "exported-target")  # the callback's save_pretrained export
        row["leaves"] = model.branched.num_leaves
        row["replica_init"] = model.branched.init_used
    row["deployed_params"] = sum(p.numel() for p in deployed.parameters())
    if args.task == "translate" and args.bleu:
        row["bleu"] = bleu(deployed, tokenizer, evals, args.bleu, args.max_length)
    return row


def format_table(rows: Sequence[dict[str, Any]], task: str) -> str:
    """Fixed-width results table."""
    metric = "accuracy" if task == "classify" else "token acc"
    columns = [("method", "<10"), (metric, ">10.2f"), ("bleu", ">6"), ("leaves", ">6"), ("params(train)", ">14,"),
               ("params(deploy)", ">14,"), ("train s", ">8.1f")]
    return fixed_width_table(columns, [
        (r["method"], 100 * r["accuracy"], f"{r['bleu']:.1f}" if r.get("bleu") is not None else "-",
         r.get("leaves", 1), r["trained_params"], r["deployed_params"], r["train_time_s"]) for r in rows])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("task", choices=sorted(DEFAULTS))
    p.add_argument("--methods", default="baseline,one,tsa")
    p.add_argument("--model", default=None, help="hub checkpoint (default per task)")
    p.add_argument("--dataset", default=None, help="datasets name (default per task)")
    p.add_argument("--config", default=None, help="datasets configuration (default per task)")
    p.add_argument("--text-field", default=None, help="classify: text column(s), comma-separated for pairs")
    p.add_argument("--label-field", default=None)
    p.add_argument("--src", default=None, help="translate: source language key")
    p.add_argument("--tgt", default=None, help="translate: target language key")
    p.add_argument("--eval-split", default=None)
    p.add_argument("--split", default=None, help="layer path(s) to cut at, comma-separated (default: last layers)")
    p.add_argument("--init", default="auto", help="replica init: auto (pretrained for a from_pretrained "
                                                  "checkpoint), pretrained, hf, shuffle...")
    p.add_argument("--init-noise", type=float, default=0.0, help="init=pretrained: noise x each tensor's std")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--eval-subset", type=int, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--bleu", type=int, default=0, help="translate: BLEU of generate() on N eval sentences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/hf_text")
    p.add_argument("--fake-data", action="store_true",
                   help="offline smoke run: random words, a local tokenizer and a tiny random model")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.task].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.fake_data:
        args.max_length = 32
        args.max_steps = args.max_steps or 4
        args.batch_size = min(args.batch_size, 8)
        args.log_every = 1
        args.lr = 1e-3
        args.bleu = min(args.bleu, 8)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the task for every method; print the table and write ``results.json``."""
    import transformers as T

    args = parse_args(argv)
    tokenizer = fake_tokenizer() if args.fake_data else T.AutoTokenizer.from_pretrained(args.model)
    train, evals, num_labels = load_data(args, tokenizer)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        print(f"[hf_text] {args.task}: training {method} ...", flush=True)
        rows.append(run_method(method, args, tokenizer, train, evals, num_labels))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    source = "fake data (offline smoke run)" if args.fake_data else f"{args.dataset}/{args.config}, {args.model}"
    print(f"\n{args.task}: {source}, {len(train)} train / {len(evals)} eval examples, {device}")
    print(format_table(rows, args.task))
    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)
    result = {"recipe": f"hf_text {args.task}", "args": vars(args), "rows": rows,
              "machine": {"device": device, "platform": platform.platform(), "torch": torch.__version__,
                          "transformers": T.__version__}}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
