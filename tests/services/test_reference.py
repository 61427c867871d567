"""Reference log-probs computed ahead (services/_reference.py) are the ones the learner would compute itself."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import msgspec
import pytest
import torch
from aiokafka import TopicPartition

from schemas import JudgedRollout
from services._learner import Learner
from services._learner_algo import reference_logprobs
from services._settings import Settings
from streams import Publisher, ensure_topics, make_consumer, stop_consumer
from tests.services.test_learner import judged_groups


def inline_reference(learner: Learner, events: list[JudgedRollout]) -> torch.Tensor:
    seqs = [(e.rollout.prompt_token_ids, e.rollout.completion_token_ids) for e in events]
    temperature = events[0].rollout.sampling.temperature
    pad = learner.tokenizer.pad_token_id
    return reference_logprobs(learner.model, learner.reference, seqs, pad, temperature, learner.share_prompts)


@pytest.mark.parametrize("lora", [False, True])
def test_ahead_equals_inline_even_after_the_policy_moved(tiny_settings: Settings, lora: bool) -> None:
    """Full weights share the learner's frozen copy; LoRA gets a base of its own, equal to the adapter disabled."""
    s = tiny_settings.model_copy(update={"lora": lora, "learner_reference_ahead": True, "learning_rate": 1e-2})
    learner = Learner(s)
    assert learner.reference_ahead is not None
    events = judged_groups(s, 2)
    learner.train_step([events[: s.group_size]])  # the policy (adapter) moves; the reference must not
    for e in events:
        learner.reference_ahead.offer(e.rollout)
    # rows from both groups, out of order, as a micro-batch can hold them
    rows = [events[5], events[0], events[3], events[6]]
    ahead = learner.reference_ahead.take([e.rollout for e in rows])
    assert ahead is not None
    inline = inline_reference(learner, rows)
    assert ahead.shape == inline.shape
    assert torch.allclose(ahead, inline, atol=1e-5)
    learner.reference_ahead.close()


def test_a_group_never_completed_is_computed_inline_and_forgotten(tiny_settings: Settings) -> None:
    s = tiny_settings.model_copy(update={"learner_reference_ahead": True})
    learner = Learner(s)
    ahead = learner.reference_ahead
    assert ahead is not None
    events = judged_groups(s, 2)
    first, second = events[: s.group_size], events[s.group_size :]
    for e in first + second[:-1]:  # the second group's last member was dead-lettered
        ahead.offer(e.rollout)
    ahead.offer(msgspec.structs.replace(first[0].rollout, rollout_id="eval-1", group_id="e", split="eval"))
    assert ahead.take([e.rollout for e in second[:-1]]) is None
    assert ahead.groups == 2  # the eval rollout is never the learner's to compare
    metrics = learner.train_step([second[:-1]])  # the learner computes what was not computed ahead
    assert metrics["trained_rollouts"] == len(second) - 1 and metrics["reference_seconds"] > 0
    ahead.retain({first[0].rollout.group_id})
    assert ahead.groups == 1
    ahead.retain(set())
    assert ahead.groups == 0
    ahead.close()


async def test_records_arriving_during_a_step_are_computed_ahead_and_taken_in_after(tiny_settings: Settings) -> None:
    """The run loop reads while a step trains: the new groups' reference log-probs are computed then, and the
    records reach the learner's state only once the step is done."""
    s = tiny_settings.model_copy(update={"learner_reference_ahead": True})
    await ensure_topics(s.kafka, s.topics.specs())
    learner = Learner(s)
    assert learner.reference_ahead is not None
    events = judged_groups(s, 2)
    consumer = make_consumer(s.kafka, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(s.topics.rewards, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        step = asyncio.ensure_future(asyncio.sleep(4.0, result={"loss": 0.0}))  # stands in for a training step
        async with Publisher(s.kafka) as pub:
            await pub.send_many(s.topics.rewards, [(e.rollout.group_id, e) for e in events])
        early = await learner._read_during(step, consumer)
        assert step.done() and len(early) == len(events)
        assert learner.state.counters["consumed"] == 0 and not learner.state.pending  # not taken in yet
        ahead = learner.reference_ahead.take([e.rollout for e in events])
        assert ahead is not None and torch.allclose(ahead, inline_reference(learner, events), atol=1e-5)
        for record in early:
            await learner.intake(record)
        assert learner.state.counters["consumed"] == len(events) and len(learner.ready_groups()) == 2
    finally:
        await stop_consumer(consumer)
        learner.reference_ahead.close()


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_the_reference_thread_runs_at_idle_priority_and_the_rest_of_the_process_does_not(
    tiny_settings: Settings,
) -> None:
    learner = Learner(tiny_settings.model_copy(update={"learner_reference_ahead": True}))
    assert learner.reference_ahead is not None
    nice = learner.reference_ahead._pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert nice.result() == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == os.getpriority(os.PRIO_PROCESS, 0) != 19
    learner.reference_ahead.close()


def test_a_group_the_worker_has_not_started_is_computed_by_the_caller(tiny_settings: Settings) -> None:
    """At idle priority the worker may get no core; the step then computes the group itself, not waits."""
    s = tiny_settings.model_copy(update={"learner_reference_ahead": True})
    learner = Learner(s)
    ahead = learner.reference_ahead
    assert ahead is not None
    busy = threading.Event()
    ahead._pool.submit(busy.wait, 60)  # the worker is held: what is offered now queues behind it
    events = judged_groups(s, 1)
    for e in events:
        ahead.offer(e.rollout)
    got = ahead.take([e.rollout for e in events])
    busy.set()
    assert got is not None and torch.allclose(got, inline_reference(learner, events), atol=1e-5)
    ahead.close()
