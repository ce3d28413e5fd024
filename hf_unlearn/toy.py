"""A small Llama and word-level tokenizer built from the data itself, for examples and the quick benchmark.

Nothing is downloaded. `initializer_range=0.3` makes the random network carry enough signal that LoRA on
q_proj/v_proj memorises facts in a few hundred steps (with the usual 0.02 it barely learns).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


def build_toy_tokenizer(rows: Iterable[Mapping]):
    """A whitespace word-level tokenizer covering the prompt/response text of `rows` and the digits."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [r["prompt"] + " " + r["response"] for r in rows] + ["0 1 2 3 4 5 6 7 8 9"],
        trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_toy_model(
    rows: Iterable[Mapping], out: str | Path, hidden_size: int = 64, layers: int = 2, seed: int = 0
):
    """Save a config-built Llama and a tokenizer covering `rows` (prompt/response text) to `out`; return both."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_toy_tokenizer(rows)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer
