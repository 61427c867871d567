"""The judge's scoring models, framework-neutral: numpy in, numpy out.

The same classes run inside the embedded PyTriton server and inside the Python-backend ``model.py`` of the
production model repository (``infra/triton/model_repository``), so embedded and NGC Triton score alike.
"""

from __future__ import annotations

import math
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


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """
    >>> common_prefix_len([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(rows: list[list[int]], min_shared: int) -> list[tuple[int, list[int]]]:
    """Group token rows that share a prefix worth computing once: ``[(prefix_len, row_indices), ...]``.

    Rows are sorted so that rows with long common prefixes sit side by side; then the cheapest cut of that
    order into groups is found by dynamic programming, where a group costs its prefix once plus every
    member's own suffix (in token positions), and a row alone costs its length. ``prefix_len`` is 0 for a row
    computed alone and always leaves every member at least one token of its own, whose next-token logits are
    the answer. Batches are at most a few hundred rows, so the quadratic search is cheap.

    Four questions about one conversation share it; two conversations of one prompt share only the prompt,
    which is not worth shrinking the four-row groups' prefixes for:

    >>> conv_a, conv_b = list(range(100)), list(range(60)) + [7] * 40
    >>> rows = [conv_a + [q] * 5 for q in (1000, 1001)] + [conv_b + [q] * 5 for q in (1000, 1001)]
    >>> prefix_groups(rows, min_shared=32)
    [(100, [2, 3]), (100, [0, 1])]
    >>> prefix_groups([[1, 2], [3, 4]], min_shared=32)
    [(0, [0]), (0, [1])]
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    sorted_rows = [rows[i] for i in order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: cheapest cost of the first j sorted rows
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # (start of the last group, its prefix length)
    for i in range(n):
        prefix, total = len(sorted_rows[i]), 0
        for j in range(i, n):
            total += len(sorted_rows[j])
            if j > i:
                shared = common_prefix_len(sorted_rows[j - 1], sorted_rows[j])
                prefix = min(prefix, shared, len(sorted_rows[j]) - 1, len(sorted_rows[i]) - 1)
                if prefix < min_shared:
                    break  # prefixes only shrink as the group grows
            size = j - i + 1
            used = prefix if size > 1 else 0
            cost = best[i] + total - (size - 1) * used
            if cost < best[j + 1]:
                best[j + 1], cut[j + 1] = cost, (i, used)
    groups: list[tuple[int, list[int]]] = []
    j = n
    while j > 0:
        i, used = cut[j]
        groups.append((used, order[i:j]))
        j = i
    return groups[::-1]


class LlmJudge:
    """P(yes) for a yes/no question, from the judge LM's next-token logits, normalised over yes/no tokens.

    With ``share_prefixes`` rows of one batch that start with the same tokens run that prefix through the model
    once and only their own suffixes each; the scores equal the unshared computation's (to float rounding). With
    the default template (instructions, principle, prompt, completion, question) the G completions of one prompt
    share everything up to their completions for every principle. This is what batching buys on a
    compute-bound CPU, where one long row already fills the matrix units.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int = 1024,
        render_mode: str = "plain",
        share_prefixes: bool = True,
        min_shared_tokens: int = 32,
    ) -> None:
        # "plain" ends the question with "Answer:"; "chat" wraps it in the tokenizer's chat template. On the
        # project's labelled set SmolLM2 scored AUC 0.553 plain vs 0.456 chat (scripts/judge_search.py).
        if render_mode not in ("plain", "chat"):
            raise ValueError(f"render_mode must be plain or chat, not {render_mode!r}")
        self.render_mode = render_mode
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.share_prefixes = share_prefixes
        self.min_shared_tokens = min_shared_tokens
        self.yes_ids = _first_token_ids(tokenizer, YES_WORDS)
        self.no_ids = _first_token_ids(tokenizer, NO_WORDS)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise ValueError("tokenizer has no distinct yes/no tokens")

    @classmethod
    def from_pretrained(
        cls,
        path: Path | str,
        *,
        render_mode: str = "plain",
        device: str = "cpu",
        share_prefixes: bool | None = None,
    ) -> LlmJudge:
        """``share_prefixes=None`` shares on a CPU only: there one long row already keeps the cores busy, so
        fewer token positions is what saves time; on a GPU one padded batch of 64 rows ran 13x faster than
        the shared prefixes' many small forwards (``reports/bench-compute-h200.json``)."""
        from transformers import AutoModelForCausalLM

        from services._models import load_tokenizer

        tok = load_tokenizer(path)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        model = model.to(torch.device(device)).eval()  # type: ignore[arg-type]
        share = device == "cpu" if share_prefixes is None else share_prefixes
        return cls(model, tok, render_mode=render_mode, share_prefixes=share)

    def render(self, question: str) -> str:
        if self.render_mode == "chat" and getattr(self.tokenizer, "chat_template", None):
            text: str = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            return text
        return f"{question}\nAnswer:"

    def token_rows(self, questions: list[str]) -> list[list[int]]:
        """Token ids of the rendered questions, unpadded. The question (which quotes the untrusted prompt and
        completion) is cut with ``split_special_tokens=True``, so a completion that contains
        ``<|im_end|>``/``<|im_start|>`` stays plain text instead of becoming real control tokens that close the
        judge's turn; only the chat template's own scaffolding is tokenized as special tokens."""
        tok = self.tokenizer
        if self.render_mode == "chat" and getattr(tok, "chat_template", None):
            sentinel = "\x00QUESTION\x00"
            prefix, suffix = self.render(sentinel).split(sentinel)
            scaffold = tok([prefix, suffix], add_special_tokens=False)["input_ids"]
            bodies = tok(questions, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            return [(scaffold[0] + body + scaffold[1])[: self.max_length] for body in bodies]
        rows: list[list[int]] = tok(
            [self.render(q) for q in questions],
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
            split_special_tokens=True,
        )["input_ids"]
        return rows

    def encode(self, questions: list[str]) -> Any:
        """Left-padded ``input_ids`` / ``attention_mask`` tensors of the rendered questions."""
        return self.tokenizer.pad({"input_ids": self.token_rows(questions)}, padding=True, return_tensors="pt")

    @torch.inference_mode()
    def score(self, questions: list[str]) -> NDArray[np.float32]:
        if not questions:
            return np.empty(0, dtype=np.float32)
        rows = self.token_rows(questions)
        out = np.empty(len(rows), dtype=np.float32)
        groups = prefix_groups(rows, self.min_shared_tokens) if self.share_prefixes else [(0, list(range(len(rows))))]
        alone = [i for prefix, members in groups if prefix == 0 for i in members]
        if alone:
            out[alone] = self._score_padded([rows[i] for i in alone])
        for prefix, members in groups:
            if prefix:
                out[members] = self._score_shared([rows[i] for i in members], prefix)
        return out

    def _device(self) -> torch.device:
        device: torch.device = next(self.model.parameters()).device
        return device

    def _p_yes(self, logits: torch.Tensor) -> NDArray[np.float32]:
        logits = logits.float()
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        result: NDArray[np.float32] = torch.sigmoid(yes - no).cpu().numpy().astype(np.float32)
        return result

    def _score_padded(self, rows: list[list[int]]) -> NDArray[np.float32]:
        enc = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        device = self._device()
        mask = enc["attention_mask"].to(device)
        logits = self.model(
            input_ids=enc["input_ids"].to(device),
            attention_mask=mask,
            position_ids=left_padded_positions(mask),
            logits_to_keep=1,  # only the next-token distribution matters: skip a (batch, seq, vocab) tensor
        ).logits[:, -1, :]
        return self._p_yes(logits)

    def _score_shared(self, rows: list[list[int]], prefix_len: int) -> NDArray[np.float32]:
        """The common prefix once (its KV cache repeated per row), then every row's own suffix, left-padded."""
        device = self._device()
        prefix = torch.tensor([rows[0][:prefix_len]], device=device)
        cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(len(rows))
        suffixes = self.tokenizer.pad({"input_ids": [r[prefix_len:] for r in rows]}, padding=True, return_tensors="pt")
        suffix_mask = suffixes["attention_mask"].to(device)
        # pads sit between prefix and suffix; masked out, and skipped by the positions
        mask = torch.cat([torch.ones(len(rows), prefix_len, dtype=suffix_mask.dtype, device=device), suffix_mask], 1)
        logits = self.model(
            input_ids=suffixes["input_ids"].to(device),
            attention_mask=mask,
            position_ids=prefix_len + left_padded_positions(suffix_mask),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
        return self._p_yes(logits)
