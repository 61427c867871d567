"""Triton: the embedded server and the scoring models it (and the production model repository) serves."""

from services.triton._scorers import LlmJudge, left_padded_positions
from services.triton._server import JUDGE_MODEL, TOXICITY_MODEL, serve

__all__ = ["JUDGE_MODEL", "TOXICITY_MODEL", "LlmJudge", "left_padded_positions", "serve"]
