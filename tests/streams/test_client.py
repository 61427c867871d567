"""The Kafka helpers against a real Tansu broker."""

from __future__ import annotations

from schemas import PromptTask
from streams import KafkaConfig, Publisher, Topics, decode, ensure_topics, make_consumer, read_from_start


async def test_publish_and_read_back_in_order(kafka: KafkaConfig) -> None:
    topics = Topics(prefix=kafka.topic_prefix, partitions=2)
    await ensure_topics(kafka, topics.specs())
    await ensure_topics(kafka, topics.specs())  # idempotent
    sent = [PromptTask(prompt_id=f"p{i}", text=f"prompt {i}") for i in range(50)]
    async with Publisher(kafka) as pub:
        await pub.send_many(topics.prompts, [(t.prompt_id, t) for t in sent[:25]])
        for t in sent[25:]:
            await pub.send(topics.prompts, t, key=t.prompt_id)
    got = [decode(r.value, PromptTask) async for r in read_from_start(kafka, [topics.prompts], stop_at_end=True)]
    assert sorted(g.prompt_id for g in got) == sorted(t.prompt_id for t in sent)
    assert {g.event_id for g in got} == {t.event_id for t in sent}


async def test_consumer_group_commits_and_resumes(kafka: KafkaConfig) -> None:
    topics = Topics(prefix=kafka.topic_prefix, partitions=1)
    await ensure_topics(kafka, topics.specs())
    async with Publisher(kafka) as pub:
        await pub.send_many(topics.prompts, [(None, PromptTask(prompt_id=f"p{i}", text="x")) for i in range(6)])
    group = f"{kafka.topic_prefix}g"
    first = make_consumer(kafka, topics.prompts, group_id=group)
    await first.start()
    batch = await first.getmany(timeout_ms=15_000, max_records=3)
    records = [r for rs in batch.values() for r in rs]
    assert records
    last = records[-1]
    from aiokafka import TopicPartition

    await first.commit({TopicPartition(last.topic, last.partition): last.offset + 1})
    await first.stop()
    second = make_consumer(kafka, topics.prompts, group_id=group)
    await second.start()
    batch = await second.getmany(timeout_ms=15_000)
    await second.stop()
    resumed = [r.offset for rs in batch.values() for r in rs]
    assert resumed and resumed[0] == last.offset + 1
