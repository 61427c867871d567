"""aiokafka producers, consumers and admin helpers that work the same on Tansu and Apache Kafka.

Nothing here relies on transactions, idempotent producers or ``end_offsets()``: Tansu lacks the first two and
under-reports the third. Delivery is at-least-once; consumers dedupe by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import stamina
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError

from schemas import Event, TransportError
from streams._codec import encode
from streams._config import KafkaConfig
from streams._topics import TopicSpec

log = structlog.get_logger(__name__)


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop a consumer, even one stopped moments after it started.

    aiokafka cancels its coordinator's internal task on ``stop()``; when that task has not run yet the
    ``CancelledError`` escapes ``stop()`` itself (seen when a restarted learner found its work already done and
    stopped at once: it exited non-zero and the supervisor restarted it forever). Only a cancellation aimed at
    *our* task is re-raised.
    """
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        log.debug("consumer_stop_absorbed_internal_cancel")


def make_producer(cfg: KafkaConfig, **overrides: Any) -> AIOKafkaProducer:
    kwargs: dict[str, Any] = {
        **cfg.client_kwargs(),
        "acks": "all",
        "linger_ms": 5,
        "max_request_size": cfg.max_request_size,
        "enable_idempotence": False,  # InitProducerId is unsupported by Tansu; dedupe downstream instead
    }
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


def make_consumer(cfg: KafkaConfig, *topics: str, group_id: str | None, **overrides: Any) -> AIOKafkaConsumer:
    kwargs: dict[str, Any] = {
        **cfg.client_kwargs(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        "max_partition_fetch_bytes": cfg.max_request_size,
        "fetch_max_bytes": max(cfg.max_request_size, 52_428_800),
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(*topics, **kwargs)


async def wait_for_broker(cfg: KafkaConfig, timeout_s: float = 30.0) -> None:
    """Block until the cluster answers a metadata request."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        admin = AIOKafkaAdminClient(**cfg.client_kwargs())
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaError, OSError) as exc:
            last = exc
            await asyncio.sleep(0.2)
        finally:
            await admin.close()
    raise TransportError(f"Kafka at {cfg.bootstrap_servers} did not answer within {timeout_s}s: {last}")


@stamina.retry(on=(KafkaConnectionError, OSError), attempts=10, timeout=60)
async def ensure_topics(cfg: KafkaConfig, specs: Iterable[TopicSpec]) -> None:
    """Create missing topics; existing ones are left as they are (idempotent)."""
    admin = AIOKafkaAdminClient(**cfg.client_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(s.name, num_partitions=s.partitions, replication_factor=cfg.replication_factor)
            for s in specs
            if s.name not in existing
        ]
        for topic in missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # another process won the race
                await admin.create_topics([topic])
    finally:
        await admin.close()


class Publisher:
    """A producer that sends events; every send waits for the broker's ack (at-least-once)."""

    def __init__(self, cfg: KafkaConfig, **overrides: Any) -> None:
        self._cfg, self._overrides = cfg, overrides
        self._producer_or_none: AIOKafkaProducer | None = None

    @property
    def _producer(self) -> AIOKafkaProducer:
        if self._producer_or_none is None:
            raise RuntimeError("Publisher.start() was not awaited")
        return self._producer_or_none

    @property
    def started(self) -> bool:
        return self._producer_or_none is not None

    async def start(self) -> None:
        # aiokafka binds to the running loop, so the producer is created here rather than in __init__
        self._producer_or_none = make_producer(self._cfg, **self._overrides)
        await self._producer_or_none.start()

    async def stop(self) -> None:
        if self._producer_or_none is not None:
            await self._producer_or_none.stop()
            self._producer_or_none = None

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def send(
        self,
        topic: str,
        event: Event,
        key: str | bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any:
        return await self.send_raw(topic, encode(event), key, headers)

    async def send_raw(
        self,
        topic: str,
        value: bytes,
        key: str | bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> Any:
        key_bytes = key.encode() if isinstance(key, str) else key
        try:
            return await self._producer.send_and_wait(
                topic, value, key=key_bytes, headers=list(headers) if headers else None
            )
        except KafkaError as exc:
            raise TransportError(f"send to {topic} failed: {exc}") from exc

    async def send_many(self, topic: str, events: Sequence[tuple[str | None, Event]]) -> None:
        """Send a batch and wait for every ack (batched on the wire, unlike repeated send())."""
        futures = []
        for key, event in events:
            futures.append(await self._producer.send(topic, encode(event), key=key.encode() if key else None))
        try:
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise TransportError(f"batch send to {topic} failed: {exc}") from exc

    async def flush(self) -> None:
        await self._producer.flush()


async def read_from_start(
    cfg: KafkaConfig,
    topics: Sequence[str],
    *,
    stop_at_end: bool = False,
    idle_timeout_s: float = 2.0,
    start_offsets: dict[TopicPartition, int] | None = None,
    fetch_max_wait_ms: int = 50,
) -> AsyncIterator[ConsumerRecord[bytes, bytes]]:
    """Read topics from the beginning without a consumer group (every reader sees every record).

    With ``stop_at_end`` the iterator ends once each partition's position has reached the high watermark
    that Fetch reported (not ``end_offsets()``, which Tansu under-reports), or nothing arrives for
    ``idle_timeout_s``.
    """
    # A short fetch wait: Tansu does not always answer a parked fetch when records arrive, so a reader
    # could otherwise sit out the whole default 500 ms (measured: weight pushes 20-336 ms vs 31-52 ms).
    consumer = make_consumer(cfg, group_id=None, fetch_max_wait_ms=fetch_max_wait_ms)
    await consumer.start()
    try:
        partitions: list[TopicPartition] = []
        for topic in topics:
            for _ in range(50):
                parts = consumer.partitions_for_topic(topic)
                if parts:
                    break
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.1)
            partitions += [TopicPartition(topic, p) for p in sorted(parts or ())]
        consumer.assign(partitions)
        for tp in partitions:
            offset = (start_offsets or {}).get(tp)
            if offset is None:
                await consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, offset)
        last_data = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for records in batches.values():
                for record in records:
                    yield record
            if batches:
                last_data = time.monotonic()
            if stop_at_end:
                caught_up = True
                for tp in partitions:
                    hw = consumer.highwater(tp)
                    if hw is None or await consumer.position(tp) < hw:
                        caught_up = False
                if caught_up or time.monotonic() - last_data > idle_timeout_s:
                    return
    finally:
        await stop_consumer(consumer)
