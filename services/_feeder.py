"""The prompt feeder: keeps the generators supplied with prompts without flooding the topic.

Backpressure comes from the broker itself, at two levels: the feeder compares what it has published on each
partition with the offsets the ``generators`` group has committed (at most ``max_prompt_lag`` prompts wait),
and it counts the groups the learner has trained on (from the learner topic), keeping at most two steps'
worth of groups in flight (one if ``max_staleness`` is 0), so generation never runs far ahead of learning.
Every ``eval_every`` learner steps it also publishes the held-out eval prompts, tagged with an eval round,
which generators answer greedily: once the train prompts that refill the window have all been sampled
(``next_publication``), so an eval round never delays the groups of the learner's next steps.
"""

from __future__ import annotations

import asyncio
import random

import structlog
from aiokafka import TopicPartition

from schemas import LearnerStep, PromptTask, SchemaError
from services._data import load_prompts
from services._proc import run_until_signalled
from services._settings import Settings
from streams import Publisher, decode, ensure_topics, make_consumer, read_from_start, stop_consumer

log = structlog.get_logger(__name__)


def next_publication(*, window_has_room: bool, eval_due: bool, prompts_waiting: int) -> str:
    """What the feeder publishes next: ``"train"``, ``"eval"`` or ``"wait"``.

    Train prompts come first while the in-flight window has room. A due eval round goes out only once the
    window is full and the generators are done with every prompt published (``prompts_waiting``, the lag of
    their consumer group, is 0: a generator commits a prompt once its rollouts are published), so its greedy
    answers are sampled after the groups of the learner's next two steps, never mixed into their batches.
    Published at once, a round (16 greedy answers, ~25 s on a CPU) shared the generator's batches with the
    next step's train prompts, and the learner, having trained the one step's groups it had, waited for the
    rest (session 22's default run: 5-33 s after each round, 146 s of 1,500; ~10% of its wall time).

    >>> next_publication(window_has_room=True, eval_due=True, prompts_waiting=0)
    'train'
    >>> next_publication(window_has_room=False, eval_due=True, prompts_waiting=3)
    'wait'
    >>> next_publication(window_has_room=False, eval_due=True, prompts_waiting=0)
    'eval'
    >>> next_publication(window_has_room=False, eval_due=False, prompts_waiting=0)
    'wait'
    """
    if window_has_room:
        return "train"
    return "eval" if eval_due and prompts_waiting == 0 else "wait"


class Feeder:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.topics = settings.topics
        prompts = load_prompts(settings.prompts)
        self.train = [p for p in prompts if p.split == "train"]
        self.eval = [p for p in prompts if p.split == "eval"][: settings.eval_prompts]
        self.publisher = Publisher(settings.kafka)
        self.published: dict[int, int] = {}  # partition -> next offset (we are the only producer)
        self._stop = asyncio.Event()
        self._eval_rounds_done: set[int] = set()
        self._eval_due: list[int] = []
        self.train_published = 0
        self.groups_trained = 0
        # Generation must not run far ahead of learning. Two steps' worth in flight keep a learner busy (one
        # step trains while the next is sampled and judged); more only ages the queue: when the learner is the
        # slower stage every queued group waits its turn, so rollouts reach it ~(in flight / groups_per_step)
        # versions old, and past max_staleness they are dropped unused. (Four steps' worth with four groups a
        # step: staleness 3-4, whole groups dropped.)
        self.max_inflight = settings.groups_per_step * min(2, max(1, settings.max_staleness))

    async def lag(self, probe: object) -> int:
        total = 0
        for partition, end in self.published.items():
            committed = await probe.committed(TopicPartition(self.topics.prompts, partition))  # type: ignore[attr-defined]
            total += end - (committed or 0)
        return total

    async def publish(self, task: PromptTask) -> None:
        meta = await self.publisher.send(self.topics.prompts, task, key=task.prompt_id)
        self.published[meta.partition] = max(self.published.get(meta.partition, 0), meta.offset + 1)

    async def publish_eval(self, eval_round: int) -> None:
        if eval_round in self._eval_rounds_done or not self.eval:
            return
        self._eval_rounds_done.add(eval_round)
        for p in self.eval:
            await self.publish(
                PromptTask(prompt_id=p.prompt_id, text=p.text, split="eval", source=p.source, eval_round=eval_round)
            )
        log.info("eval_round_published", eval_round=eval_round, prompts=len(self.eval))

    async def watch_learner(self) -> None:
        async for record in read_from_start(
            self.s.kafka, [self.topics.learner], fetch_max_wait_ms=self.s.feeder_fetch_wait_ms
        ):
            try:
                step = decode(record.value, LearnerStep)
            except SchemaError:
                continue  # the learner topic is ours; the monitor reports malformed records
            self.groups_trained = max(self.groups_trained, step.step * self.s.groups_per_step)
            if step.step % self.s.eval_every == 0:
                self._eval_due.append(step.step)

    async def run(self) -> None:
        await ensure_topics(self.s.kafka, self.topics.specs())
        await self.publisher.start()
        probe = make_consumer(self.s.kafka, group_id="generators")
        await probe.start()
        watcher = asyncio.create_task(self.watch_learner())
        rng = random.Random(self.s.seed)
        order: list[PromptTask] = []
        try:
            await self.publish_eval(0)  # the base policy's round, before any training
            while not self._stop.is_set():
                if watcher.done():
                    watcher.result()
                # The lag costs the broker a request per partition: asked only when it decides something.
                window_open = self.train_published - self.groups_trained < self.max_inflight
                lag = await self.lag(probe) if window_open or self._eval_due else 0
                action = next_publication(
                    window_has_room=window_open and lag < self.s.max_prompt_lag,
                    eval_due=bool(self._eval_due),
                    prompts_waiting=lag,
                )
                if action == "eval":
                    await self.publish_eval(self._eval_due.pop(0))
                    continue
                if action == "wait":
                    await asyncio.sleep(0.2)
                    continue
                if not order:
                    order = list(self.train)
                    rng.shuffle(order)
                p = order.pop()
                await self.publish(PromptTask(prompt_id=p.prompt_id, text=p.text, split="train", source=p.source))
                self.train_published += 1
        finally:
            watcher.cancel()
            await stop_consumer(probe)
            await self.publisher.stop()

    def stop(self) -> None:
        self._stop.set()


def run(settings: Settings) -> None:
    run_until_signalled(lambda: Feeder(settings))
