"""``rlaif replay``: a byte-exact range of one topic, from Kafka or from the archive, as JSON lines.

Each line is ``{topic, partition, offset, timestamp_ms, key_b64, value_b64, headers}`` (headers as
``[[key, value_b64], ...]``), sorted by (partition, offset), so the same range read from Kafka and from the
archive gives identical files.

Time filters are exact per record: Kafka is sought coarsely with ``offsets_for_times`` (per batch and by append
time on Tansu, so we ask for a minute earlier than ``--since``) and every record is then compared with its own
timestamp. ``--policy-version`` / ``--rollout-id`` decode the value and match the events that carry them.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiokafka import TopicPartition

from schemas import (
    AnyEvent,
    EvalResult,
    JudgedRollout,
    LearnerStep,
    PolicyChunk,
    PolicyUpdate,
    Rollout,
    SchemaError,
)
from services._archive import RawRecord, archive_root, read_archive
from services._settings import Settings
from streams import KafkaConfig, decode_any, make_consumer, read_from_start, stop_consumer

Source = Literal["kafka", "archive"]
SEEK_MARGIN_MS = 60_000  # offsets_for_times answers per batch by append time: start this much earlier


@dataclass(frozen=True)
class ReplayFilter:
    from_offset: int | None = None
    since_ms: int | None = None  # inclusive
    until_ms: int | None = None  # exclusive
    policy_version: int | None = None
    rollout_id: str | None = None

    def by_position(self, r: RawRecord) -> bool:
        if self.from_offset is not None and r.offset < self.from_offset:
            return False
        if self.since_ms is not None and r.timestamp_ms < self.since_ms:
            return False
        return not (self.until_ms is not None and r.timestamp_ms >= self.until_ms)

    def by_content(self, r: RawRecord) -> bool:
        if self.policy_version is None and self.rollout_id is None:
            return True
        try:
            event = decode_any(r.value)
        except SchemaError:
            return False
        versions, ids = event_versions_and_ids(event)
        if self.policy_version is not None and self.policy_version not in versions:
            return False
        return self.rollout_id is None or self.rollout_id in ids

    def __call__(self, r: RawRecord) -> bool:
        return self.by_position(r) and self.by_content(r)


def event_versions_and_ids(event: AnyEvent) -> tuple[set[int], set[str]]:
    """The policy versions and rollout ids an event is about (what the content filters match)."""
    if isinstance(event, Rollout):
        return {event.policy_version}, {event.rollout_id}
    if isinstance(event, JudgedRollout):
        return {event.rollout.policy_version}, {event.rollout.rollout_id}
    if isinstance(event, LearnerStep):
        # the step trained version ``policy_version`` on these rollouts
        return {event.policy_version}, set(event.rollout_ids)
    if isinstance(event, PolicyUpdate | PolicyChunk | EvalResult):
        return {event.policy_version}, set()
    return set(), set()


async def start_positions(cfg: KafkaConfig, topic: str, flt: ReplayFilter) -> dict[TopicPartition, int]:
    """Where to start reading each partition: ``--from-offset`` and a coarse ``offsets_for_times`` seek."""
    if flt.since_ms is None and flt.from_offset is None:
        return {}
    consumer = make_consumer(cfg, group_id=None)
    await consumer.start()
    try:
        parts: set[int] = set()
        for _ in range(50):  # metadata arrives asynchronously after start()
            parts = consumer.partitions_for_topic(topic) or set()
            if parts:
                break
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        starts = dict.fromkeys(tps, flt.from_offset or 0)
        if flt.since_ms is not None and tps:
            found = await consumer.offsets_for_times({tp: max(0, flt.since_ms - SEEK_MARGIN_MS) for tp in tps})
            # None means no batch that late; we then read that partition from the start rather than trust
            # end offsets, which Tansu under-reports
            for tp, ot in found.items():
                if ot is not None:
                    starts[tp] = max(starts[tp], ot.offset)
        return starts
    finally:
        await stop_consumer(consumer)


async def kafka_records(cfg: KafkaConfig, topic: str, flt: ReplayFilter) -> AsyncIterator[RawRecord]:
    starts = await start_positions(cfg, topic, flt)
    async for record in read_from_start(cfg, [topic], stop_at_end=True, start_offsets=starts or None):
        yield RawRecord.from_kafka(record)


def to_line(r: RawRecord) -> dict[str, Any]:
    def b64(data: bytes | None) -> str | None:
        return None if data is None else base64.b64encode(data).decode("ascii")

    return {
        "topic": r.topic,
        "partition": r.partition,
        "offset": r.offset,
        "timestamp_ms": r.timestamp_ms,
        "key_b64": b64(r.key),
        "value_b64": b64(r.value),
        "headers": [[k, b64(v)] for k, v in r.headers],
    }


def from_line(line: dict[str, Any]) -> RawRecord:
    def unb64(text: str | None) -> bytes | None:
        return None if text is None else base64.b64decode(text)

    return RawRecord(
        topic=line["topic"],
        partition=line["partition"],
        offset=line["offset"],
        timestamp_ms=line["timestamp_ms"],
        key=unb64(line["key_b64"]),
        value=unb64(line["value_b64"]),
        headers=tuple((k, unb64(v) or b"") for k, v in line["headers"]),
    )


async def collect(settings: Settings, topic: str, flt: ReplayFilter, source: Source = "kafka") -> list[RawRecord]:
    """The selected records, deduplicated and in (partition, offset) order."""
    found: dict[tuple[int, int], RawRecord] = {}
    records: Iterable[RawRecord]
    if source == "archive":
        records = read_archive(archive_root(settings), topic)
        found = {(r.partition, r.offset): r for r in records if flt(r)}
    else:
        async for r in kafka_records(settings.kafka, topic, flt):
            if flt(r):
                found[r.partition, r.offset] = r
    return [found[k] for k in sorted(found)]


def write_jsonl(records: Iterable[RawRecord], out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(to_line(r), separators=(",", ":")) + "\n")
            n += 1
    return n


async def replay(settings: Settings, topic: str, flt: ReplayFilter, out: Path, source: Source = "kafka") -> int:
    records = await collect(settings, topic, flt, source)
    return write_jsonl(records, out)
