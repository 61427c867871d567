"""Live statistics of a run, read from the topics themselves (the durable record), not from the processes.

The supervisor's progress display and the run report both come from here, so a report states what is on the
broker: what generators published, what judges scored and what the learner trained on.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from schemas import DeadLetter, EvalResult, JudgedRollout, LearnerStep, PolicyUpdate, Rollout, SchemaError
from streams import KafkaConfig, Topics, decode_any, read_from_start


@dataclass
class RunStats:
    started: float = field(default_factory=time.monotonic)
    rollout_ids: set[str] = field(default_factory=set)
    train_rollouts: int = 0
    eval_rollouts: int = 0
    judged_ids: set[str] = field(default_factory=set)
    judged_train_at: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # id -> first record
    rewards_published: int = 0
    learner_steps: int = 0
    learner_consumed: int = 0
    reward_mean_by_step: dict[int, float] = field(default_factory=dict)
    learner_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    policy_versions: list[int] = field(default_factory=list)
    policy_bytes: dict[int, int] = field(default_factory=dict)
    versions_by_generator: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    principle_sums: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    eval_by_version: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    eval_results: list[dict[str, Any]] = field(default_factory=list)
    eval_seen_at: dict[int, float] = field(default_factory=dict)  # version -> seconds since start
    dead_letters: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    malformed: int = 0
    recent: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=4000))
    latest_rollouts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))

    def observe(self, record: Any) -> None:
        try:
            event = decode_any(record.value)
        except SchemaError:
            self.malformed += 1
            return
        now = time.monotonic()
        if isinstance(event, Rollout):
            if event.rollout_id in self.rollout_ids:
                return
            self.rollout_ids.add(event.rollout_id)
            self.versions_by_generator[event.generator_id].add(event.policy_version)
            if event.split == "eval":
                self.eval_rollouts += 1
            else:
                self.train_rollouts += 1
            self.recent.append((now, "rollout"))
        elif isinstance(event, JudgedRollout):
            self.rewards_published += 1
            if event.rollout.rollout_id in self.judged_ids:
                return
            self.judged_ids.add(event.rollout.rollout_id)
            self.recent.append((now, "judged"))
            if event.rollout.split == "train":
                self.judged_train_at[event.rollout.rollout_id] = (record.topic, record.partition, record.offset)
            if event.rollout.split == "eval":
                self.eval_seen_at[event.rollout.policy_version] = now - self.started
                per_version = self.eval_by_version.setdefault(event.rollout.policy_version, {})
                per_version.setdefault("reward", []).append(event.reward)
                for pid, score in event.scores.items():
                    per_version.setdefault(pid, []).append(score)
            else:
                for pid, score in event.scores.items():
                    acc = self.principle_sums[pid]
                    acc[0] += score
                    acc[1] += 1
            self.latest_rollouts.append(
                {
                    "rollout_id": event.rollout.rollout_id,
                    "policy_version": event.rollout.policy_version,
                    "prompt": event.rollout.prompt[:120],
                    "completion": event.rollout.completion[:200],
                    "reward": round(event.reward, 4),
                    "scores": {k: round(v, 3) for k, v in event.scores.items()},
                    "split": event.rollout.split,
                }
            )
        elif isinstance(event, LearnerStep):
            self.learner_steps = max(self.learner_steps, event.step)
            if event.step not in self.reward_mean_by_step:
                self.learner_consumed += len(event.rollout_ids)
            self.reward_mean_by_step[event.step] = event.reward_mean
            self.learner_metrics[event.step] = event.metrics
        elif isinstance(event, PolicyUpdate):
            if event.policy_version not in self.policy_versions:
                self.policy_versions.append(event.policy_version)
                self.policy_bytes[event.policy_version] = event.size_bytes
        elif isinstance(event, EvalResult):
            self.eval_results.append(
                {
                    "eval_round": event.eval_round,
                    "policy_version": event.policy_version,
                    "reward": event.reward_mean,
                    "by_principle": event.by_principle,
                    "reward_by_prompt": event.reward_by_prompt,
                }
            )
        elif isinstance(event, DeadLetter):
            self.dead_letters += 1
            self.dead_letter_reasons[f"{event.source_topic}:{event.error_type}"] += 1

    def rate(self, kind: str, window_s: float = 30.0) -> float:
        now = time.monotonic()
        n = sum(1 for t, k in self.recent if k == kind and now - t <= window_s)
        return n / min(window_s, max(1e-3, now - self.started))

    def mean_by_principle(self) -> dict[str, float]:
        return {pid: s / n for pid, (s, n) in sorted(self.principle_sums.items()) if n}

    def eval_reward_by_version(self) -> dict[int, dict[str, float]]:
        return {
            v: {k: sum(xs) / len(xs) for k, xs in sorted(d.items())} for v, d in sorted(self.eval_by_version.items())
        }


async def follow(cfg: KafkaConfig, topics: Topics, stats: RunStats, fetch_max_wait_ms: int) -> None:
    """Feed every record of the run's topics into ``stats``; runs until cancelled (see
    ``Settings.observer_fetch_wait_ms`` for the wait)."""
    names = [topics.rollouts, topics.rewards, topics.policy, topics.learner, topics.eval, topics.dead_letters]
    async for record in read_from_start(cfg, names, fetch_max_wait_ms=fetch_max_wait_ms):
        stats.observe(record)


def learner_accounting(stats: RunStats, ledger: dict[str, Any] | None) -> dict[str, Any]:
    """Check effectively-once accounting: every judged train rollout is trained once, dropped on purpose, or
    still pending (buffered in the checkpoint, or on the topic past the learner's saved offsets)."""
    judged = stats.judged_train_at
    if ledger is None:
        return {
            "rollouts_judged": len(judged),
            "learner_trained": 0,
            "learner_unique": 0,
            "learner_dropped_stale": 0,
            "learner_pending_at_exit": len(judged),
            "lost": 0,
        }
    trained_rows = int(ledger["counters"].get("trained_rows", 0))
    trained, dropped = ledger["trained"] & judged.keys(), ledger["dropped"] & judged.keys()
    pending, lost = 0, []
    for rid, (topic, partition, offset) in judged.items():
        if rid in trained or rid in dropped:
            continue
        if rid in ledger["pending"] or offset >= ledger["offsets"].get(f"{topic}:{partition}", 0):
            pending += 1
        else:
            lost.append(rid)
    return {
        "rollouts_judged": len(judged),
        "learner_trained": trained_rows,
        "learner_unique": len(ledger["trained"]),
        "learner_dropped_stale": len(dropped),
        "learner_pending_at_exit": pending,
        "lost": len(lost),
        "lost_ids": lost[:20],
        "double_counted": trained_rows - len(ledger["trained"]),
    }
