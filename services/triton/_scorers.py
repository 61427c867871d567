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

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 1024, render_mode: str = "plain") -> None:
        # "plain" ends the question with "Answer:"; "chat" wraps it in the tokenizer's chat template. On the
        # project's labelled set SmolLM2 scored AUC 0.553 plain vs 0.456 chat (scripts/judge_search.py).
        if render_mode not in ("plain", "chat"):
            raise ValueError(f"render_mode must be plain or chat, not {render_mode!r}")
        self.render_mode = render_mode
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.yes_ids = _first_token_ids(tokenizer, YES_WORDS)
        self.no_ids = _first_token_ids(tokenizer, NO_WORDS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise ValueError("tokenizer has no distinct yes/no tokens")

    @classmethod
    def from_pretrained(cls, path: Path | str, *, render_mode: str = "plain", device: str = "cpu") -> LlmJudge:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        model = model.to(torch.device(device)).eval()  # type: ignore[arg-type]
        return cls(model, tok, render_mode=render_mode)

    def render(self, question: str) -> str:
        if self.render_mode == "chat" and getattr(self.tokenizer, "chat_template", None):
            text: str = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            return text
        return f"{question}\nAnswer:"

    def encode(self, questions: list[str]) -> Any:
        """Tokenize rendered questions. The question (which quotes the untrusted prompt and completion) is cut
        with ``split_special_tokens=True``, so a completion that contains ``<|im_end|>``/``<|im_start|>`` stays
        plain text instead of becoming real control tokens that close the judge's turn; only the chat
        template's own scaffolding is tokenized as special tokens."""
        tok = self.tokenizer
        if self.render_mode == "chat" and getattr(tok, "chat_template", None):
            sentinel = "\x00QUESTION\x00"
            prefix, suffix = self.render(sentinel).split(sentinel)
            scaffold = tok([prefix, suffix], add_special_tokens=False)["input_ids"]
            bodies = tok(questions, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            rows = [(scaffold[0] + body + scaffold[1])[: self.max_length] for body in bodies]
            return tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        return tok(
            [self.render(q) for q in questions],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
            split_special_tokens=True,
        )

    @torch.inference_mode()
    def score(self, questions: list[str]) -> NDArray[np.float32]:
        enc = self.encode(questions)
        device = next(self.model.parameters()).device
        mask = enc["attention_mask"].to(device)
        logits = (
            self.model(
                input_ids=enc["input_ids"].to(device),
                attention_mask=mask,
                position_ids=left_padded_positions(mask),
                logits_to_keep=1,  # only the next-token distribution matters: skip a (batch, seq, vocab) tensor
            )
            .logits[:, -1, :]
            .float()
        )
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        result: NDArray[np.float32] = torch.sigmoid(yes - no).cpu().numpy().astype(np.float32)
        return result
