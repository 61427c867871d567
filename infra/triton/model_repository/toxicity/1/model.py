"""Triton Python-backend model ``toxicity``: a thin wrapper around ``services.triton._toxicity``.

``ToxicityClassifier.p_toxic`` is the function the embedded PyTriton server serves
(``services/triton/_server.py``); this file only adapts Triton's request and response objects and puts the
network on the device of its instance group. Requires the ``rlaif`` project and
``toxic-comment-classifier==0.3.0`` (installed ``--no-deps``) to be importable by the Python-backend stub.
"""

from __future__ import annotations

import json
from typing import Any

import triton_python_backend_utils as pb_utils

INPUT = "text"
OUTPUT = "p_toxic"


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
        from services.triton._backend import execute

        return execute(pb_utils, requests, self.classifier.p_toxic, model="toxicity", output=OUTPUT, input_name=INPUT)

    def finalize(self) -> None:
        self.classifier = None
