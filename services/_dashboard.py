"""``rlaif dashboard``: a live web view of a run, read from the run's topics (the durable record).

It follows every topic from the start with :func:`services._monitor.follow`, so it shows the same numbers as the
run report and can be started, restarted or pointed at a finished run at any time. The page is plain HTML +
vanilla JS that draws its own SVG charts (no CDN, nothing from the network) and polls ``/api/state``.

Throughput and lag are computed from the events' own ``created_at`` stamps, bucketed in time, so a dashboard
started late still draws the run's history instead of a burst of everything it caught up on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import structlog
from aiohttp import web

from schemas import DeadLetter, JudgedRollout, LearnerStep, Rollout, SchemaError
from services._monitor import RunStats, follow
from services._proc import free_port
from services._settings import Settings
from streams import decode_any

log = structlog.get_logger(__name__)

BUCKET_S = 2.0  # width of a timeline bucket
TIMELINE_BUCKETS = 900  # 30 min of history on the throughput / lag charts
RATE_WINDOW_S = 30.0  # "current" throughput is the mean over this window
SMOOTH_BUCKETS = 5  # the timeline's rates are moving means over 10 s
MAX_SCORED_IDS = 200_000  # per-rollout scores kept to average them per learner step
ASSETS = ("index.html", "app.js", "style.css")
_CONTENT_TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css"}


def _mean(acc: list[float]) -> float | None:
    return acc[0] / acc[1] if acc[1] else None


@dataclass
class DashboardStats(RunStats):
    """RunStats plus what the charts need: per-principle rewards by step and by version, timed buckets."""

    rollouts_topic: str = ""  # dead letters from it were handled by a judge: they are not judge lag
    records: int = 0
    scores_by_id: OrderedDict[str, dict[str, float]] = field(default_factory=OrderedDict)
    step_rollouts: dict[int, list[str]] = field(default_factory=dict)
    step_principles: dict[int, dict[str, float]] = field(default_factory=dict)  # complete steps only
    version_sums: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    principle_ids: set[str] = field(default_factory=set)
    # bucket index -> counts of rollouts / judged / learner steps / rollouts consumed by the learner
    buckets: dict[int, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    serving: dict[str, tuple[float, int]] = field(default_factory=dict)  # generator -> (latest created_at, version)
    generator_rollouts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    judged_train: int = 0
    table: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=25))

    def observe(self, record: Any) -> None:
        self.records += 1
        n_rollouts, n_judged = len(self.rollout_ids), len(self.judged_ids)
        super().observe(record)  # decodes again, but keeps the shared accounting in one place
        try:
            event = decode_any(record.value)
        except SchemaError:
            return  # counted as malformed by RunStats
        if isinstance(event, Rollout) and len(self.rollout_ids) > n_rollouts:
            self._bump(event.created_at, "rollouts")
            self.generator_rollouts[event.generator_id] += 1
            latest = self.serving.get(event.generator_id)
            if latest is None or event.created_at >= latest[0]:
                self.serving[event.generator_id] = (event.created_at, event.policy_version)
        elif isinstance(event, JudgedRollout) and len(self.judged_ids) > n_judged:
            self._observe_judged(event)
        elif isinstance(event, LearnerStep) and event.step not in self.step_rollouts:
            self._bump(event.created_at, "steps")
            self._bump(event.created_at, "consumed", len(event.rollout_ids))
            self.step_rollouts[event.step] = list(event.rollout_ids)
        elif isinstance(event, DeadLetter) and event.source_topic == self.rollouts_topic:
            self._bump(event.created_at, "dead_rollouts")

    def _bump(self, created_at: float, kind: str, n: int = 1) -> None:
        self.buckets[int(created_at // BUCKET_S)][kind] += n

    def _observe_judged(self, event: JudgedRollout) -> None:
        r = event.rollout
        self._bump(event.created_at, "judged")
        self.principle_ids.update(event.scores)
        if r.split == "train":
            self.judged_train += 1
            self._bump(event.created_at, "judged_train")
            self.scores_by_id[r.rollout_id] = {**event.scores, "reward": event.reward}
            while len(self.scores_by_id) > MAX_SCORED_IDS:
                self.scores_by_id.popitem(last=False)
            sums = self.version_sums.setdefault(r.policy_version, {})
            for pid, score in (*event.scores.items(), ("reward", event.reward)):
                acc = sums.setdefault(pid, [0.0, 0.0])
                acc[0] += score
                acc[1] += 1
        self.table.append(
            {
                "rollout_id": r.rollout_id,
                "created_at": event.created_at,
                "generator": r.generator_id,
                "judge": event.judge_id,
                "policy_version": r.policy_version,
                "split": r.split,
                "prompt": r.prompt[:160],
                "completion": r.completion[:240],
                "reward": round(event.reward, 4),
                "scores": {k: round(v, 4) for k, v in sorted(event.scores.items())},
                "judge_latency_s": round(event.judge_latency_s, 3),
            }
        )

    def principles_by_step(self) -> dict[int, dict[str, float]]:
        """Mean score per principle over the rollouts each learner step trained on.

        A step's rewards may be read after the step itself (topics are read concurrently), so a step is
        averaged once all its rollouts' scores are known; until then it is averaged over those known."""
        out: dict[int, dict[str, float]] = {}
        for step, ids in sorted(self.step_rollouts.items()):
            if step in self.step_principles:
                out[step] = self.step_principles[step]
                continue
            known = [self.scores_by_id[i] for i in ids if i in self.scores_by_id]
            if not known:
                continue
            sums: dict[str, list[float]] = {}
            for scores in known:
                for pid, score in scores.items():
                    acc = sums.setdefault(pid, [0.0, 0.0])
                    acc[0] += score
                    acc[1] += 1
            means = {pid: acc[0] / acc[1] for pid, acc in sorted(sums.items())}
            if len(known) == len(ids):
                self.step_principles[step] = means
            out[step] = means
        return out

    def timeline(self, now: float) -> dict[str, list[Any]]:
        """Rates (moving means) and lags per bucket, from the first bucket kept up to now."""
        keys = ("t", "rollouts_per_s", "judged_per_s", "steps_per_s", "judge_lag", "learner_lag")
        out: dict[str, list[Any]] = {k: [] for k in keys}
        if not self.buckets:
            return out
        last = int(now // BUCKET_S)
        first = max(min(self.buckets), last - TIMELINE_BUCKETS + 1)
        # cumulative counts before the window, so lags stay exact when history scrolls out of it
        totals: dict[str, int] = defaultdict(int)
        for b, counts in self.buckets.items():
            if b < first:
                for k, n in counts.items():
                    totals[k] += n
        empty: dict[str, int] = {}
        window: deque[dict[str, int]] = deque(maxlen=SMOOTH_BUCKETS)
        for b in range(first, max(first, last) + 1):
            counts = self.buckets.get(b, empty)
            window.append(counts)
            for k, n in counts.items():
                totals[k] += n
            span = len(window) * BUCKET_S
            out["t"].append(round(min(0.0, (b + 1) * BUCKET_S - now), 1))
            for key, kind in (("rollouts_per_s", "rollouts"), ("judged_per_s", "judged"), ("steps_per_s", "steps")):
                out[key].append(round(sum(c.get(kind, 0) for c in window) / span, 3))
            out["judge_lag"].append(totals["rollouts"] - totals["judged"] - totals["dead_rollouts"])
            out["learner_lag"].append(totals["judged_train"] - totals["consumed"])
        return out

    def _count(self, kind: str) -> int:
        return sum(c.get(kind, 0) for c in self.buckets.values())

    def recent_rate(self, kind: str, now: float) -> float:
        lo = int((now - RATE_WINDOW_S) // BUCKET_S)
        n = sum(c.get(kind, 0) for b, c in self.buckets.items() if b > lo)
        return n / RATE_WINDOW_S

    def snapshot(self, *, following: bool, source: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        principles = sorted(self.principle_ids)
        by_step = self.principles_by_step()
        batch_mean = sorted(self.reward_mean_by_step.items())
        reward_by_step: list[dict[str, Any]] = [{"name": "reward (learner batch mean)", "points": batch_mean}]
        for pid in principles:
            step_pts = [[s, round(m[pid], 4)] for s, m in by_step.items() if pid in m]
            reward_by_step.append({"name": pid, "points": step_pts})
        reward_by_version: list[dict[str, Any]] = []
        for key in ("reward", *principles):
            pts: list[list[float]] = []
            for v, sums in sorted(self.version_sums.items()):
                m = _mean(sums.get(key, [0.0, 0.0]))
                if m is not None:
                    pts.append([v, round(m, 4)])
            reward_by_version.append({"name": f"{key} (train)", "points": pts})
        eval_by_version = self.eval_reward_by_version()
        for key in ("reward", *principles):
            eval_pts = [[v, round(d[key], 4)] for v, d in eval_by_version.items() if key in d]
            if eval_pts:
                reward_by_version.append({"name": f"{key} (eval)", "points": eval_pts, "dashed": True})
        latest_version = max(self.policy_versions, default=0)
        generators = [
            {
                "id": gen,
                "serving": version,
                "behind": max(0, latest_version - version),
                "rollouts": self.generator_rollouts.get(gen, 0),
                "last_seen_s": round(now - at, 1),
                "versions_seen": sorted(self.versions_by_generator.get(gen, set())),
            }
            for gen, (at, version) in sorted(self.serving.items())
        ]
        published = self.train_rollouts + self.eval_rollouts
        return {
            "now": now,
            "source": {**source, "following": following, "records": self.records, "malformed": self.malformed},
            "totals": {
                "rollouts_published": published,
                "train_rollouts": self.train_rollouts,
                "eval_rollouts": self.eval_rollouts,
                "judged": len(self.judged_ids),
                "judged_train": self.judged_train,
                "rewards_published": self.rewards_published,
                "learner_step": self.learner_steps,
                "learner_consumed": self.learner_consumed,
                "policy_version": latest_version,
                "policy_versions": sorted(self.policy_versions),
                "dead_letters": self.dead_letters,
            },
            "throughput": {
                "rollouts_per_s": round(self.recent_rate("rollouts", now), 3),
                "judged_per_s": round(self.recent_rate("judged", now), 3),
                "learner_steps_per_s": round(self.recent_rate("steps", now), 4),
                "window_s": RATE_WINDOW_S,
            },
            "lag": {
                "judge": published - len(self.judged_ids) - self._count("dead_rollouts"),
                "learner": self.judged_train - self.learner_consumed,
            },
            "principles": principles,
            "reward_by_step": reward_by_step,
            "reward_by_version": reward_by_version,
            "timeline": self.timeline(now),
            "generators": generators,
            "latest_rollouts": list(reversed(self.table)),
            "dead_letter_reasons": dict(self.dead_letter_reasons),
        }


class Dashboard:
    """The web app and the topic follower that feeds it; one per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = DashboardStats(rollouts_topic=settings.topics.rollouts)
        self.following = False
        self.error: str | None = None
        self._assets = {name: (resources.files("services") / "dashboard" / name).read_bytes() for name in ASSETS}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def follow_forever(self) -> None:
        """Follow the topics; on a broker failure start over from scratch (reading from the start again keeps
        the numbers exact, where resuming half-way could count a record twice)."""
        while True:
            self.stats = DashboardStats(rollouts_topic=self.settings.topics.rollouts)
            self.following = True
            try:
                await follow(
                    self.settings.kafka, self.settings.topics, self.stats, self.settings.observer_fetch_wait_ms
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker may be starting, restarting or gone: retry
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("dashboard_follow_failed", error=self.error)
            self.following = False
            await asyncio.sleep(2.0)

    def _source(self) -> dict[str, Any]:
        return {
            "bootstrap": self.settings.kafka.bootstrap_servers,
            "topic_prefix": self.settings.kafka.topic_prefix,
            "error": self.error,
        }

    async def _index(self, _: web.Request) -> web.Response:
        return web.Response(body=self._assets["index.html"], content_type="text/html", charset="utf-8")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._assets:
            raise web.HTTPNotFound()
        ctype = _CONTENT_TYPES[name[name.rindex(".") :]]
        return web.Response(body=self._assets[name], content_type=ctype, charset="utf-8")

    async def _state(self, _: web.Request) -> web.Response:
        snap = self.stats.snapshot(following=self.following, source=self._source())
        return web.Response(
            text=json.dumps(snap, separators=(",", ":")),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def _healthz(self, _: web.Request) -> web.Response:
        body = {"status": "ok", "following": self.following, "records": self.stats.records, "error": self.error}
        return web.json_response(body)


async def serve(settings: Settings, *, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the dashboard until SIGINT / SIGTERM."""
    dash = Dashboard(settings)
    port = port or free_port(host)  # 0 = any free port
    runner = web.AppRunner(dash.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    url = f"http://{host}:{port}/"
    print(f"dashboard: {url}", flush=True)
    log.info("dashboard_listening", url=url, bootstrap=settings.kafka.bootstrap_servers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    follower = asyncio.create_task(dash.follow_forever())
    try:
        await stop.wait()
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await runner.cleanup()
        log.info("dashboard_stopped")
