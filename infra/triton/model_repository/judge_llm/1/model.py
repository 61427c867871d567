"""Triton Python-backend model ``judge_llm``: a thin wrapper around ``services.triton._scorers.LlmJudge``.

The scoring code (prompt rendering, left padding, yes/no normalisation) is the one the embedded PyTriton
server serves (``services/triton/_server.py``); this file only adapts Triton's request and response objects
and puts the model on the device of its instance group. Requires the ``rlaif`` project to be importable by
the Python-backend stub (see ``infra/docker/Dockerfile.triton``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import triton_python_backend_utils as pb_utils

INPUT = "text"
OUTPUT = "p_yes"
MODEL_DIR_ENV = "RLAIF_JUDGE_MODEL_DIR"


def _model_dir(config: dict[str, Any]) -> str:
    value = str(config.get("parameters", {}).get("MODEL_DIR", {}).get("string_value", "")).strip()
    if value:
        return value
    if os.environ.get(MODEL_DIR_ENV):
        return os.environ[MODEL_DIR_ENV]
    # Same model, same cache as the embedded mode: RLAIF_PROFILE / RLAIF_JUDGE_MODEL / RLAIF_CACHE_DIR.
    from services._models import prepare_model
    from services._settings import Settings

    settings = Settings()
    return str(prepare_model(settings.judge_model, settings.cache_dir))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import torch

        from services._settings import Settings
        from services.triton._scorers import LlmJudge

        config = json.loads(args["model_config"])
        settings = Settings()
        torch.set_num_threads(settings.torch_threads)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        # LlmJudge builds inputs on the CPU and moves them to the model's device; only last-position logits
        # come back to the host
        self.judge = LlmJudge.from_pretrained(
            _model_dir(config),
            render_mode=settings.judge_render,
            device=device,
            share_prefixes=settings.judge_share_prefixes,
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        from services.triton._backend import execute

        return execute(pb_utils, requests, self.judge.score, model="judge_llm", output=OUTPUT, input_name=INPUT)

    def finalize(self) -> None:
        self.judge = None
