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


# ---------------------------------------------------------------------- the architecture spread
ZOO_VOCAB, ZOO_LAYERS = 100, 3
_TEXT = dict(vocab_size=ZOO_VOCAB, hidden_size=32, num_hidden_layers=ZOO_LAYERS, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64)
_LM = dict(_TEXT, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_S2S = dict(vocab_size=ZOO_VOCAB, d_model=32, encoder_layers=ZOO_LAYERS, decoder_layers=ZOO_LAYERS,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
_VIT = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=ZOO_LAYERS,
            num_attention_heads=4, intermediate_size=64)
_STAGES = dict(num_channels=3, hidden_sizes=[8, 16, 32], depths=[1] * ZOO_LAYERS, num_stages=ZOO_LAYERS)
_AUDIO = dict(hidden_size=32, num_hidden_layers=ZOO_LAYERS, num_attention_heads=4, intermediate_size=64,
              conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
              num_conv_pos_embedding_groups=4, vocab_size=ZOO_VOCAB)

ZOO: dict[str, tuple[str, str, dict, str]] = {
    "bert": ("BertForSequenceClassification", "BertConfig", _TEXT, "text"),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", dict(_TEXT, pad_token_id=1), "text"),
    "xlm_roberta": ("XLMRobertaForSequenceClassification", "XLMRobertaConfig", dict(_TEXT, pad_token_id=1), "text"),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig",
                   dict(vocab_size=ZOO_VOCAB, dim=32, n_layers=ZOO_LAYERS, n_heads=4, hidden_dim=64,
                        max_position_embeddings=64), "text"),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig", dict(_TEXT, embedding_size=16), "text"),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", dict(_TEXT, embedding_size=16), "text"),
    "deberta_v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config",
                   dict(_TEXT, relative_attention=True, position_buckets=8, max_relative_positions=-1,
                        pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0), "text"),
    "mpnet": ("MPNetForSequenceClassification", "MPNetConfig", _TEXT, "text"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=ZOO_VOCAB, n_embd=32, n_layer=ZOO_LAYERS, n_head=4,
                                                   n_positions=64, pad_token_id=0, bos_token_id=1,
                                                   eos_token_id=2), "causal"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_LM, num_key_value_heads=2), "causal"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_LM, num_key_value_heads=2), "causal"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(_LM, num_key_value_heads=2, head_dim=8), "causal"),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_LM, num_key_value_heads=2, sliding_window=4),
                "causal"),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(_LM, num_key_value_heads=1, head_dim=8), "causal"),
    "phi": ("PhiForCausalLM", "PhiConfig", dict(_LM, num_key_value_heads=2), "causal"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", _LM, "causal"),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(_LM, ffn_dim=64, word_embed_proj_dim=32), "causal"),
    "falcon": ("FalconForCausalLM", "FalconConfig", dict(_LM, num_kv_heads=2, new_decoder_architecture=True),
               "causal"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_LM, num_key_value_heads=2, head_dim=8, sliding_window=4),
               "causal"),
    "gpt_neo": ("GPTNeoForCausalLM", "GPTNeoConfig",
                dict(vocab_size=ZOO_VOCAB, hidden_size=32, num_layers=ZOO_LAYERS, num_heads=4, window_size=4,
                     attention_types=[[["global", "local"], 1], [["global"], 1]], intermediate_size=64,
                     max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2), "causal"),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(vocab_size=ZOO_VOCAB, hidden_size=32, n_layer=ZOO_LAYERS,
                                                      n_head=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
              "causal"),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(vocab_size=ZOO_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=ZOO_LAYERS, num_heads=4,
                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
           "seq2seq"),
    "bart": ("BartForConditionalGeneration", "BartConfig", _S2S, "seq2seq"),
    "pegasus": ("PegasusForConditionalGeneration", "PegasusConfig", _S2S, "seq2seq"),
    "marian": ("MarianMTModel", "MarianConfig", dict(_S2S, decoder_start_token_id=0), "seq2seq"),
    "whisper": ("WhisperForConditionalGeneration", "WhisperConfig",
                dict({k: v for k, v in _S2S.items() if k != "max_position_embeddings"}, num_mel_bins=16,
                     max_source_positions=16, max_target_positions=32), "whisper"),
    "vit": ("ViTForImageClassification", "ViTConfig", _VIT, "image"),
    "deit": ("DeiTForImageClassification", "DeiTConfig", _VIT, "image"),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(_VIT, use_relative_position_bias=True), "image"),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config",
               dict({k: v for k, v in _VIT.items() if k != "intermediate_size"}, mlp_ratio=2), "image"),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1] * ZOO_LAYERS,
                  num_heads=[1, 2, 4], window_size=2), "image"),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", _STAGES, "image"),
    "resnet": ("ResNetForImageClassification", "ResNetConfig", dict(_STAGES, embedding_size=8), "image"),
    "wav2vec2": ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config", _AUDIO, "audio"),
    "hubert": ("HubertForSequenceClassification", "HubertConfig", _AUDIO, "audio"),
    "wavlm": ("WavLMForSequenceClassification", "WavLMConfig", dict(_AUDIO, num_buckets=16, max_bucket_distance=40),
              "audio"),
}
"""The architecture spread: tiny random configs (3 layers or stages, width 32 (stages 8-32), vocabulary 100;
GQA / MQA in the Llama family, sliding windows in Mistral / Gemma-2, DeBERTa-v2 with log-bucketed relative
attention as real checkpoints use). ``name: (model class, config class, config kwargs, input kind)``."""

ZOO_LABELS = 3


def make_zoo_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny, randomly initialised model of the spread (eval mode)."""
    model_cls, config_cls, kwargs, kind = ZOO[name]
    cfg = getattr(transformers, config_cls)(**kwargs)
    if kind in ("text", "image", "audio"):
        cfg.num_labels = ZOO_LABELS
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(cfg).eval()


def make_zoo_batch(name: str, batch: int = 2, seq: int = 8, seed: int = 0, labels: bool = True) -> dict:
    """Inputs (and labels) for a model of the spread; text batches right-pad their last example."""
    kind, cfg = ZOO[name][3], ZOO[name][2]
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        out = {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    elif kind == "audio":
        out = {"input_values": torch.randn(batch, 800, generator=g)}
    elif kind == "whisper":
        out = {"input_features": torch.randn(batch, cfg["num_mel_bins"], 2 * cfg["max_source_positions"],
                                             generator=g)}
    else:
        ids = torch.randint(3, ZOO_VOCAB, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, seq - 2:] = 0
        out = {"input_ids": ids, "attention_mask": mask}
    if kind in ("seq2seq", "whisper"):
        out["decoder_input_ids"] = torch.randint(3, ZOO_VOCAB, (batch, seq - 2), generator=g)
    if labels:
        if kind == "causal":
            out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        elif kind in ("seq2seq", "whisper"):
            out["labels"] = torch.randint(3, ZOO_VOCAB, (batch, seq - 2), generator=g)
        else:
            out["labels"] = torch.randint(0, ZOO_LABELS, (batch,), generator=g)
    return out
