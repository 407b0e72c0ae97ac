"""Randomly initialised models of real architectures, with a word-level tokenizer, offline.

A GPU machine lent for a few minutes has torch and transformers but no hub access and a
64 MiB upload limit: neither real weights nor the embedded model's package reach it. Speed,
memory and exactness do not depend on what the weights are, only on their shapes, so the GPU
check (`benchmarks/gpu_check.py`) and the CUDA tests build models from the published
architecture configs below (sizes only, written here) with random weights, and a tokenizer
whose every id is a word. Generation is forced to a fixed length (`min_new_tokens`), since
a random model's end-of-sequence token comes whenever it likes.
"""

from __future__ import annotations

from typing import Any

import torch

#: Published shapes (config.json) of the models the README names; `tiny` is for CPU checks.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "hidden_act": "silu",
    },
    "tiny": {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu",
    },
}
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def word_tokenizer(vocab_size: int) -> Any:
    """A fast tokenizer whose ids 0..vocab_size-1 are the words w3, w4, ... (0-2: pad, eos,
    unk), with a plain chat template, so that prompts can be written as text too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tok


def random_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                 new_tokens: int | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of architecture `name` with seeded random weights; with
    `new_tokens` every generation runs exactly that many tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    fields = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    if new_tokens is not None:
        model.generation_config.min_new_tokens = new_tokens
        model.generation_config.max_new_tokens = new_tokens
    return model, word_tokenizer(config.vocab_size)


def random_prompts(n: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of `length` ids (never pad, eos or unk), seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n, length), generator=g).tolist()


__all__ = ["ARCHITECTURES", "random_model", "random_prompts", "word_tokenizer"]
