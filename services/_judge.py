"""The judge scorer: a faust agent that reads rollouts, scores them through Triton, publishes rewards.

Idempotent per (rollout id, constitution hash) within a worker; across restarts, at-least-once delivery may
judge a rollout twice and the learner's ledger drops the duplicate. A rollout that cannot be decoded or
scored is dead-lettered with the reason — never given a default reward.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

import structlog

from schemas import JudgeError, Rollout, SchemaError
from services import _metrics as metrics
from services._data import load_constitution
from services._proc import default_service_id, free_port
from services._settings import Settings
from streams import DeadLetterSink, Publisher, decode, ensure_topics, make_app

log = structlog.get_logger(__name__)


class _SeenSet:
    """A bounded set of recently judged keys (oldest evicted first)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, key: str) -> bool:
        """True if the key is new."""
        if key in self._items:
            return False
        self._items[key] = None
        if len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return True


def build_app(settings: Settings) -> Any:
    from services._judge_client import TritonJudge

    topics = settings.topics
    constitution = load_constitution(settings.constitution)
    judge_id = settings.service_id or default_service_id("judge")
    app = make_app("rlaif-judges", settings.kafka, web_port=free_port(), datadir=settings.run_dir / "faust" / judge_id)
    rollouts = app.topic(topics.rollouts, value_type=bytes, key_type=bytes)
    scorer = TritonJudge.from_settings(settings, constitution)
    publisher = Publisher(settings.kafka)
    dlq = DeadLetterSink(publisher, topics.dead_letters, service=judge_id, on_dead_letter=metrics.count_dead_letter)
    seen = _SeenSet()
    ready_lock = asyncio.Lock()

    async def ensure_ready() -> None:
        # faust starts agents inside its own loop; clients bound to that loop are created on first use
        async with ready_lock:
            if publisher.started:
                return
            await ensure_topics(settings.kafka, topics.specs())
            await publisher.start()
            metrics.serve_metrics(settings.metrics_port, settings.metrics_host)
            log.info(
                "judge_started",
                judge_id=judge_id,
                constitution=constitution.constitution_id,
                triton=settings.triton_url,
            )

    @app.agent(rollouts, concurrency=settings.judge_concurrency)
    async def judge_rollouts(stream: Any) -> None:
        async for event in stream.events():
            await ensure_ready()
            record = event.message
            bound = log.bind(topic=record.topic, partition=record.partition, offset=record.offset)
            try:
                rollout = decode(record.value, Rollout)
            except SchemaError as exc:
                await dlq.send(record, exc)
                continue
            if not seen.add(f"{rollout.rollout_id}:{constitution.constitution_id}"):
                bound.info("duplicate_rollout_skipped", rollout_id=rollout.rollout_id)
                continue
            metrics.EVENTS_IN.labels("judge", record.topic).inc()
            try:
                judged = await scorer.judge(rollout, judge_id)
            except JudgeError as exc:
                metrics.JUDGE_FAILURES.labels(judge_id).inc()
                await dlq.send(record, exc)
                continue
            await publisher.send(topics.rewards, judged, key=rollout.group_id)
            metrics.EVENTS_OUT.labels("judge", topics.rewards).inc()
            metrics.JUDGE_LATENCY.labels(judge_id).observe(judged.judge_latency_s)
            for pid, score in judged.scores.items():
                metrics.REWARD.labels(pid).observe(score)
            metrics.REWARD.labels("total").observe(judged.reward)
            bound.debug("judged", rollout_id=rollout.rollout_id, reward=round(judged.reward, 4))

    return app


def run(settings: Settings) -> None:
    from faust import Worker

    app = build_app(settings)
    worker = Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False, override_logging=False)
    worker.execute_from_commandline()
