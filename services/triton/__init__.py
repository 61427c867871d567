"""Triton: the embedded server and the scoring models it (and the production model repository) serves.

The scorers import only numpy, torch and transformers; the server (PyTriton, settings, logging) loads on first
use, so a scorer can run where the rest of the project is not installed (an accelerator box, Triton's
Python-backend stub).
"""

from typing import Any

from services.triton._scorers import LlmJudge, left_padded_positions

__all__ = ["JUDGE_MODEL", "TOXICITY_MODEL", "LlmJudge", "left_padded_positions", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("JUDGE_MODEL", "TOXICITY_MODEL", "serve"):
        from services.triton import _server

        return getattr(_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
