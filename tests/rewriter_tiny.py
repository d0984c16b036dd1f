"""A tiny causal LM for the rewriter's tests: GPT-2 with 2 layers and a byte-level BPE
tokenizer trained on the given texts, built in about a second (never the 135M model)."""

from __future__ import annotations

from collections.abc import Sequence

from tailbridge.models.rewriting.generator import Generator
from tailbridge.models.rewriting.prompts import INSTRUCTIONS


def tiny_generator(texts: Sequence[str], seed: int = 0, max_new_tokens: int = 8) -> Generator:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([*texts, *INSTRUCTIONS.values(), "Query: Answer:"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=48, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return Generator(GPT2LMHeadModel(config), tokenizer, "cpu", max_new_tokens=max_new_tokens)
