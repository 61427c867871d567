"""``rlaif up``: start every service as its own supervised process on one machine, show progress, report.

Children run in their own process groups (so a restart or shutdown also reaps grandchildren such as
tritonserver) and get SIGTERM if the supervisor itself dies. A child that crashes is restarted with
exponential backoff; Ctrl-C or SIGTERM stops them in reverse start order, then kills what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from schemas import ConfigError, ServiceError
from services._broker import tansu_argv, tansu_binary, tansu_version
from services._models import prepare_model
from services._monitor import RunStats, follow
from services._proc import die_with_parent, free_port, port_open
from services._settings import Settings
from streams import ensure_topics, wait_for_broker

log = structlog.get_logger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    one_shot: bool = False  # exit code 0 means "done", not "restart me"
    stop_signal: int = signal.SIGTERM
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    restart_at: float | None = None
    finished: bool = False
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        out.close()
        self.restart_at = None
        log.info("service_started", service=self.name, pid=self.proc.pid, restarts=self.restarts)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def poll(self) -> None:
        """Notice an exit; schedule a restart with backoff unless the child is done."""
        if self.proc is None or self.finished or self.restart_at is not None:
            return
        code = self.proc.poll()
        if code is None:
            return
        self.exit_codes.append(code)
        self.signal_group(signal.SIGKILL)  # reap leftovers of the dead child's group
        if code == 0 and self.one_shot:
            self.finished = True
            log.info("service_finished", service=self.name)
            return
        delay = min(30.0, 2.0 ** min(self.restarts, 5))
        self.restarts += 1
        self.restart_at = time.monotonic() + delay
        log.warning("service_crashed", service=self.name, exit_code=code, restart_in_s=delay, log=str(self.log_path))


class Supervisor:
    def __init__(self) -> None:
        self.children: list[Child] = []

    def add(self, child: Child) -> Child:
        self.children.append(child)
        child.start()
        return child

    def tick(self) -> None:
        now = time.monotonic()
        for child in self.children:
            child.poll()
            if child.restart_at is not None and now >= child.restart_at:
                child.start()

    def stop_all(self, timeout_s: float = 15.0) -> None:
        for child in reversed(self.children):
            if child.alive:
                child.signal_group(child.stop_signal)
        deadline = time.monotonic() + timeout_s
        for child in reversed(self.children):
            if child.proc is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            child.signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)
        log.info("all_services_stopped")


def _service_argv(name: str) -> list[str]:
    return [sys.executable, "-m", "services.cli", name]


def _wait_triton(port: int, models: list[str], timeout_s: float, child: Child) -> None:
    import tritonclient.http as httpclient

    deadline = time.monotonic() + timeout_s
    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        while time.monotonic() < deadline:
            if not child.alive:
                raise ServiceError(f"triton exited during start-up; see {child.log_path}")
            with contextlib.suppress(Exception):
                if port_open("127.0.0.1", port) and all(client.is_model_ready(m) for m in models):
                    return
            time.sleep(0.5)
    finally:
        client.close()
    raise ServiceError(f"triton not ready after {timeout_s:.0f}s; see {child.log_path}")


async def _triton_info(url: str, models: list[str]) -> dict[str, Any]:
    import tritonclient.grpc.aio as grpcclient

    # PyTriton guards the repository-index endpoint with an access token, so ask about each model instead.
    client = grpcclient.InferenceServerClient(url)
    try:
        meta = await client.get_server_metadata(as_json=True)
        ready = [m for m in models if await client.is_model_ready(m)]
        return {"server": "tritonserver", "version": meta.get("version"), "url": url, "models": sorted(ready)}
    finally:
        await client.close()


def launch_triton(settings: Settings, sup: Supervisor, logs: Path, timeout_s: float = 300.0) -> list[str]:
    """Start the embedded Triton as a supervised child on free ports; point ``settings`` at it; wait until
    its models are ready. Returns the model names."""
    settings.triton_grpc_port, settings.triton_http_port, settings.triton_metrics_port = (
        free_port(),
        free_port(),
        free_port(),
    )
    settings.triton_url = f"127.0.0.1:{settings.triton_grpc_port}"
    env = {**os.environ, **settings.env(), "PYTHONUNBUFFERED": "1"}
    triton = sup.add(Child("triton", _service_argv("triton"), env, logs / "triton.log"))
    models = triton_models(settings)
    _wait_triton(settings.triton_http_port, models, timeout_s, triton)
    return models


def triton_models(settings: Settings) -> list[str]:
    """The Triton models the constitution needs: the judge LM always, the toxicity classifier and the principle
    heads when some principle is scored by them."""
    from services._data import load_constitution

    scorers = {p.scorer for p in load_constitution(settings.constitution).principles}
    return [
        "judge_llm",
        *(["toxicity"] if "classifier" in scorers else []),
        *(["principle_heads"] if "head" in scorers else []),
    ]


def refuse_stale_run_dir(run_dir: Path) -> None:
    """The embedded broker keeps topics in memory: a run dir holding an earlier run's learner checkpoint or
    policy store would be resumed against topics that no longer exist (offsets past their end, a ledger of
    rollouts nobody can replay). Refuse instead of training on a silently inconsistent state."""
    from services._learner import checkpoint_path

    leftovers = [p for p in (checkpoint_path(run_dir), run_dir / "policy") if p.exists()]
    if leftovers:
        raise ConfigError(
            f"{run_dir} holds state of an earlier run ({', '.join(str(p) for p in leftovers)}) whose embedded "
            "broker, and every topic in it, is gone; choose a new --run-dir (the default is a fresh one) or "
            "delete this one"
        )


async def up(
    settings: Settings,
    *,
    steps: int,
    report_path: Path | None,
    generators: int = 1,
    judges: int = 1,
    embedded_broker: bool = True,
    minutes: float = 0.0,
    live: bool = True,
) -> dict[str, Any]:
    """Run the whole loop; returns (and writes) the run report."""
    t0 = time.monotonic()
    run_dir = settings.run_dir.resolve()
    if embedded_broker:
        refuse_stale_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    sup = Supervisor()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stats = RunStats()
    monitor: asyncio.Task[None] | None = None
    report: dict[str, Any] = {}
    broker_info: dict[str, Any] = {"name": "external", "bootstrap": settings.kafka.bootstrap_servers}
    triton_info: dict[str, Any] = {}
    dashboard_url: str | None = None
    try:
        if embedded_broker:
            port = free_port()
            binary = tansu_binary()
            sup.add(
                Child(
                    "broker",
                    tansu_argv(binary, "127.0.0.1", port),
                    {**os.environ, "RUST_LOG": "warn"},
                    logs / "broker.log",
                )
            )
            settings.kafka.bootstrap_servers = f"127.0.0.1:{port}"
            broker_info = {
                "name": "tansu",
                "version": tansu_version(binary),
                "bootstrap": f"127.0.0.1:{port}",
            }
        await wait_for_broker(settings.kafka)
        await ensure_topics(settings.kafka, settings.topics.specs())
        dashboard_port = free_port()  # started early: the operator can watch while models load
        dashboard_url = f"http://127.0.0.1:{dashboard_port}/"
        dashboard_env = {**os.environ, **settings.env(), "PYTHONUNBUFFERED": "1"}
        dashboard_argv = [*_service_argv("dashboard"), "--port", str(dashboard_port)]
        sup.add(Child("dashboard", dashboard_argv, dashboard_env, logs / "dashboard.log"))
        log.info("dashboard", url=dashboard_url)
        log.info("preparing_models", student=settings.student_model, judge=settings.judge_model)
        for name in {settings.student_model, settings.judge_model}:
            await asyncio.to_thread(prepare_model, name, settings.cache_dir)
        models = await asyncio.to_thread(launch_triton, settings, sup, logs)
        env = {**os.environ, **settings.env(), "PYTHONUNBUFFERED": "1"}
        triton_info = await _triton_info(settings.triton_url, models)
        learner_env = {**env, "RLAIF_MAX_STEPS": str(steps)}
        learner = sup.add(
            Child("learner", _service_argv("learner"), learner_env, logs / "learner.log", one_shot=steps > 0)
        )
        for i in range(judges):
            sup.add(
                Child(
                    f"judge-{i}",
                    _service_argv("judge"),
                    {**env, "RLAIF_SERVICE_ID": f"judge-{i}"},
                    logs / f"judge-{i}.log",
                    stop_signal=signal.SIGINT,
                )
            )
        for i in range(generators):
            sup.add(
                Child(
                    f"generator-{i}",
                    _service_argv("generator"),
                    {**env, "RLAIF_SERVICE_ID": f"generator-{i}"},
                    logs / f"generator-{i}.log",
                )
            )
        sup.add(Child("feeder", _service_argv("feeder"), env, logs / "feeder.log"))
        sup.add(Child("archive", [*_service_argv("consumer"), "run", "archive"], env, logs / "archive.log"))
        monitor = asyncio.create_task(follow(settings.kafka, settings.topics, stats, settings.observer_fetch_wait_ms))
        from services._progress import Progress

        progress = Progress(stats, sup, live=live)
        closed_at: float | None = None
        deadline = t0 + minutes * 60 if minutes else None
        with progress:
            while not stop.is_set():
                sup.tick()
                progress.update()
                if monitor.done():
                    monitor.result()
                if steps and learner.finished:
                    # the loop is closed once a generator has generated with a version the learner pushed
                    closed_at = closed_at or time.monotonic()
                    served = {v for vs in stats.versions_by_generator.values() for v in vs}
                    if any(v > 0 for v in served) or time.monotonic() - closed_at > 120:
                        break
                if deadline and time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)  # let the monitor catch the last records
    finally:
        if monitor is not None:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await monitor
        await asyncio.to_thread(sup.stop_all)
        served_by: dict[str, list[int]] = {g: sorted(vs) for g, vs in stats.versions_by_generator.items()}
        elapsed = time.monotonic() - t0
        report = {
            "profile": settings.profile,
            "learner_steps": stats.learner_steps,
            "policy_versions_published": sorted(stats.policy_versions),
            "generator_versions_served": served_by,
            "rollouts_published": stats.train_rollouts + stats.eval_rollouts,
            "train_rollouts_published": stats.train_rollouts,
            "eval_rollouts_published": stats.eval_rollouts,
            "rewards_published": stats.rewards_published,
            "rollouts_judged": len(stats.judged_ids),
            "rewards_consumed_by_learner": stats.learner_consumed,
            "reward_mean_by_step": {str(k): v for k, v in sorted(stats.reward_mean_by_step.items())},
            "learner_metrics_by_step": {str(k): v for k, v in sorted(stats.learner_metrics.items())},
            "reward_mean_by_principle": stats.mean_by_principle(),
            "eval_reward_by_version": {str(k): v for k, v in stats.eval_reward_by_version().items()},
            "eval_results": stats.eval_results,
            "eval_seen_at": {str(k): round(v, 2) for k, v in stats.eval_seen_at.items()},
            "dead_lettered": stats.dead_letters,
            "dead_letter_reasons": dict(stats.dead_letter_reasons),
            "policy_bytes": {str(k): v for k, v in stats.policy_bytes.items()},
            "broker": broker_info,
            "triton": triton_info,
            "service_restarts": {c.name: c.restarts for c in sup.children},
            "wall_seconds": round(elapsed, 2),
            "rollouts_per_s": round((stats.train_rollouts + stats.eval_rollouts) / elapsed, 3),
            "judged_per_s": round(len(stats.judged_ids) / elapsed, 3),
            "run_dir": str(run_dir),
            "dashboard_url": dashboard_url,
        }
        from services._learner import read_checkpoint_accounting
        from services._monitor import learner_accounting

        report.update(learner_accounting(stats, read_checkpoint_accounting(run_dir)))
        report["dead_lettered"] = stats.dead_letters
        report["loop_closed"] = any(v > 0 for vs in served_by.values() for v in vs)
        if report_path is not None:
            await asyncio.to_thread(_write_json, report_path, report)
    return report


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
