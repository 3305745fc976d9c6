"""Shared test helpers: tiny random LLaMA models with a real (tiny) tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps weights and the key value cache to four bits.",
    "Past only quantization keeps the current token in full precision.",
    "Anarchism is a political philosophy and movement that is skeptical of authority.",
] * 20


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(**overrides) -> LlamaConfig:
    """2 layers, hidden 160 (ragged with group 128), GQA 4:2 heads of 40 channels, tied embeddings."""
    kw = dict(vocab_size=320, hidden_size=160, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(path: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so the model is not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
