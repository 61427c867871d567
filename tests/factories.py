"""Event builders shared by the tests: one valid Rollout / JudgedRollout, overridden field by field."""

from __future__ import annotations

from typing import Any

from schemas import JudgedRollout, Rollout, SamplingParams


def make_rollout(**overrides: Any) -> Rollout:
    fields: dict[str, Any] = {
        "rollout_id": "r1",
        "group_id": "g1",
        "group_size": 2,
        "prompt_id": "p1",
        "prompt": "Hi?",
        "completion": "Hello.",
        "prompt_token_ids": [1, 2],
        "completion_token_ids": [3, 4],
        "behaviour_logprobs": [-0.5, -1.0],
        "policy_version": 0,
        "generator_id": "gen-0",
        "sampling": SamplingParams(seed=7),
    }
    fields.update(overrides)
    return Rollout(**fields)


def make_judged(
    rollout: Rollout | None = None, scores: dict[str, float] | None = None, **overrides: Any
) -> JudgedRollout:
    """A judged rollout whose reward is the plain mean of ``scores`` unless ``reward`` is given."""
    scores = {"helpful": 0.5} if scores is None else scores
    fields: dict[str, Any] = {
        "rollout": rollout if rollout is not None else make_rollout(),
        "constitution_id": "c",
        "constitution_version": 1,
        "judge_model": "m",
        "scores": scores,
        "reward": sum(scores.values()) / len(scores),
        "judge_latency_s": 0.0,
        "judge_id": "j",
    }
    fields.update(overrides)
    return JudgedRollout(**fields)
