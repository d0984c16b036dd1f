"""(prompt, answer) pairs as model inputs, and the log-probability the model gives each answer
token: the one computation both losses (``losses.sft``, ``losses.bradley_terry``) build on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tailbridge.models.rewriting.prompts import target

MAX_TOKENS = 96  # prompt + answer; prompts are bounded by bounds.MAX_QUERY_CHARS


def encode(tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], device: str = "cpu") -> dict[str, Any]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on the
    answer's tokens and the end token). Prompt and answer are tokenized apart, as generation
    sees the prompt; the prompt is cut from the left if the pair is too long."""
    import torch

    rows, labels = [], []
    for p, a in zip(prompts, answers):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(target(a), add_special_tokens=False)["input_ids"][:MAX_TOKENS // 2] + [tokenizer.eos_token_id]
        p_ids = p_ids[-(MAX_TOKENS - len(a_ids)):]
        rows.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    label_ids = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention[i, :len(r)] = 1
        label_ids[i, :len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": label_ids.to(device)}


def answer_logprobs(model: Any, batch: dict[str, Any]) -> tuple[Any, Any]:
    """(log-probability of each answer token [B, T-1], mask of answer tokens [B, T-1])."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask
