"""Archive, pluggable consumers and replay against the real broker (Tansu)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from schemas import JudgedRollout, LearnerStep, PromptTask
from services._archive import ARCHIVE_SCHEMA, ArchiveConsumer, archive_root, read_archive
from services._consumers import MetricsConsumer, available, load, run_consumer
from services._replay import ReplayFilter, collect, from_line, replay
from services._settings import Settings
from streams import Publisher, encode, ensure_topics, make_producer
from tests.factories import make_judged, make_rollout


def judged(rollout_id: str, version: int, reward: float) -> JudgedRollout:
    return make_judged(
        make_rollout(rollout_id=rollout_id, policy_version=version),
        {"harmless": reward, "honest": 1 - reward},
        reward=reward,
        judge_latency_s=0.01,
    )


async def publish_sample(s: Settings, n: int = 6, start: int = 0) -> dict[str, bytes]:
    """Judged rollouts r<start>.. (policy version i % 3), prompts and one LearnerStep; returns the reward bytes."""
    sent: dict[str, bytes] = {}
    async with Publisher(s.kafka) as pub:
        for i in range(start, start + n):
            value = sent[f"r{i}"] = encode(judged(f"r{i}", i % 3, i / 10))
            await pub.send_raw(s.topics.rewards, value, key=f"g{i}", headers=[("h", b"\x00\x01")])
            await pub.send(s.topics.prompts, PromptTask(prompt_id=f"p{i}", text=f"q{i}"))
        await pub.send(
            s.topics.learner,
            LearnerStep(
                step=1, policy_version=0, rollout_ids=["r0", "r3"], rollout_versions=[0, 0], reward_mean=0.1, metrics={}
            ),
        )
    return sent


async def archive_all(s: Settings, batch: int = 4) -> ArchiveConsumer:
    consumer = ArchiveConsumer(s, batch_records=batch, flush_interval_s=0.5)
    await run_consumer(consumer, s, stop_at_end=True, idle_timeout_s=1.0)
    return consumer


async def test_archive_is_complete_byte_exact_and_idempotent(tiny_settings: Settings) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    sent = await publish_sample(s)
    first = await archive_all(s)
    assert first.archived == 13 and first.skipped == 0
    root = archive_root(s)
    files = sorted(root.glob("*/part-*.parquet"))
    assert files and all(pq.read_schema(f).equals(ARCHIVE_SCHEMA) for f in files)
    rewards = list(read_archive(root, s.topics.rewards))
    assert [r.offset for r in rewards] == list(range(6))
    assert rewards[0].key == b"g0" and rewards[0].headers == (("h", b"\x00\x01"),)
    assert [r.value for r in rewards] == list(sent.values())  # the raw bytes, unchanged
    # a second run over the same topics resumes after the archive: nothing is written twice
    again = await archive_all(s)
    assert again.archived == 0
    assert len(list(read_archive(root, s.topics.rewards))) == 6
    # new records are archived, old ones are not repeated (even when re-delivered from the start)
    await publish_sample(s, n=2, start=6)
    third = ArchiveConsumer(s, batch_records=100)
    await third.start()
    third_offsets = third.start_offsets()
    assert max(third_offsets.values()) >= 6
    await third.stop()
    redelivered = ArchiveConsumer(s, batch_records=100)
    redelivered.start_offsets = dict  # type: ignore[method-assign]  # read everything again from offset 0
    await run_consumer(redelivered, s, stop_at_end=True, idle_timeout_s=1.0)
    assert redelivered.archived == 5 and redelivered.skipped == 13
    offsets = [r.offset for r in read_archive(root, s.topics.rewards)]
    assert offsets == list(range(8))


async def test_archive_flushes_on_time_as_well_as_on_count(tiny_settings: Settings) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    await publish_sample(s, n=2)
    consumer = ArchiveConsumer(s, batch_records=10_000, flush_interval_s=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(run_consumer(consumer, s, stop=stop))
    deadline = time.monotonic() + 20
    while consumer.archived < 5 and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a counter
        await asyncio.sleep(0.2)
    assert consumer.archived == 5  # flushed by the timer while the consumer was still running
    stop.set()
    assert await task == 5


async def test_builtin_consumers_are_discoverable_and_metrics_counts(tiny_settings: Settings) -> None:
    assert {"archive", "metrics"} <= set(available())
    assert load("archive") is ArchiveConsumer and load("metrics") is MetricsConsumer
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    await publish_sample(s, n=3)
    metrics = MetricsConsumer(s)
    await run_consumer(metrics, s, stop_at_end=True, idle_timeout_s=1.0)
    assert metrics.counts[s.topics.rewards, "JudgedRollout"] == 3
    assert metrics.counts[s.topics.prompts, "PromptTask"] == 3
    import urllib.request

    assert metrics.port is not None
    url = f"http://127.0.0.1:{metrics.port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert f'rlaif_topic_events_total{{topic="{s.topics.rewards}",type="JudgedRollout"}}' in body
    assert 'rlaif_topic_reward_count{principle="harmless"}' in body


async def test_replay_from_kafka_and_archive_is_identical(tiny_settings: Settings, tmp_path: Path) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    sent = await publish_sample(s)
    await archive_all(s)
    for flt in (
        ReplayFilter(),
        ReplayFilter(from_offset=2),
        ReplayFilter(policy_version=1),
        ReplayFilter(rollout_id="r3"),
    ):
        a, b = tmp_path / "kafka.jsonl", tmp_path / "archive.jsonl"
        n = await replay(s, s.topics.rewards, flt, a, source="kafka")
        assert await replay(s, s.topics.rewards, flt, b, source="archive") == n
        assert a.read_bytes() == b.read_bytes() and n > 0
    lines = [json.loads(line) for line in (tmp_path / "kafka.jsonl").read_text().splitlines()]
    assert [from_line(x).value for x in lines] == [sent["r3"]]
    steps = await collect(s, s.topics.learner, ReplayFilter(rollout_id="r3"), "kafka")
    assert len(steps) == 1  # LearnerStep.rollout_ids matched


async def test_timestamp_filters_are_exact_per_record(tiny_settings: Settings, tmp_path: Path) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    base = int(time.time() * 1000) - 30_000
    # out-of-order create timestamps inside one partition: only exact per-record filtering gets this right
    stamps = [base + d for d in (5000, 1000, 3000, 2999, 3001, 7000, 3000, 0)]
    producer = make_producer(s.kafka)
    await producer.start()
    try:
        for i, ts in enumerate(stamps):
            await producer.send_and_wait(s.topics.eval, f"v{i}".encode(), partition=0, timestamp_ms=ts)
    finally:
        await producer.stop()
    await archive_all(s)
    since, until = base + 3000, base + 5001
    expected = sorted(i for i, ts in enumerate(stamps) if since <= ts < until)
    for source in ("kafka", "archive"):
        got = await collect(s, s.topics.eval, ReplayFilter(since_ms=since, until_ms=until), source)  # type: ignore[arg-type]
        assert [r.offset for r in got] == expected, source
        assert [r.timestamp_ms for r in got] == [stamps[i] for i in expected]


async def test_third_party_consumer_is_installed_discovered_and_run(
    tiny_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    # build from a copy: setuptools leaves build/ and *.egg-info next to the sources it builds
    example = tmp_path / "src"
    shutil.copytree(Path(__file__).resolve().parents[2] / "examples" / "rlaif-example-consumer", example)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    proc = await asyncio.create_subprocess_exec(*pip, "--target", str(site), str(example))
    assert await proc.wait() == 0
    monkeypatch.syspath_prepend(str(site))  # entry points are read from every sys.path entry
    assert available()["reward-counter"] == "rlaif_example_consumer:RewardCounter"
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    await publish_sample(s, n=4)
    counter = load("reward-counter")(s)
    assert await run_consumer(counter, s, stop_at_end=True, idle_timeout_s=1.0) == 4  # rewards topic only
    means = counter.means()  # type: ignore[attr-defined]
    assert means["reward"] == pytest.approx((0 + 0.1 + 0.2 + 0.3) / 4)
    # and the CLI sees it too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "consumer", "list", env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await cli.communicate()
    assert "reward-counter\trlaif_example_consumer:RewardCounter" in out.decode()
