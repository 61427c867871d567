"""Pipeline suite: the real services on the real broker, with the *compute* of each stage simulated.

Stand-ins keep the services' interfaces and replace only the work with a sleep of a known cost:

- :class:`FakeGenerator` subclasses :class:`~services._generator.Generator` and overrides ``generate`` (sleep
  ``G`` per prompt, emit ``group_size`` valid Rollouts); prompt consumption, committing, publishing and the
  policy hot-swap loop are the real code.
- :class:`SimulatedJudge` consumes rollouts in the ``judges`` group and publishes JudgedRollouts after
  sleeping ``J`` per rollout (one judge slot, like one Triton instance without batching).
- :class:`FakeLearner` subclasses :class:`~services._learner.Learner` and overrides ``train_step`` (sleep
  ``L`` per step); intake, grouping, LearnerStep events, weight publishing and checkpoints are the real code.

Because the costs are known, the ideal asynchronous throughput (1 / slowest stage) and the synchronous one
(1 / sum of stages) are exact; the suite measures how close the streaming loop comes to the first.
They are for this benchmark only: nothing outside ``services.bench`` imports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from schemas import JudgedRollout, LearnerStep, PromptTask, Rollout, SamplingParams, new_id
from services._broker import EmbeddedBroker
from services._generator import Generator
from services._learner import Learner
from services._settings import Settings
from services.bench._common import Report, Row
from streams import KafkaConfig, Publisher, decode, decode_any, ensure_topics, make_consumer, read_from_start


@dataclass(frozen=True)
class StageCosts:
    generate_s: float = 0.150  # per prompt (one batched generate call makes the whole group)
    judge_s: float = 0.025  # per rollout
    learn_s: float = 0.240  # per optimizer step (groups_per_step groups)

    def per_group(self, group_size: int, groups_per_step: int) -> dict[str, float]:
        return {
            "generator": self.generate_s,
            "judge": self.judge_s * group_size,
            "learner": self.learn_s / groups_per_step,
        }


class FakeGenerator(Generator):
    """A generator whose sampling is a sleep; everything around it is the real service."""

    def __init__(self, settings: Settings, cost_s: float) -> None:
        super().__init__(settings)
        self.cost_s = cost_s

    def generate_batch(self, tasks: list[PromptTask]) -> list[list[Rollout]]:
        self._swap_if_staged()  # the real hot-swap point, as in Generator.generate_batch
        time.sleep(self.cost_s * len(tasks))  # the stage cost stays G per prompt, batched or not
        return [self._group(task) for task in tasks]

    def _group(self, task: PromptTask) -> list[Rollout]:
        group_id, n = new_id(), self.settings.group_size
        return [
            Rollout(
                rollout_id=new_id(),
                group_id=group_id,
                group_size=n,
                prompt_id=task.prompt_id,
                prompt=task.text,
                completion=f"simulated completion {i}",
                prompt_token_ids=list(range(3, 63)),
                completion_token_ids=[(7 * i + k) % 500 + 3 for k in range(40)],
                behaviour_logprobs=[-1.0 - 0.01 * k for k in range(40)],
                policy_version=self.version,
                generator_id=self.generator_id,
                sampling=SamplingParams(max_new_tokens=40, seed=i),
            )
            for i in range(n)
        ]


class SimulatedJudge:
    """Consumes rollouts (group ``judges``), sleeps ``cost_s`` per rollout, publishes JudgedRollouts."""

    def __init__(self, settings: Settings, cost_s: float) -> None:
        self.s, self.cost_s = settings, cost_s
        self.publisher = Publisher(settings.kafka)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        topics = self.s.topics
        await self.publisher.start()
        consumer = make_consumer(self.s.kafka, topics.rollouts, group_id="judges")
        await consumer.start()
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=50)
                for tp, records in batches.items():
                    for record in records:
                        rollout = decode(record.value, Rollout)
                        started = time.perf_counter()
                        await asyncio.sleep(self.cost_s)
                        # a deterministic pseudo-score so groups have spread (advantages are not all zero)
                        score = (int(rollout.rollout_id[:4], 16) % 1000) / 1000
                        judged = JudgedRollout(
                            rollout=rollout,
                            constitution_id="simulated",
                            constitution_version=1,
                            judge_model="simulated",
                            scores={"simulated": score},
                            reward=score,
                            judge_latency_s=time.perf_counter() - started,
                            judge_id="simulated-judge",
                        )
                        await self.publisher.send(topics.rewards, judged, key=rollout.group_id)
                    await consumer.commit({TopicPartition(tp.topic, tp.partition): records[-1].offset + 1})
        finally:
            await consumer.stop()
            await self.publisher.stop()

    def stop(self) -> None:
        self._stop.set()


class FakeLearner(Learner):
    """A learner whose optimizer step is a sleep; intake, publishing and checkpoints are the real code."""

    def __init__(self, settings: Settings, cost_s: float) -> None:
        super().__init__(settings)
        self.cost_s = cost_s

    def train_step(self, groups: list[list[JudgedRollout]]) -> dict[str, float]:
        time.sleep(self.cost_s)
        st_ = self.state
        rows = [m for members in groups for m in members]
        self.record_step(groups, rows)
        staleness = [st_.version - m.rollout.policy_version for m in rows]
        return {
            "reward_mean": statistics.fmean(m.reward for m in rows) if rows else 0.0,
            "trained_rollouts": float(len(rows)),
            "staleness_mean": statistics.fmean(staleness) if staleness else 0.0,
            "simulated": 1.0,
        }


@dataclass
class _Timeline:
    rollouts: list[float]
    judged: list[float]
    steps: list[tuple[float, int]]  # (time, rollouts trained in the step)


async def _watch(cfg: KafkaConfig, settings: Settings, timeline: _Timeline) -> None:
    topics = settings.topics
    async for record in read_from_start(cfg, [topics.rollouts, topics.rewards, topics.learner]):
        event = decode_any(record.value)
        if isinstance(event, Rollout):
            timeline.rollouts.append(event.created_at)
        elif isinstance(event, JudgedRollout):
            timeline.judged.append(event.created_at)
        elif isinstance(event, LearnerStep):
            timeline.steps.append((event.created_at, len(event.rollout_ids)))


def _rate(stamps: list[float], since: float) -> float:
    window = sorted(t for t in stamps if t >= since)
    if len(window) < 2:
        return 0.0
    return (len(window) - 1) / (window[-1] - window[0])


async def run_pipeline(report: Report, *, quick: bool, device: str = "cpu") -> None:
    del device  # the stages are simulated: nothing runs on an accelerator
    costs = StageCosts()
    window_s = 20.0 if quick else 40.0
    warmup_steps = 2
    with tempfile.TemporaryDirectory(prefix="rlaif-bench-pipe-") as tmp, EmbeddedBroker() as broker:
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:8]}.")
        settings = Settings(
            profile="tiny",
            kafka=cfg,
            run_dir=Path(tmp) / "run",
            cache_dir=Settings().cache_dir,
            partitions=1,
            service_id="fake-gen-0",
            max_staleness=1000,  # the simulated learner trains on everything; staleness is not measured here
            checkpoint_every=10,
        )
        per_group = costs.per_group(settings.group_size, settings.groups_per_step)
        await ensure_topics(cfg, settings.topics.specs())
        n_prompts = int((window_s + 30) / min(per_group.values())) + 10
        async with Publisher(cfg) as pub:
            await pub.send_many(
                settings.topics.prompts,
                [(None, PromptTask(prompt_id=f"p{i}", text=f"simulated prompt {i}")) for i in range(n_prompts)],
            )

        generator = FakeGenerator(settings, costs.generate_s)
        judge = SimulatedJudge(settings, costs.judge_s)
        learner = FakeLearner(settings, costs.learn_s)
        timeline = _Timeline([], [], [])
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(generator.run()),
            asyncio.create_task(judge.run()),
            asyncio.create_task(learner.run()),
        ]
        watcher = asyncio.create_task(_watch(cfg, settings, timeline))
        started = time.time()
        try:
            # consumer-group joins take a few seconds on Tansu; measure from the warm-up steps on
            while len(timeline.steps) < warmup_steps + 1:
                for t in tasks:
                    if t.done():
                        t.result()
                if time.time() - started > 120:
                    raise TimeoutError("the simulated pipeline made no learner step within 120 s")
                await asyncio.sleep(0.1)
            measure_from = timeline.steps[warmup_steps][0]
            await asyncio.sleep(window_s)
        finally:
            generator.stop()
            judge.stop()
            learner.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    steps = [(t, n) for t, n in timeline.steps if t >= measure_from]
    if len(steps) < 2:
        raise RuntimeError(f"only {len(steps)} learner steps in the measuring window")
    trained = sum(n for _, n in steps[1:])
    span = steps[-1][0] - steps[0][0]
    measured_rps = trained / span
    measured_sps = (len(steps) - 1) / span
    g = settings.group_size
    ideal_rps = g / max(per_group.values())
    sync_rps = g / sum(per_group.values())
    bottleneck = max(per_group, key=lambda k: per_group[k])
    report.add(
        Row(
            "async throughput vs ideal",
            measured_rps,
            ideal_rps,
            "rollouts/s",
            ratio_meaning="measured / (1 / slowest stage); target >= 0.9",
            note=f"bottleneck by design: {bottleneck}",
        )
    )
    report.add(
        Row(
            "async throughput vs synchronous loop",
            measured_rps,
            sync_rps,
            "rollouts/s",
            ratio_meaning="measured / (1 / sum of stages); speed-up from streaming",
        )
    )
    report.add(
        Row(
            "learner steps",
            measured_sps,
            ideal_rps / (g * settings.groups_per_step),
            "steps/s",
            ratio_meaning="measured / ideal",
        )
    )
    report.add(
        Row(
            "generator output",
            _rate(timeline.rollouts, measure_from),
            g / per_group["generator"],
            "rollouts/s",
            ratio_meaning="measured / stage capacity",
        )
    )
    report.add(
        Row(
            "judge output",
            _rate(timeline.judged, measure_from),
            g / per_group["judge"],
            "rollouts/s",
            ratio_meaning="measured / stage capacity",
        )
    )
    report.details.update(
        {
            "stage_costs_s": {
                "generate_per_prompt": costs.generate_s,
                "judge_per_rollout": costs.judge_s,
                "learn_per_step": costs.learn_s,
            },
            "per_group_cost_s": per_group,
            "group_size": g,
            "groups_per_step": settings.groups_per_step,
            "window_s": span,
            "steps_measured": len(steps) - 1,
            "rollouts_trained_in_window": trained,
            "learner_steps_total": len(timeline.steps),
            "policy_versions_served": generator.version,
            "stand_ins": ["FakeGenerator", "SimulatedJudge", "FakeLearner"],
        }
    )
