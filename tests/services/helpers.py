"""Test helpers shared by the service tests (real broker, real tiny models)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import torch
from aiokafka import ConsumerRecord

from schemas import PolicyUpdate
from services._audit import policy_file
from services._models import LoraTargets
from services._policy import build_policy, serialize_weights
from services._settings import Settings
from streams import KafkaConfig, Publisher, read_from_start, sha256_hex, split_chunks


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


async def publish_version(
    s: Settings,
    version: int,
    *,
    lora: bool,
    keep_file: bool = True,
    targets: LoraTargets = "attention",
    top_layers: int = 0,
) -> torch.nn.Module:
    """A trained-looking policy version: perturbed weights, stored and announced like the learner does."""
    model, _ = build_policy(
        s.student_model, s.cache_dir, lora=lora, lora_rank=4, lora_targets=targets, lora_layers=top_layers, seed=0
    )
    torch.manual_seed(version)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(torch.randn_like(p) * 0.05)
    blob = serialize_weights(model, lora)
    if keep_file:
        policy_file(s, version).parent.mkdir(parents=True, exist_ok=True)
        policy_file(s, version).write_bytes(blob)
    chunks = split_chunks(blob, version, chunk_bytes=64 * 1024)
    update = PolicyUpdate(
        policy_version=version,
        learner_step=version,
        base_model=s.student_model,
        kind="lora" if lora else "full",
        sha256=sha256_hex(blob),
        size_bytes=len(blob),
        n_chunks=len(chunks),
    )
    async with Publisher(s.kafka) as pub:
        await pub.send(s.topics.policy, update, key=str(version))
        await pub.send_many(s.topics.policy, [(str(version), c) for c in chunks])
    model.eval()
    return model
