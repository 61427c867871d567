"""Event contracts: the records every topic carries.

Events are msgspec structs encoded as JSON, so any Kafka client in any language can read the topics (the JSON
Schema of each event is exported under ``schemas/json``). Compatibility rules: a new field must have a default,
so old events still decode; a consumer rejects events whose ``schema_version`` is newer than it understands
(:class:`~schemas.UnknownSchemaVersion`) rather than guessing.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Literal

import msgspec

SCHEMA_VERSION = 1

Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


def new_id() -> str:
    """A random, unique event id (hex uuid4)."""
    return uuid.uuid4().hex


class Event(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    """Fields every event carries."""

    schema_version: int = SCHEMA_VERSION
    event_id: str = msgspec.field(default_factory=new_id)
    created_at: float = msgspec.field(default_factory=time.time)


class PromptTask(Event, tag="prompt", frozen=True):
    """A prompt for the generators to answer."""

    prompt_id: str
    text: str
    split: Literal["train", "eval"] = "train"
    source: str = "unknown"
    # eval prompts are answered greedily by one generator and tagged with the round they belong to
    eval_round: int | None = None


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int | None = None  # torch seed of the generate() call; rows of one batch (several groups) share it
    greedy: bool = False


class Rollout(Event, tag="rollout", frozen=True):
    """One sampled completion. ``group_size`` completions of the same prompt share ``group_id``."""

    rollout_id: str
    group_id: str
    group_size: int
    prompt_id: str
    prompt: str
    completion: str
    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    # log π_behaviour(token) of each completion token under the sampling distribution (temperature applied)
    behaviour_logprobs: list[float]
    policy_version: NonNegInt
    generator_id: str
    sampling: SamplingParams
    split: Literal["train", "eval"] = "train"
    eval_round: int | None = None

    def __post_init__(self) -> None:
        if len(self.completion_token_ids) != len(self.behaviour_logprobs):
            raise ValueError("completion_token_ids and behaviour_logprobs differ in length")
        if any(not math.isfinite(lp) or lp > 1e-4 for lp in self.behaviour_logprobs):
            raise ValueError("behaviour_logprobs must be finite log-probabilities (<= 0)")
        if self.group_size < 1:
            raise ValueError("group_size must be >= 1")


class JudgedRollout(Event, tag="judged", frozen=True):
    """A rollout with the judge's verdict on every principle of a constitution."""

    rollout: Rollout
    constitution_id: str
    constitution_version: int
    judge_model: str
    scores: dict[str, Probability]
    reward: Probability
    judge_latency_s: float
    judge_id: str

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError("a judged rollout needs at least one principle score")


class PolicyUpdate(Event, tag="policy_update", frozen=True):
    """Announces weights for ``policy_version``; the bytes follow as PolicyChunk events or sit at ``uri``."""

    policy_version: NonNegInt
    learner_step: NonNegInt
    base_model: str
    kind: Literal["full", "lora"]
    sha256: str
    size_bytes: NonNegInt
    n_chunks: NonNegInt
    uri: str | None = None
    metrics: dict[str, float] = msgspec.field(default_factory=dict)


class PolicyChunk(Event, tag="policy_chunk", frozen=True):
    """One slice of a safetensors file; chunks of a version are published in order on one partition."""

    policy_version: NonNegInt
    index: NonNegInt
    total: NonNegInt
    sha256: str
    data: bytes


class LearnerStep(Event, tag="learner_step", frozen=True):
    """What one optimizer step consumed and measured (the lineage of every policy version)."""

    step: NonNegInt
    policy_version: NonNegInt  # the version these weights will be published as (step // push_every ...)
    rollout_ids: list[str]
    rollout_versions: list[int]
    reward_mean: float
    metrics: dict[str, float]


class EvalResult(Event, tag="eval_result", frozen=True):
    """Held-out evaluation of one policy version (greedy answers, same judge)."""

    policy_version: NonNegInt
    eval_round: NonNegInt
    n: NonNegInt
    reward_mean: float
    by_principle: dict[str, float]
    constitution_id: str
    # each eval prompt's reward, so two rounds can be compared prompt by prompt (a paired difference leaves the
    # prompts' differences in difficulty out of the comparison); empty in events written before it existed
    reward_by_prompt: dict[str, float] = msgspec.field(default_factory=dict)


class DeadLetter(Event, tag="dead_letter", frozen=True):
    """A record a service could not process, with why, and the bytes exactly as they arrived."""

    source_topic: str
    partition: int
    offset: int
    key: bytes | None
    error_type: str
    message: str
    payload: bytes
    service: str
    retriable: bool = False


AnyEvent = PromptTask | Rollout | JudgedRollout | PolicyUpdate | PolicyChunk | LearnerStep | EvalResult | DeadLetter
EVENT_TYPES: tuple[type[Event], ...] = (
    PromptTask,
    Rollout,
    JudgedRollout,
    PolicyUpdate,
    PolicyChunk,
    LearnerStep,
    EvalResult,
    DeadLetter,
)
