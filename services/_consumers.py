"""Pluggable analytics consumers: anything registered under the ``rlaif.consumers`` entry-point group.

A consumer is built by calling its entry point with the :class:`Settings` and must have
``async def handle(record)``; ``async def start()`` / ``async def stop()`` are optional, and so are
``topics`` (default: every project topic) and ``start_offsets()`` (default: the beginning of every partition).
One shared loop (:func:`run_consumer`) feeds it every record of its topics through :func:`read_from_start` —
no consumer group, so each consumer sees every record, and a third-party package only needs::

    [project.entry-points."rlaif.consumers"]
    my-counter = "my_package:MyCounter"

The built-ins (``archive``, ``metrics``) are also known without their entry points, so a checkout whose
package metadata predates them still finds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import structlog
from aiokafka import ConsumerRecord, TopicPartition
from prometheus_client import Counter, Histogram

from schemas import ConfigError, JudgedRollout, SchemaError
from services._settings import Settings
from streams import decode_any, ensure_topics, read_from_start

log = structlog.get_logger(__name__)

GROUP = "rlaif.consumers"
BUILTINS: dict[str, str] = {
    "archive": "services._archive:ArchiveConsumer",
    "metrics": "services._consumers:MetricsConsumer",
}


@runtime_checkable
class Consumer(Protocol):
    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None: ...


ConsumerFactory = Callable[[Settings], Consumer]


def _load_target(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def available() -> dict[str, str]:
    """Name -> ``module:attr`` of every consumer: built-ins, then installed entry points (which win)."""
    found = dict(BUILTINS)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return found


def load(name: str) -> ConsumerFactory:
    """The factory registered as ``name``."""
    for ep in entry_points(group=GROUP):
        if ep.name == name:
            factory: ConsumerFactory = ep.load()
            return factory
    if name in BUILTINS:
        builtin: ConsumerFactory = _load_target(BUILTINS[name])
        return builtin
    raise ConfigError(f"no consumer named {name!r}; known: {', '.join(sorted(available()))}")


async def run_consumer(
    consumer: Consumer,
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    stop_at_end: bool = False,
    idle_timeout_s: float = 2.0,
) -> int:
    """Feed ``consumer`` every record of its topics until ``stop`` is set (or the end, with ``stop_at_end``).

    Returns how many records were handed to it. ``stop()`` is awaited even when ``handle`` raises.
    """
    topics: Sequence[str] = getattr(consumer, "topics", None) or settings.topics.all_names()
    await ensure_topics(settings.kafka, settings.topics.specs())
    start = getattr(consumer, "start", None)
    if start is not None:
        await start()
    offsets_fn = getattr(consumer, "start_offsets", None)
    start_offsets: Mapping[TopicPartition, int] | None = offsets_fn() if offsets_fn is not None else None
    handled = 0

    async def feed() -> None:
        nonlocal handled
        async for record in read_from_start(
            settings.kafka,
            list(topics),
            stop_at_end=stop_at_end,
            idle_timeout_s=idle_timeout_s,
            start_offsets=dict(start_offsets) if start_offsets else None,
            fetch_max_wait_ms=settings.observer_fetch_wait_ms,
        ):
            await consumer.handle(record)
            handled += 1

    task = asyncio.create_task(feed())
    waiter = asyncio.create_task((stop or asyncio.Event()).wait())
    try:
        # read_from_start only yields when records arrive, so stopping means cancelling the reader
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
    finally:
        for t in (task, waiter):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        stop_fn = getattr(consumer, "stop", None)
        if stop_fn is not None:
            await stop_fn()
    log.info("consumer_stopped", consumer=type(consumer).__name__, handled=handled)
    return handled


# ---- the metrics consumer -------------------------------------------------------------------------------
TOPIC_EVENTS = Counter("rlaif_topic_events_total", "Records seen on the topics, by event type", ["topic", "type"])
TOPIC_REWARD = Histogram(
    "rlaif_topic_reward",
    "Judged scores seen on the rewards topics, per principle ('reward' = the aggregate)",
    ["principle"],
    buckets=tuple(i / 10 for i in range(11)),
)


class MetricsConsumer:
    """A Prometheus exporter of what flows through the topics (counts per topic/type, reward per principle).

    It reads the topics rather than instrumenting the services, so it also sees what other languages'
    producers wrote. ``RLAIF_METRICS_PORT`` picks the port (unset or 0: a free port, logged).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int | None = None
        self.counts: dict[tuple[str, str], int] = {}

    async def start(self) -> None:
        from services._metrics import serve_metrics

        # RLAIF_METRICS_PORT is a Settings field in newer checkouts; the variable works either way
        port = getattr(self.settings, "metrics_port", None) or os.environ.get("RLAIF_METRICS_PORT") or 0
        self.port = serve_metrics(int(port))
        log.info("metrics_consumer_serving", port=self.port)

    async def handle(self, record: ConsumerRecord[bytes, bytes]) -> None:
        try:
            event = decode_any(record.value)
            kind = type(event).__name__
        except SchemaError:
            event, kind = None, "invalid"
        TOPIC_EVENTS.labels(record.topic, kind).inc()
        self.counts[record.topic, kind] = self.counts.get((record.topic, kind), 0) + 1
        if isinstance(event, JudgedRollout):
            for principle, score in event.scores.items():
                TOPIC_REWARD.labels(principle).observe(score)
            TOPIC_REWARD.labels("reward").observe(event.reward)
