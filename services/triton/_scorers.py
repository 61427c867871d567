"""The judge's scoring models, framework-neutral: numpy in, numpy out.

The same classes run inside the embedded PyTriton server and inside the Python-backend ``model.py`` of the
production model repository (``infra/triton/model_repository``), so embedded and NGC Triton score alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

YES_WORDS = ("Yes", "yes", " Yes", " yes", "YES")
NO_WORDS = ("No", "no", " No", " no", "NO")


def _first_token_ids(tokenizer: Any, words: tuple[str, ...]) -> list[int]:
    ids = set()
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if encoded:
            ids.add(int(encoded[0]))
    return sorted(ids)


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding (0 for the first real token of every row)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LlmJudge:
    """P(yes) for a yes/no question, from the judge LM's next-token logits, normalised over yes/no tokens."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 1024) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.yes_ids = _first_token_ids(tokenizer, YES_WORDS)
        self.no_ids = _first_token_ids(tokenizer, NO_WORDS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise ValueError("tokenizer has no distinct yes/no tokens")

    @classmethod
    def from_pretrained(cls, path: Path | str) -> LlmJudge:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        return cls(model, tok)

    def render(self, question: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text: str = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            return text
        return f"{question}\nAnswer:"

    @torch.inference_mode()
    def score(self, questions: list[str]) -> NDArray[np.float32]:
        texts = [self.render(q) for q in questions]
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
        )
        logits = (
            self.model(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                position_ids=left_padded_positions(enc["attention_mask"]),
                logits_to_keep=1,  # only the next-token distribution matters: skip a (batch, seq, vocab) tensor
            )
            .logits[:, -1, :]
            .float()
        )
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        result: NDArray[np.float32] = torch.sigmoid(yes - no).numpy().astype(np.float32)
        return result
