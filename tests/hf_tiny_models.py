"""Tiny, randomly initialised Hugging Face models (one per family) and matching batches for the
HF tests. Nothing is downloaded: every model is built from a small config."""
from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB, SEQ, BATCH = 64, 8, 4

FAMILIES = ["bert", "distilbert", "vit", "gpt2_lm", "gpt2_cls", "t5", "marian"]
"""Model families the HF integration must support."""

SPLITS = {
    "bert": "bert.encoder.layer.1",
    "distilbert": "distilbert.transformer.layer.1",
    "vit": "vit.layers.1",
    "gpt2_lm": "transformer.h.1",
    "gpt2_cls": "transformer.h.1",
    "t5": "decoder.block.1",
    "marian": "model.decoder.layers.1",
}
"""A split point (a layer path) per family."""

AUTO = {
    "bert": "AutoModelForSequenceClassification", "distilbert": "AutoModelForSequenceClassification",
    "vit": "AutoModelForImageClassification", "gpt2_lm": "AutoModelForCausalLM",
    "gpt2_cls": "AutoModelForSequenceClassification", "t5": "AutoModelForSeq2SeqLM",
    "marian": "AutoModelForSeq2SeqLM",
}
"""The Auto class that reloads each family's export."""


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-3 layer model of ``family`` with hidden size 32 and random weights."""
    T = transformers
    torch.manual_seed(seed)
    if family == "bert":
        cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=32, num_labels=3)
        return T.BertForSequenceClassification(cfg)
    if family == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                                 max_position_embeddings=32, num_labels=3)
        return T.DistilBertForSequenceClassification(cfg)
    if family == "vit":
        cfg = T.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=64, num_labels=10)
        return T.ViTForImageClassification(cfg)
    if family in ("gpt2_lm", "gpt2_cls"):
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=32, num_labels=3,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1)
        return T.GPT2LMHeadModel(cfg) if family == "gpt2_lm" else T.GPT2ForSequenceClassification(cfg)
    if family == "t5":
        cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                         num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return T.T5ForConditionalGeneration(cfg)
    if family == "marian":
        cfg = T.MarianConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=0,
                             decoder_start_token_id=0, eos_token_id=1, forced_eos_token_id=1)
        return T.MarianMTModel(cfg)
    raise ValueError(family)


def make_batch(family: str, batch: int = BATCH, seq: int = SEQ, seed: int = 0, pad_from: int | None = 5,
               labels: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs (and labels) for ``family``; the last example is right-padded from ``pad_from``."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        out = {"pixel_values": torch.randn(batch, 1, 28, 28, generator=g)}
        if labels:
            out["labels"] = torch.randint(0, 10, (batch,), generator=g)
        return out
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_from is not None:
        mask[-1, pad_from:] = 0
        ids[-1, pad_from:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if family in ("t5", "marian"):
        dec = torch.randint(2, VOCAB, (batch, seq - 2), generator=g)
        out["decoder_input_ids"] = dec
        if labels:
            out["labels"] = torch.randint(2, VOCAB, (batch, seq - 2), generator=g)
            out["labels"][-1, -2:] = -100
            del out["decoder_input_ids"]  # shifted from the labels, as in seq2seq training
    elif family == "gpt2_lm":
        if labels:
            out["labels"] = ids.masked_fill(mask == 0, -100)
    elif labels:
        out["labels"] = torch.randint(0, 3, (batch,), generator=g)
    return out
