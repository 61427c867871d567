"""Topic names and layouts. One place decides what every topic is called and how it is partitioned."""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas import ConfigError

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def validate_topic_name(name: str) -> str:
    """Kafka's own rule for topic names; anything else (slashes, ``..``) is refused.

    >>> validate_topic_name("rlaif.rewards")
    'rlaif.rewards'
    >>> validate_topic_name("../etc")
    Traceback (most recent call last):
    ...
    schemas._errors.ConfigError: invalid topic name '../etc'
    """
    if not _TOPIC_NAME.match(name) or name in (".", "..") or ".." in name:
        raise ConfigError(f"invalid topic name {name!r}")
    return name


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int


@dataclass(frozen=True)
class Topics:
    """The project's topics under one prefix (``rlaif.`` by default)."""

    prefix: str = "rlaif."
    partitions: int = 2

    def _name(self, suffix: str) -> str:
        return validate_topic_name(self.prefix + suffix)

    @property
    def prompts(self) -> str:
        return self._name("prompts")

    @property
    def rollouts(self) -> str:
        return self._name("rollouts")

    @property
    def rewards(self) -> str:
        return self._name("rewards")

    @property
    def policy(self) -> str:
        return self._name("policy")

    @property
    def learner(self) -> str:
        return self._name("learner")

    @property
    def eval(self) -> str:
        return self._name("eval")

    @property
    def dead_letters(self) -> str:
        return self._name("dead-letters")

    def rejudged(self, constitution_id: str) -> str:
        """Side topic for re-judged rewards; never the live rewards topic."""
        return self._name(f"rewards.rejudged.{constitution_id}")

    def specs(self) -> list[TopicSpec]:
        # The policy topic has one partition: chunks of a version must stay in order.
        return [
            TopicSpec(self.prompts, self.partitions),
            TopicSpec(self.rollouts, self.partitions),
            TopicSpec(self.rewards, self.partitions),
            TopicSpec(self.policy, 1),
            TopicSpec(self.learner, 1),
            TopicSpec(self.eval, 1),
            TopicSpec(self.dead_letters, 1),
        ]

    def all_names(self) -> list[str]:
        return [s.name for s in self.specs()]
