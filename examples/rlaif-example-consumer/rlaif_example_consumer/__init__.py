"""An rlaif consumer in its own package: counts judged rollouts and averages their scores per principle.

It reads the raw JSON (not rlaif's classes), as a consumer in any language could; rlaif finds it through the
``rlaif.consumers`` entry point and calls ``RewardCounter(settings)``, then ``start``, ``handle`` per record,
and ``stop``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any


class RewardCounter:
    def __init__(self, settings: Any) -> None:
        self.topics = [settings.topics.rewards]  # only the rewards topic
        self.judged = 0
        self.sums: dict[str, float] = defaultdict(float)

    async def start(self) -> None:
        self.judged = 0

    async def handle(self, record: Any) -> None:
        event = json.loads(record.value)
        if event.get("type") != "judged":
            return
        self.judged += 1
        self.sums["reward"] += event["reward"]
        for principle, score in event["scores"].items():
            self.sums[principle] += score

    def means(self) -> dict[str, float]:
        return {k: v / self.judged for k, v in self.sums.items()} if self.judged else {}

    async def stop(self) -> None:
        print(json.dumps({"judged": self.judged, "means": self.means()}), flush=True)
