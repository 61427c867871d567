from __future__ import annotations

import json
import math

import msgspec
import pytest

from schemas import (
    SCHEMA_VERSION,
    DeadLetter,
    EvalResult,
    JudgedRollout,
    LearnerStep,
    PolicyChunk,
    PolicyUpdate,
    PromptTask,
    Rollout,
    SchemaError,
    UnknownSchemaVersion,
)
from streams import decode, decode_any, encode
from tests.factories import make_judged, make_rollout


def sample_judged_rollouts(n: int) -> list[JudgedRollout]:
    """Judged rollouts with non-ASCII text and a spread of scores, for readers outside Python."""
    return [
        make_judged(
            make_rollout(rollout_id=f"r{i}", completion=f"answer {i} — ünïcode"),
            {"harmless": i / max(1, n), "honest": 1.0},
            reward=i / max(1, n),
            judge_latency_s=0.01,
        )
        for i in range(n)
    ]


def examples() -> list[msgspec.Struct]:
    rollout = make_rollout()
    return [
        PromptTask(prompt_id="p1", text="Hi?"),
        rollout,
        make_judged(
            rollout,
            {"harmless": 0.9},
            constitution_id="abc",
            judge_latency_s=0.01,
        ),
        PolicyUpdate(
            policy_version=1,
            learner_step=1,
            base_model="m",
            kind="lora",
            sha256="0" * 64,
            size_bytes=3,
            n_chunks=1,
        ),
        PolicyChunk(policy_version=1, index=0, total=1, sha256="0" * 64, data=b"\x00\xff\x01"),
        LearnerStep(
            step=1,
            policy_version=0,
            rollout_ids=["r1"],
            rollout_versions=[0],
            reward_mean=0.5,
            metrics={"kl": 0.0},
        ),
        EvalResult(
            policy_version=1,
            eval_round=0,
            n=2,
            reward_mean=0.5,
            by_principle={"a": 0.5},
            constitution_id="abc",
        ),
        DeadLetter(
            source_topic="t",
            partition=0,
            offset=5,
            key=None,
            error_type="SchemaError",
            message="bad",
            payload=b"\xff",
            service="judge",
        ),
    ]


@pytest.mark.parametrize("event", examples(), ids=lambda e: type(e).__name__)
def test_round_trip(event: msgspec.Struct) -> None:
    data = encode(event)  # type: ignore[arg-type]
    assert decode(data, type(event)) == event  # type: ignore[type-var]
    assert decode_any(data) == event
    assert json.loads(data)["schema_version"] == SCHEMA_VERSION


def test_old_events_without_new_optional_fields_still_decode() -> None:
    raw = json.loads(encode(make_rollout()))
    for optional in ("split", "eval_round", "event_id", "created_at", "schema_version"):
        raw.pop(optional)
    event = decode(json.dumps(raw).encode(), Rollout)
    assert event.split == "train" and event.eval_round is None


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = json.loads(encode(make_rollout()))
    raw["added_later"] = {"x": 1}
    assert decode(json.dumps(raw).encode(), Rollout).rollout_id == "r1"


def test_newer_schema_version_is_rejected() -> None:
    raw = json.loads(encode(make_rollout()))
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(UnknownSchemaVersion):
        decode(json.dumps(raw).encode(), Rollout)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xff\xfe", b"[]", b"{}", b'{"type": "rollout"}', None],
)
def test_malformed_payloads_raise_schema_error(payload: bytes | None) -> None:
    with pytest.raises(SchemaError):
        decode(payload, Rollout)


def test_invalid_values_are_rejected() -> None:
    judged = json.loads(encode(examples()[2]))
    judged["scores"]["harmless"] = math.nan
    with pytest.raises(SchemaError):
        decode(json.dumps(judged).encode(), JudgedRollout)
    judged["scores"]["harmless"] = 1.5
    with pytest.raises(SchemaError):
        decode(json.dumps(judged).encode(), JudgedRollout)
    rollout = json.loads(encode(make_rollout()))
    rollout["behaviour_logprobs"] = [-0.5]
    with pytest.raises(SchemaError, match="differ in length"):
        decode(json.dumps(rollout).encode(), Rollout)
