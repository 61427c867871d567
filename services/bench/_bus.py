"""Bus suite: one rollout-sized event hop through the project's Kafka layer vs raw aiokafka with bytes.

Both sides use the same embedded Tansu broker, one fresh single-partition topic each, the same payload size.
The project side is ``Publisher.send`` / ``send_many`` (msgspec encode, acks=all, linger 5 ms) and
``make_consumer`` + ``streams.decode``; the raw side is ``AIOKafkaProducer`` / ``AIOKafkaConsumer`` with
aiokafka's defaults and pre-encoded bytes (no codec). The ratios are the price of the codecs and settings.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import Rollout
from services._broker import EmbeddedBroker
from services.bench._common import Report, Row, percentile, realistic_rollout
from streams import KafkaConfig, Publisher, TopicSpec, decode, encode, ensure_topics, make_consumer


async def _assigned(consumer: AIOKafkaConsumer, topic: str) -> None:
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)


async def _hop_latencies(
    send: Callable[[int], Awaitable[Any]], consumer: AIOKafkaConsumer, receive: Callable[[bytes], Any], n: int
) -> list[float]:
    """Send one event, wait until the consumer has it (decoded), repeat: the produce->consume hop, in ms."""
    out: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        await send(i)
        record = await consumer.getone()
        receive(record.value or b"")
        out.append((time.perf_counter() - started) * 1000)
    return out


async def _consume_n(consumer: AIOKafkaConsumer, n: int, receive: Callable[[bytes], Any]) -> float:
    started, got = time.perf_counter(), 0
    while got < n:
        batches = await consumer.getmany(timeout_ms=500, max_records=1000)
        for records in batches.values():
            for record in records:
                receive(record.value or b"")
                got += 1
    return time.perf_counter() - started


async def run_bus(report: Report, *, quick: bool, device: str = "cpu") -> None:
    del device  # the bus runs on the CPU whatever the accelerator
    n_latency = 100 if quick else 500
    n_throughput = 2000 if quick else 20000
    rollouts = [realistic_rollout(seq=i) for i in range(max(n_latency, n_throughput))]
    payload_sizes = [len(encode(r)) for r in rollouts[:100]]
    size = round(sum(payload_sizes) / len(payload_sizes))
    raw_payload = b"x" * size
    report.details["event_bytes"] = size
    report.details["n_latency"], report.details["n_throughput"] = n_latency, n_throughput

    with EmbeddedBroker() as broker:
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:8]}.")
        names = {k: f"{cfg.topic_prefix}{k}" for k in ("lat-raw", "lat-proj", "lat-l0", "tp-raw", "tp-proj")}
        await ensure_topics(cfg, [TopicSpec(name, 1) for name in names.values()])

        def decode_rollout(data: bytes) -> Rollout:
            return decode(data, Rollout)

        # ---- hop latency ------------------------------------------------------------------------
        raw_producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        raw_consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
        await raw_producer.start()
        await _assigned(raw_consumer, names["lat-raw"])
        publisher = Publisher(cfg)
        await publisher.start()
        # the same helpers with linger_ms=0 separate the cost of the codec from the cost of batching delay
        publisher_l0 = Publisher(cfg, linger_ms=0)
        await publisher_l0.start()
        consumer = make_consumer(cfg, group_id=None)
        await _assigned(consumer, names["lat-proj"])
        consumer_l0 = make_consumer(cfg, group_id=None)
        await _assigned(consumer_l0, names["lat-l0"])
        try:
            # one warm-up hop each (metadata, connections)
            await raw_producer.send_and_wait(names["lat-raw"], raw_payload)
            await raw_consumer.getone()
            await publisher.send(names["lat-proj"], rollouts[0], key=rollouts[0].group_id)
            await consumer.getone()
            await publisher_l0.send(names["lat-l0"], rollouts[0], key=rollouts[0].group_id)
            await consumer_l0.getone()

            async def raw_send(i: int) -> Any:
                return await raw_producer.send_and_wait(names["lat-raw"], raw_payload)

            async def proj_send(i: int) -> Any:
                r = rollouts[i]
                return await publisher.send(names["lat-proj"], r, key=r.group_id)

            async def l0_send(i: int) -> Any:
                r = rollouts[i]
                return await publisher_l0.send(names["lat-l0"], r, key=r.group_id)

            raw_lat = await _hop_latencies(raw_send, raw_consumer, len, n_latency)
            proj_lat = await _hop_latencies(proj_send, consumer, decode_rollout, n_latency)
            l0_lat = await _hop_latencies(l0_send, consumer_l0, decode_rollout, n_latency)
        finally:
            await raw_consumer.stop()
            await consumer.stop()
            await consumer_l0.stop()
            await publisher_l0.stop()

        for q in (50, 99):
            p, b = percentile(proj_lat, q), percentile(raw_lat, q)
            report.add(
                Row(
                    f"hop latency p{q}",
                    p,
                    b,
                    "ms",
                    ratio_meaning="project / raw (lower is better)",
                    note="send -> ack -> fetched -> decoded, one event in flight",
                )
            )
        report.add(
            Row(
                "hop latency p50, linger_ms=0",
                percentile(l0_lat, 50),
                percentile(raw_lat, 50),
                "ms",
                ratio_meaning="project codec+acks=all / raw (lower is better)",
                note="same helpers with Publisher(cfg, linger_ms=0): the codec's share of the overhead",
            )
        )

        # ---- throughput -------------------------------------------------------------------------
        try:
            started = time.perf_counter()
            futures = [await raw_producer.send(names["tp-raw"], raw_payload) for _ in range(n_throughput)]
            await asyncio.gather(*futures)
            raw_produce_s = time.perf_counter() - started

            started = time.perf_counter()
            batch = rollouts[:n_throughput]
            await publisher.send_many(names["tp-proj"], [(r.group_id, r) for r in batch])
            proj_produce_s = time.perf_counter() - started
        finally:
            await raw_producer.stop()
            await publisher.stop()

        raw_consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
        await _assigned(raw_consumer, names["tp-raw"])
        try:
            raw_consume_s = await _consume_n(raw_consumer, n_throughput, len)
        finally:
            await raw_consumer.stop()
        consumer = make_consumer(cfg, group_id=None)
        await _assigned(consumer, names["tp-proj"])
        try:
            proj_consume_s = await _consume_n(consumer, n_throughput, decode_rollout)
        finally:
            await consumer.stop()

    for label, p_s, b_s in (("produce", proj_produce_s, raw_produce_s), ("consume", proj_consume_s, raw_consume_s)):
        report.add(
            Row(
                f"max {label} throughput",
                n_throughput / p_s,
                n_throughput / b_s,
                "events/s",
                ratio_meaning="project / raw (higher is better)",
                note=f"{n_throughput} events of {size} B, batched" + (" + decode" if label == "consume" else ""),
            )
        )
    report.details["latency_ms"] = {
        "project": {"p50": percentile(proj_lat, 50), "p99": percentile(proj_lat, 99), "max": max(proj_lat)},
        "project_linger0": {"p50": percentile(l0_lat, 50), "p99": percentile(l0_lat, 99), "max": max(l0_lat)},
        "raw": {"p50": percentile(raw_lat, 50), "p99": percentile(raw_lat, 99), "max": max(raw_lat)},
    }
    report.details["settings"] = {
        "project": "Publisher (acks=all, linger_ms=5, no idempotence) + make_consumer + msgspec decode",
        "raw": "AIOKafkaProducer/AIOKafkaConsumer defaults (acks=1, linger_ms=0), bytes, no codec",
    }
