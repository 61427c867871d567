"""Live progress of ``rlaif up``: a rich table on a terminal, a JSON line every 10 s otherwise."""

from __future__ import annotations

import json
import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from services._monitor import RunStats


class Progress:
    def __init__(self, stats: RunStats, supervisor: Any, *, live: bool = True) -> None:
        self.stats = stats
        self.supervisor = supervisor
        self.console = Console(stderr=True)
        self.tty = live and self.console.is_terminal
        self._live: Live | None = None
        self._last_line = 0.0

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "learner_step": s.learner_steps,
            "policy_versions": s.policy_versions[-1] if s.policy_versions else 0,
            "serving": {g: max(v) for g, v in s.versions_by_generator.items()},
            "rollouts": len(s.rollout_ids),
            "judged": len(s.judged_ids),
            "rollouts_per_s": round(s.rate("rollout"), 2),
            "judged_per_s": round(s.rate("judged"), 2),
            "reward_by_principle": {k: round(v, 3) for k, v in s.mean_by_principle().items()},
            "dead_letters": s.dead_letters,
            "restarts": {c.name: c.restarts for c in self.supervisor.children if c.restarts},
        }

    def render(self) -> Table:
        snap = self.snapshot()
        table = Table(title="rlaif up", show_header=False)
        table.add_row("learner step", str(snap["learner_step"]))
        table.add_row("latest policy version", str(snap["policy_versions"]))
        for gen, version in sorted(snap["serving"].items()):
            table.add_row(f"  {gen} serves", f"v{version}")
        table.add_row("rollouts (per s)", f"{snap['rollouts']} ({snap['rollouts_per_s']})")
        table.add_row("judged (per s)", f"{snap['judged']} ({snap['judged_per_s']})")
        for pid, value in snap["reward_by_principle"].items():
            table.add_row(f"  reward · {pid}", f"{value:.3f}")
        table.add_row("dead letters", str(snap["dead_letters"]))
        for child in self.supervisor.children:
            state = "finished" if child.finished else ("up" if child.alive else "restarting")
            table.add_row(f"  {child.name}", f"{state} (restarts {child.restarts})")
        return table

    def update(self) -> None:
        if self._live is not None:
            self._live.update(self.render())
        elif time.monotonic() - self._last_line > 10:
            self._last_line = time.monotonic()
            print(json.dumps({"event": "progress", **self.snapshot()}), file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        if self.tty:
            self._live = Live(self.render(), console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(t, e, tb)
            self._live = None
