"""End-to-end suite: ``rlaif up`` (every real service as its own process) for a few minutes, measured.

The supervisor runs against a broker this suite starts, so a sampler can read every topic while the run is
live: it counts what each stage produced and, once a second, how much work waits in front of each stage (the
queue lag per topic, in rollouts). The stage with the longest queue over the second half of the run is the
bottleneck. Learner tokens are the prompt + completion tokens of the rollouts named in LearnerStep events.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from schemas import JudgedRollout, LearnerStep, PromptTask, Rollout, SchemaError
from services._broker import EmbeddedBroker
from services._settings import Settings
from services._supervisor import up
from services.bench._common import Report, Row
from streams import KafkaConfig, decode_any, ensure_topics, read_from_start


@dataclass
class _Flow:
    prompts: set[str] = field(default_factory=set)
    groups: set[str] = field(default_factory=set)
    rollouts: dict[str, tuple[float, int, str]] = field(default_factory=dict)  # id -> (time, tokens, split)
    judged: dict[str, float] = field(default_factory=dict)
    judged_train: int = 0
    learner: list[tuple[float, int, int, float]] = field(default_factory=list)  # time, rows, tokens, step_s
    learner_rows: int = 0
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def observe(self, value: bytes | None) -> None:
        try:
            event = decode_any(value)
        except SchemaError:
            return
        if isinstance(event, PromptTask):
            self.prompts.add(event.event_id)
        elif isinstance(event, Rollout) and event.rollout_id not in self.rollouts:
            self.groups.add(event.group_id)
            tokens = len(event.prompt_token_ids) + len(event.completion_token_ids)
            self.rollouts[event.rollout_id] = (event.created_at, tokens, event.split)
        elif isinstance(event, JudgedRollout) and event.rollout.rollout_id not in self.judged:
            self.judged[event.rollout.rollout_id] = event.created_at
            self.judged_train += event.rollout.split == "train"
        elif isinstance(event, LearnerStep):
            tokens = sum(self.rollouts.get(rid, (0.0, 0, ""))[1] for rid in event.rollout_ids)
            step_s = float(event.metrics.get("step_seconds", 0.0))
            self.learner.append((event.created_at, len(event.rollout_ids), tokens, step_s))
            self.learner_rows += len(event.rollout_ids)

    def queues(self, group_size: int) -> dict[str, float]:
        """Work waiting in front of each stage, in rollouts."""
        return {
            "generator (prompts topic)": max(0, len(self.prompts) - len(self.groups)) * group_size,
            "judge (rollouts topic)": max(0, len(self.rollouts) - len(self.judged)),
            "learner (rewards topic)": max(0, self.judged_train - self.learner_rows),
        }


async def _sample(cfg: KafkaConfig, settings: Settings, flow: _Flow) -> None:
    t = settings.topics

    async def read() -> None:
        async for record in read_from_start(cfg, [t.prompts, t.rollouts, t.rewards, t.learner]):
            flow.observe(record.value)

    reader = asyncio.create_task(read())
    try:
        while True:
            await asyncio.sleep(1.0)
            if reader.done():
                reader.result()
            flow.samples.append((time.time(), flow.queues(settings.group_size)))
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def run_e2e(report: Report, *, quick: bool, device: str = "cpu", minutes: float | None = None) -> None:
    profile = "tiny" if quick else "default"
    minutes = minutes if minutes is not None else (2.0 if quick else 6.0)
    with tempfile.TemporaryDirectory(prefix="rlaif-bench-e2e-") as tmp, EmbeddedBroker() as broker:
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:8]}.")
        settings = Settings(profile=profile, kafka=cfg, run_dir=Path(tmp) / "run", device=device)
        await ensure_topics(cfg, settings.topics.specs())
        flow = _Flow()
        sampler = asyncio.create_task(_sample(cfg, settings, flow))
        try:
            result = await up(settings, steps=0, report_path=None, embedded_broker=False, minutes=minutes, live=False)
            await asyncio.sleep(2.0)  # let the sampler read the last records
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    rollout_times = sorted(t for t, _, _ in flow.rollouts.values())
    if len(rollout_times) < 2 or len(flow.learner) < 2:
        raise RuntimeError(
            f"run too short to measure: {len(rollout_times)} rollouts, {len(flow.learner)} learner steps"
        )
    # rates over the loop's productive span (from the first rollout on), not the start-up of models and Triton
    start, end = rollout_times[0], max(rollout_times[-1], flow.learner[-1][0], *flow.judged.values())
    span = end - start
    rollouts_s = len(flow.rollouts) / span
    judged_s = len(flow.judged) / span
    judged_train_s = flow.judged_train / span  # eval rollouts are judged but never trained on
    learn_span = flow.learner[-1][0] - flow.learner[0][0]
    rows_after_first = sum(r for _, r, _, _ in flow.learner[1:])
    tokens_after_first = sum(tok for _, _, tok, _ in flow.learner[1:])
    learner_rows_s = rows_after_first / learn_span if learn_span > 0 else 0.0
    learner_tokens_s = tokens_after_first / learn_span if learn_span > 0 else 0.0
    busy = sum(s for _, _, _, s in flow.learner[1:]) / learn_span if learn_span > 0 else 0.0
    half = [q for t, q in flow.samples if t >= start + span / 2] or [q for _, q in flow.samples]
    mean_queue = {k: statistics.fmean(q[k] for q in half) for k in half[0]} if half else {}
    bottleneck = max(mean_queue, key=lambda k: mean_queue[k]) if mean_queue else "unknown"

    report.add(Row("rollouts generated", rollouts_s, None, "rollouts/s", note="from the first rollout on"))
    report.add(
        Row(
            "rollouts judged",
            judged_s,
            rollouts_s,
            "rollouts/s",
            ratio_meaning="judged / generated (1 = judge keeps up)",
        )
    )
    report.add(
        Row(
            "learner intake",
            learner_rows_s,
            judged_train_s,
            "rollouts/s",
            ratio_meaning="trained / judged train rollouts (1 = learner keeps up)",
            note="rows in LearnerStep events between the first and last step",
        )
    )
    report.add(Row("learner tokens", learner_tokens_s, None, "tokens/s", note="prompt + completion tokens trained"))
    report.add(
        Row(
            "learner busy",
            busy,
            1.0,
            "fraction of wall",
            ratio_meaning="sum(step_seconds) / wall between steps",
        )
    )
    for name, depth in mean_queue.items():
        report.add(
            Row(
                f"queue lag: {name}",
                depth,
                None,
                "rollouts waiting",
                note="bottleneck (longest queue, 2nd half)" if name == bottleneck else "",
            )
        )
    report.details.update(
        {
            "profile": profile,
            "minutes": minutes,
            "bottleneck": bottleneck,
            "productive_span_s": span,
            "learner_steps": len(flow.learner),
            "rollouts": len(flow.rollouts),
            "judged": len(flow.judged),
            "mean_queue_second_half": mean_queue,
            "queue_samples": [(round(t - start, 1), q) for t, q in flow.samples],
            "supervisor_report": {
                k: result.get(k)
                for k in (
                    "learner_steps",
                    "rollouts_published",
                    "rewards_published",
                    "wall_seconds",
                    "rollouts_per_s",
                    "judged_per_s",
                    "service_restarts",
                    "loop_closed",
                )
            },
        }
    )
