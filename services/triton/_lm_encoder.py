"""Pair features from the judge language model itself, for the principle heads.

Measured on the shipped sets (``judge_train.jsonl`` to fit, ``judge_eval.jsonl`` held out), logistic heads on
the mean of SmolLM2-135M-Instruct's hidden states at a middle layer rank responses far better than heads on
all-MiniLM-L6-v2 sentence embeddings: see ``docs/algorithm.md`` for the figures. A middle layer, because the
last layers of a small LM specialise in predicting the next token, not in what the text means.

The conversation is rendered the way the model was tuned to read one (its chat template, the user's request
and the assistant's response as messages), so text inside a response stays the response's content: it cannot
close the template's structure, it can only be read as part of the answer.

Two means, side by side: over the whole rendered conversation, and over the response's own tokens. The first
carries the request (whether a refusal fits it, whether an answer is on topic); the second is the answer
alone, undiluted by the template and the request, which is what tells fluent word salad that opens with a
correct fact from an answer (session 17: held-out AUC of ``honest`` on the student's own samples 0.116 with
the conversation mean alone; see ``docs/algorithm.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

FEATURES = "chat-meanpool+response-meanpool/v2"
# stands in for the response when finding where the chat template puts it (a private-use code point pair)
_MARK = "\ue000response\ue001"


class LmPairEncoder:
    """For (request, response) pairs, the hidden states after ``layer`` decoder layers (or all of them, for a
    model with fewer) averaged over the conversation's tokens, then over the response's tokens: ``2 x
    hidden_size`` features. Layers above ``layer`` are dropped: they are never run."""

    def __init__(
        self, model: Any, tokenizer: Any, name: str, layer: int, device: str = "cpu", max_length: int = 384
    ) -> None:
        """``model`` is the decoder stack (``AutoModel``, no LM head); layers above ``layer`` are cut off it."""
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.layer = min(layer, len(model.layers))
        model.layers = model.layers[: self.layer]
        model.norm = torch.nn.Identity()  # the final norm belongs to the last layer's output, not this one's
        model.config.num_hidden_layers = self.layer
        self.model = model.to(device).eval()
        self.device, self.max_length = device, max_length
        self.recipe = {"encoder": f"{name}@layer{self.layer}", "features": FEATURES}

    @classmethod
    def from_pretrained(cls, path: Path, name: str, layer: int, device: str = "cpu") -> LmPairEncoder:
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(str(path), dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(str(path)), name, layer, device)

    def render(self, prompt: str, response: str) -> str:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False))
        return f"User: {prompt}\nAssistant: {response}"

    def response_span(self, prompt: str, response: str, text: str) -> tuple[int, int]:
        """Where ``response`` sits in ``text`` (its rendering), by rendering the pair with a mark instead of
        the response: a search for the response itself could land in the request or the template."""
        marked = self.render(prompt, _MARK)
        start = marked.find(_MARK)
        if start >= 0 and marked[:start] + response + marked[start + len(_MARK) :] == text:
            return start, start + len(response)
        start = text.rfind(response)  # a template that rewrites the content: its last verbatim copy
        return (start, start + len(response)) if start >= 0 else (len(text), len(text))

    @torch.inference_mode()
    def pair_features(self, pairs: Sequence[tuple[str, str]], batch_size: int = 16) -> NDArray[np.float64]:
        # Every distinct conversation once: a rollout's rows for the different heads carry the same (request,
        # response), and the judge LM's forward is nearly all of the cost: without this, 4 forwards of one text.
        texts = [self.render(p, r) for p, r in pairs]
        spans = {text: self.response_span(p, r, text) for (p, r), text in zip(pairs, texts, strict=True)}
        # first-seen order before the (stable) sort: batches, and so the float sums, are the same in every run
        distinct = sorted(dict.fromkeys(texts), key=len)  # batches of similar length pad little
        width = self.model.config.hidden_size
        out = np.empty((len(distinct), 2 * width), dtype=np.float64)
        for start in range(0, len(distinct), batch_size):
            batch = distinct[start : start + batch_size]
            enc: Any = self.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
                return_offsets_mapping=True,
            )
            offsets = enc.pop("offset_mapping")
            conversation = enc["attention_mask"]
            # a token is the response's if its characters overlap the response's (a merge across the boundary
            # counts); a response cut off by truncation, or empty, averages to zeros
            bounds = torch.tensor([spans[t] for t in batch]).unsqueeze(1)
            answer = (offsets[..., 0] < bounds[..., 1]) & (offsets[..., 1] > bounds[..., 0]) & conversation.bool()
            hidden = self.model(**enc.to(self.device)).last_hidden_state.float()
            for half, mask in enumerate((conversation, answer)):
                weights = mask.to(self.device).unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
                out[start : start + len(batch), half * width : (half + 1) * width] = pooled.cpu().numpy()
        row = {text: i for i, text in enumerate(distinct)}
        return out[[row[t] for t in texts]] if texts else out
