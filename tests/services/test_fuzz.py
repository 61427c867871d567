"""Property-based fuzzing of every decoder and consumer entry point.

Contract under test: whatever bytes arrive, a decoder either returns a valid event or raises one of the
project's own errors (``SchemaError`` / ``IntegrityError`` / ``ConfigError``, all ``RlaifError``), so a service
can dead-letter the record and go on. Anything else (``KeyError``, ``UnicodeDecodeError``, a msgspec error
leaking through, ...) is a bug.

Profiles (registered here, picked with ``HYPOTHESIS_PROFILE``): ``ci`` (default, 300 examples per test) and
``long`` (10 000 examples per test)::

    HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/services/test_fuzz.py
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from schemas import (
    EVENT_TYPES,
    ConfigError,
    Constitution,
    IntegrityError,
    JudgedRollout,
    PolicyChunk,
    PolicyUpdate,
    RlaifError,
    SchemaError,
)
from streams import ChunkAssembler, decode, decode_any, encode, sha256_hex, split_chunks
from tests.factories import make_judged, make_rollout
from tests.schemas.test_events import examples

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile("long", max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ALLOWED = (SchemaError, IntegrityError, ConfigError)

# JSON-ish values: the interesting inputs are *almost* valid events, not only random bytes
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _mutations_of_valid_events() -> st.SearchStrategy[bytes]:
    """Valid events with one field replaced, removed or added; then serialised (NaN/inf as JSON literals)."""
    docs = [json.loads(msgspec.json.encode(e)) for e in examples()]

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        doc: dict[str, Any] = dict(draw(st.sampled_from(docs)))
        action = draw(st.sampled_from(["replace", "delete", "add", "version", "type"]))
        keys = sorted(doc)
        if action == "replace":
            doc[draw(st.sampled_from(keys))] = draw(json_value)
        elif action == "delete":
            doc.pop(draw(st.sampled_from(keys)))
        elif action == "add":
            doc[draw(st.text(max_size=12))] = draw(json_value)
        elif action == "version":
            doc["schema_version"] = draw(st.integers(min_value=-5, max_value=2**64))
        else:
            doc["type"] = draw(st.text(max_size=12) | st.sampled_from([t.__name__ for t in EVENT_TYPES]))
        return json.dumps(doc, allow_nan=True).encode()

    return mutate()


raw_inputs = st.one_of(
    st.binary(max_size=512),
    st.text(max_size=256).map(str.encode),
    json_value.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    _mutations_of_valid_events(),
)


def _only_allowed(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ALLOWED:
        return None


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
@given(data=raw_inputs)
def test_decode_raises_only_schema_errors(event_type: type, data: bytes) -> None:
    _only_allowed(decode, data, event_type)


@given(data=raw_inputs)
def test_decode_any_raises_only_schema_errors(data: bytes) -> None:
    event = _only_allowed(decode_any, data)
    if event is not None:  # whatever decodes must encode and decode back to the same event
        assert decode_any(encode(event)) == event


@given(
    blob=st.binary(max_size=3000),
    chunk_bytes=st.integers(min_value=1, max_value=1024),
    drop=st.integers(min_value=0, max_value=5),
    flip=st.integers(min_value=-1, max_value=3000),
    forged=st.lists(
        st.builds(
            PolicyChunk,
            policy_version=st.integers(min_value=0, max_value=3),
            index=st.integers(min_value=0, max_value=6),
            total=st.integers(min_value=0, max_value=6),
            sha256=st.text(max_size=4),
            data=st.binary(max_size=16),
        ),
        max_size=3,
    ),
)
def test_chunk_assembler_verifies_or_raises_integrity_error(
    blob: bytes, chunk_bytes: int, drop: int, flip: int, forged: list[PolicyChunk]
) -> None:
    chunks = split_chunks(blob, 1, chunk_bytes=chunk_bytes)
    update = PolicyUpdate(
        policy_version=1,
        learner_step=1,
        base_model="m",
        kind="full",
        sha256=sha256_hex(blob),
        size_bytes=len(blob),
        n_chunks=len(chunks),
    )
    # corrupt one byte of one chunk (when ``flip`` lands inside the blob), drop some, add forged ones
    if 0 <= flip < len(blob):
        i, j = divmod(flip, chunk_bytes)
        data = bytearray(chunks[i].data)
        data[j] ^= 0xFF
        chunks[i] = PolicyChunk(policy_version=1, index=i, total=len(chunks), sha256=update.sha256, data=bytes(data))
    fed = chunks[drop:] + forged
    assembler = ChunkAssembler(update)
    result = None
    for chunk in fed:
        try:
            out = assembler.feed(chunk)
        except IntegrityError:
            return
        result = out if out is not None else result
    if result is not None:  # anything the assembler hands out is exactly what was announced
        assert sha256_hex(result) == update.sha256 and len(result) == update.size_bytes


@dataclass
class _TinyWeights:
    model: torch.nn.Module
    valid: bytes


@pytest.fixture(scope="module")
def tiny_weights() -> _TinyWeights:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    return _TinyWeights(model, st_save({k: v.contiguous() for k, v in model.state_dict().items()}))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    noise=st.binary(max_size=400),
    cut=st.integers(min_value=0, max_value=10_000),
    flip=st.integers(min_value=0, max_value=10_000),
    mode=st.sampled_from(["random", "truncate", "flip", "header"]),
)
def test_load_weights_blob_rejects_garbage(
    tiny_weights: _TinyWeights, noise: bytes, cut: int, flip: int, mode: str
) -> None:
    from services._policy import load_weights_blob

    valid = tiny_weights.valid
    if mode == "random":
        blob = noise
    elif mode == "truncate":
        blob = valid[: cut % max(1, len(valid))]
    elif mode == "flip":
        data = bytearray(valid)
        data[flip % len(data)] ^= 0xFF
        blob = bytes(data)
    else:  # a plausible header length followed by noise
        blob = len(noise).to_bytes(8, "little") + noise
    try:
        tensors = load_weights_blob(blob, tiny_weights.model, lora=False)
    except IntegrityError:
        return
    # a flipped byte inside tensor data can still be a valid file: then it must match the model's layout
    assert set(tensors) == set(tiny_weights.model.state_dict())


principle_doc = st.fixed_dictionaries(
    {"id": st.text(max_size=8), "text": st.text(max_size=8)},
    optional={
        "weight": st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=3),
        "scorer": st.sampled_from(["llm", "classifier", "regex", ""]),
        "classifier": st.none() | st.text(max_size=5),
        "question": st.text(max_size=10),
        "template": st.text(max_size=10),
        "extra": json_value,
    },
)


@given(
    doc=st.fixed_dictionaries(
        {},
        optional={
            "id": json_value | st.text(max_size=8),
            "version": json_value | st.integers(),
            "principles": st.lists(principle_doc, max_size=4) | json_value,
            "description": json_value,
            "unknown": json_value,
        },
    )
)
def test_constitution_from_mapping_raises_only_config_error(doc: dict[str, Any]) -> None:
    _only_allowed(Constitution.from_mapping, doc)


# ---- consumer entry points: the learner's intake and a DeadLetterSink-backed handler -------------------


@dataclass(frozen=True)
class FakeRecord:
    """A stand-in for an aiokafka ConsumerRecord (named as a fake: only the fields the handlers read)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class _CollectingPublisher:
    """Records what a DeadLetterSink would publish (a fake publisher: no broker in a fuzz loop)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Any]] = []

    async def send(self, topic: str, event: Any, key: Any = None) -> None:
        self.sent.append((topic, event, key))


def _valid_judged(i: int) -> bytes:
    return encode(make_judged(make_rollout(rollout_id=f"r{i}", group_id=f"g{i // 2}"), {"a": 0.5}))


@pytest.fixture(scope="module")
def learner(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from services._learner import Learner
    from services._settings import Settings
    from streams import DeadLetterSink

    cache = Path(__file__).resolve().parents[2] / ".cache" / "rlaif"
    s = Settings(profile="tiny", run_dir=tmp_path_factory.mktemp("fuzz-learner"), cache_dir=cache, partitions=1)
    lrn = Learner(s)
    lrn.dlq = DeadLetterSink(_CollectingPublisher(), "dlq", service="learner")  # type: ignore[arg-type]
    return lrn


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(values=st.lists(raw_inputs | st.integers(min_value=0, max_value=20).map(_valid_judged), max_size=6))
def test_learner_intake_never_raises_and_dead_letters_bad_records(learner: Any, values: list[bytes]) -> None:
    sink = learner.dlq
    before_dl, before_sent = learner.state.counters["dead_lettered"], len(sink._publisher.sent)
    bad = 0
    for i, value in enumerate(values):
        try:
            decode(value, JudgedRollout)
        except SchemaError:
            bad += 1
        record = FakeRecord("rewards", 0, i, b"k", value)
        asyncio.run(learner.intake(record))
    assert learner.state.counters["dead_lettered"] - before_dl == bad
    letters = sink._publisher.sent[before_sent:]
    assert len(letters) == bad
    assert all(letter.payload in values for _, letter, _ in letters)  # the raw bytes travel with the reason
    learner.state.pending.clear()  # keep the fixture small across examples


@given(value=raw_inputs | st.none())
def test_dead_letter_sink_handler_raises_nothing_else(value: bytes | None) -> None:
    """The pattern every consumer uses: decode, and on an RlaifError publish a DeadLetter with the payload."""
    from schemas import Rollout
    from streams import DeadLetterSink

    pub = _CollectingPublisher()
    sink = DeadLetterSink(pub, "dlq", service="fuzz")  # type: ignore[arg-type]

    async def handle(record: FakeRecord) -> None:
        try:
            decode(record.value, Rollout)
        except RlaifError as exc:
            await sink.send(record, exc)

    asyncio.run(handle(FakeRecord("rollouts", 0, 7, None, value)))
    for _, letter, _ in pub.sent:
        assert letter.payload == (value or b"") and letter.error_type in {"SchemaError", "UnknownSchemaVersion"}
        assert decode_any(encode(letter)) == letter  # a DeadLetter always round-trips, whatever it carries
