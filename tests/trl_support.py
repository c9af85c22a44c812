"""Shared pieces of the TRL tests and tools/bench_trl.py: a byte-level ``tokenizer.json`` made with
the ``tokenizers`` library (one token per byte, so no token merges across a join and logits stay
small), preference records, and a tiny Hugging Face Llama built from a config (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"


def byte_tokenizer(directory: Path) -> Path:
    """Write ``tokenizer.json`` (+ ``tokenizer_config.json``): 256 byte tokens, then EOS (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "pad_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


def records(n: int, seed: int = 0, shared_prompts: int = 1) -> list[dict[str, str]]:
    """``n`` text records; each prompt is used by ``shared_prompts`` consecutive records."""
    import random

    rng = random.Random(seed)
    words = "the a model answer question data token pair prefers kind helpful harmless reply".split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    out, prompt = [], ""
    for i in range(n):
        if i % shared_prompts == 0:
            prompt = "Human: " + text(rng.randint(3, 12)) + "\nAssistant:"
        out.append({"prompt": prompt, "chosen": " " + text(rng.randint(1, 8)),
                    "rejected": " " + text(rng.randint(1, 8))})
    return out


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, vocab: int = 257, impl: str = "sdpa") -> Any:
    import torch
    import transformers as tr

    torch.manual_seed(seed)
    cfg = tr.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, eos_token_id=256, pad_token_id=256, bos_token_id=None)
    cfg._attn_implementation = impl
    return tr.LlamaForCausalLM(cfg)
