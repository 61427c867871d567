"""Test helpers shared by the service tests (real broker, real tiny models)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRecord

from streams import KafkaConfig, read_from_start


async def collect(
    kafka: KafkaConfig,
    topic: str,
    until: Callable[[list[ConsumerRecord[bytes, bytes]]], bool],
    timeout_s: float = 60,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``topic`` from the start until ``until(records)`` holds (or fail after ``timeout_s``)."""
    records: list[ConsumerRecord[bytes, bytes]] = []

    async def run() -> None:
        async for record in read_from_start(kafka, [topic]):
            records.append(record)
            if until(records):
                return

    await asyncio.wait_for(run(), timeout_s)
    return records


async def stop_task(task: asyncio.Task[Any], stopper: Callable[[], None], timeout_s: float = 30) -> None:
    stopper()
    await asyncio.wait_for(task, timeout_s)
