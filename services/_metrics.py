"""Prometheus metrics every service exports on ``/metrics`` (``RLAIF_METRICS_PORT``; 0 = a free port).

The names here are the contract with ``infra/grafana`` dashboards: a test checks the dashboard only uses these.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS_IN = Counter("rlaif_events_consumed_total", "Events consumed", ["service", "topic"])
EVENTS_OUT = Counter("rlaif_events_produced_total", "Events produced", ["service", "topic"])
DEAD_LETTERS = Counter("rlaif_dead_letters_total", "Records dead-lettered", ["service", "topic", "error_type"])
CONSUMER_LAG = Gauge("rlaif_consumer_lag", "Records behind the high watermark", ["service", "topic", "partition"])
JUDGE_LATENCY = Histogram(
    "rlaif_judge_latency_seconds",
    "Time to score one rollout against the whole constitution",
    ["judge"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
JUDGE_FAILURES = Counter("rlaif_judge_failures_total", "Triton calls that failed", ["judge"])
REWARD = Histogram(
    "rlaif_reward",
    "Reward per judged rollout",
    ["principle"],
    buckets=tuple(i / 10 for i in range(11)),
)
POLICY_VERSION = Gauge("rlaif_policy_version", "Policy version a generator serves", ["generator"])
ROLLOUTS = Counter("rlaif_rollouts_total", "Rollouts generated", ["generator"])
GENERATION_SECONDS = Histogram("rlaif_generation_seconds", "Time to sample one batch of prompt groups", ["generator"])
LEARNER_STEP = Gauge("rlaif_learner_step", "Learner optimizer steps taken")
LEARNER_METRIC = Gauge("rlaif_learner_metric", "Learner step metrics (loss, kl, clip_frac, entropy, ...)", ["name"])
STALENESS = Histogram(
    "rlaif_rollout_staleness_versions",
    "Policy versions between sampling and training",
    buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16),
)
LEARNER_DROPPED = Counter("rlaif_learner_dropped_total", "Rollouts not trained on", ["reason"])

METRIC_NAMES = (
    "rlaif_events_consumed_total",
    "rlaif_events_produced_total",
    "rlaif_dead_letters_total",
    "rlaif_consumer_lag",
    "rlaif_judge_latency_seconds",
    "rlaif_judge_failures_total",
    "rlaif_reward",
    "rlaif_policy_version",
    "rlaif_rollouts_total",
    "rlaif_generation_seconds",
    "rlaif_learner_step",
    "rlaif_learner_metric",
    "rlaif_rollout_staleness_versions",
    "rlaif_learner_dropped_total",
)


def serve_metrics(port: int | None, host: str = "127.0.0.1") -> int | None:
    """Start the /metrics endpoint (None = disabled, 0 = a free port); returns the bound port."""
    if port is None:
        return None
    if port == 0:
        from services._proc import free_port

        port = free_port()
    start_http_server(port, addr=host)
    return port


def count_dead_letter(service: str, topic: str, error_type: str) -> None:
    DEAD_LETTERS.labels(service, topic, error_type).inc()
