"""Triton Python-backend model ``toxicity``: a thin wrapper around ``services.triton._toxicity``.

``ToxicityClassifier.p_toxic`` is the function the embedded PyTriton server serves
(``services/triton/_server.py``); this file only adapts Triton's request and response objects and puts the
network on the device of its instance group. Requires the ``rlaif`` project and
``toxic-comment-classifier==0.3.0`` (installed ``--no-deps``) to be importable by the Python-backend stub.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

INPUT = "text"
OUTPUT = "p_toxic"


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
        from services.triton._toxicity import ToxicityClassifier

        config = json.loads(args["model_config"])
        model_dir = str(config.get("parameters", {}).get("MODEL_DIR", {}).get("string_value", "")).strip()
        torch.set_num_threads(Settings().torch_threads)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.classifier = ToxicityClassifier(model_dir or None, device=device)

    def execute(self, requests: list[Any]) -> list[Any]:
        texts: list[str] = []
        spans: list[tuple[int, int] | str] = []
        for request in requests:
            try:
                rows = decode_rows(pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy())
            except Exception as exc:
                spans.append(f"toxicity: bad input: {type(exc).__name__}: {exc}")
                continue
            spans.append((len(texts), len(texts) + len(rows)))
            texts.extend(rows)
        try:
            scores = np.asarray(self.classifier.p_toxic(texts), dtype=np.float32).reshape(-1, 1)
        except Exception as exc:  # never a default score: the judge service retries, then dead-letters
            message = f"toxicity: {type(exc).__name__}: {exc}"
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
        self.classifier = None
