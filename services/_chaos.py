"""Chaos runs: ``rlaif up --profile tiny`` while random service processes get SIGKILLed, then an audit.

Each run starts the whole loop as a subprocess with its own run dir, waits until the services are up, and at
random moments SIGKILLs one random process of that run (a generator, a judge, the learner or the tritonserver
binary), letting the supervisor restart it. The victims are found among the descendants of that run's
``rlaif up`` process and double-checked by their ``RLAIF_RUN_DIR`` environment, so a chaos run never touches
another run's (or another user's) processes.

The broker is not a victim: the embedded Tansu uses ``memory://`` storage, so killing it erases every topic —
that is data loss by construction, not a bug to find. With Apache Kafka (or Tansu on s3://) it would belong
in the victim list.

After the run, the run report's effectively-once accounting must hold::

    learner_trained == learner_unique                       (no rollout trained twice)
    rollouts_judged == learner_unique + learner_dropped_stale + learner_pending_at_exit
    lost == 0 and double_counted == 0
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import structlog

from services._proc import die_with_parent

log = structlog.get_logger(__name__)

VICTIMS = ("generator", "judge", "learner", "tritonserver")


@dataclass
class Kill:
    at_s: float
    service: str
    pid: int


@dataclass
class RunResult:
    run: int
    seed: int
    run_dir: str
    exit_code: int | None
    wall_s: float
    kills: list[Kill] = field(default_factory=list)
    accounting: dict[str, Any] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def classify(proc: psutil.Process) -> str | None:
    """Which service a process is (None for anything that is not a victim)."""
    with contextlib.suppress(psutil.Error):
        if proc.name() == "tritonserver":
            return "tritonserver"
        cmd = proc.cmdline()
        if "services.cli" in cmd:
            i = cmd.index("services.cli")
            service = cmd[i + 1] if i + 1 < len(cmd) else ""
            if service in ("generator", "judge", "learner"):
                return service
    return None


def find_victims(root: psutil.Process, run_dir: Path) -> dict[str, list[psutil.Process]]:
    """Live service processes of the run whose ``rlaif up`` is ``root``."""
    found: dict[str, list[psutil.Process]] = {}
    with contextlib.suppress(psutil.Error):
        for proc in root.children(recursive=True):
            service = classify(proc)
            if service is None:
                continue
            with contextlib.suppress(psutil.Error):
                env_dir = proc.environ().get("RLAIF_RUN_DIR")
                # tritonserver is started by PyTriton with a trimmed environment: its parentage is enough
                if service != "tritonserver" and (env_dir is None or Path(env_dir).resolve() != run_dir.resolve()):
                    continue
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.setdefault(service, []).append(proc)
    return found


def check_invariants(report: dict[str, Any]) -> list[str]:
    """The effectively-once accounting of a run report; an empty list means it holds."""
    problems = []
    need = ("rollouts_judged", "learner_trained", "learner_unique", "learner_dropped_stale", "learner_pending_at_exit")
    missing = [k for k in need if k not in report]
    if missing:
        return [f"report lacks {missing}"]
    if report["learner_trained"] != report["learner_unique"]:
        problems.append(f"learner_trained {report['learner_trained']} != learner_unique {report['learner_unique']}")
    accounted = report["learner_unique"] + report["learner_dropped_stale"] + report["learner_pending_at_exit"]
    if report["rollouts_judged"] != accounted:
        problems.append(f"rollouts_judged {report['rollouts_judged']} != trained+dropped+pending {accounted}")
    if report.get("lost", 0):
        problems.append(f"lost {report['lost']}: {report.get('lost_ids')}")
    if report.get("double_counted", 0):
        problems.append(f"double_counted {report['double_counted']}")
    return problems


def _stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """Stop a run we started: SIGTERM the supervisor, then SIGKILL whatever of its tree is left."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    for p in [psutil.Process(proc.pid) if proc.poll() is None else None, *tree]:
        if p is not None:
            with contextlib.suppress(psutil.Error):
                p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def chaos_run(
    index: int,
    run_dir: Path,
    *,
    steps: int,
    seed: int,
    max_kills: int,
    gap_s: tuple[float, float],
    timeout_s: float,
    victims: tuple[str, ...] = VICTIMS,
    extra_env: dict[str, str] | None = None,
) -> RunResult:
    """One ``rlaif up --profile tiny --steps N`` under random SIGKILLs; returns the audit of its report."""
    rng = random.Random(seed)
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    report_path = run_dir / "report.json"
    env = {
        **os.environ,
        # checkpoints every 2 steps, so a killed learner resumes mid-run rather than from step 0
        "RLAIF_CHECKPOINT_EVERY": "2",
        **(extra_env or {}),
    }
    argv = [sys.executable, "-m", "services.cli", "up", "--profile", "tiny", "--steps", str(steps)]
    argv += ["--report", str(report_path), "--run-dir", str(run_dir / "run"), "--minutes", str(timeout_s / 60)]
    t0 = time.monotonic()
    with open(run_dir / "up.log", "wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
    result = RunResult(run=index, seed=seed, run_dir=str(run_dir), exit_code=None, wall_s=0.0)
    root = psutil.Process(proc.pid)
    next_kill: float | None = None
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout_s + 120:
            time.sleep(0.25)
            if len(result.kills) >= max_kills:
                continue
            found = find_victims(root, run_dir / "run")
            if next_kill is None:
                if "learner" in found and "judge" in found:  # everything is up: start the clock
                    next_kill = time.monotonic() + rng.uniform(*gap_s)
                continue
            if time.monotonic() < next_kill:
                continue
            candidates = sorted(s for s in found if s in victims)
            if not candidates:
                continue
            service = rng.choice(candidates)
            target = rng.choice(found[service])
            with contextlib.suppress(psutil.Error):
                target.send_signal(signal.SIGKILL)
                result.kills.append(Kill(round(time.monotonic() - t0, 2), service, target.pid))
                log.info("chaos_kill", run=index, service=service, pid=target.pid)
            next_kill = time.monotonic() + rng.uniform(*gap_s)
    finally:
        if proc.poll() is None:
            _stop_tree(proc)
    result.exit_code = proc.returncode
    result.wall_s = round(time.monotonic() - t0, 2)
    if not report_path.exists():
        result.violations.append(f"no report (exit code {proc.returncode}); see {run_dir / 'up.log'}")
        return result
    report = json.loads(report_path.read_text())
    keys = (
        "learner_steps",
        "rollouts_published",
        "rollouts_judged",
        "learner_trained",
        "learner_unique",
        "learner_dropped_stale",
        "learner_pending_at_exit",
        "lost",
        "double_counted",
        "dead_lettered",
        "loop_closed",
    )
    result.accounting = {k: report.get(k) for k in keys}
    result.restarts = {k: v for k, v in report.get("service_restarts", {}).items() if v}
    result.violations += check_invariants(report)
    if report.get("learner_steps", 0) < steps:
        result.violations.append(f"learner reached step {report.get('learner_steps')} of {steps}")
    return result


def chaos(
    runs: int,
    root: Path,
    *,
    steps: int = 6,
    seed: int = 0,
    max_kills: int = 3,
    gap_s: tuple[float, float] = (3.0, 12.0),
    timeout_s: float = 420.0,
    budget_s: float | None = None,
    victims: tuple[str, ...] = VICTIMS,
) -> dict[str, Any]:
    """``runs`` chaos runs (fewer if ``budget_s`` of wall time runs out); returns the summary."""
    t0 = time.monotonic()
    results: list[RunResult] = []
    for i in range(runs):
        if budget_s is not None and results and time.monotonic() - t0 > budget_s:
            break
        run_root = root / f"run-{i:03d}"
        # a checkpoint left by an earlier chaos run would be resumed against this run's fresh broker
        shutil.rmtree(run_root, ignore_errors=True)
        results.append(
            chaos_run(
                i,
                run_root,
                steps=steps,
                seed=seed * 10_007 + i,
                max_kills=max_kills,
                gap_s=gap_s,
                timeout_s=timeout_s,
                victims=victims,
            )
        )
        r = results[-1]
        log.info("chaos_run_done", run=i, ok=r.ok, kills=len(r.kills), wall_s=r.wall_s, violations=r.violations)
    kills = Counter(k.service for r in results for k in r.kills)
    return {
        "runs": len(results),
        "runs_ok": sum(r.ok for r in results),
        "steps_per_run": steps,
        "kills_total": sum(kills.values()),
        "kills_by_service": dict(sorted(kills.items())),
        "lost": sum(int(r.accounting.get("lost") or 0) for r in results),
        "double_counted": sum(int(r.accounting.get("double_counted") or 0) for r in results),
        "rollouts_judged": sum(int(r.accounting.get("rollouts_judged") or 0) for r in results),
        # rollouts a judge could not score while Triton was down: on the dead-letter topic, not lost
        "dead_lettered": sum(int(r.accounting.get("dead_lettered") or 0) for r in results),
        "wall_seconds": round(time.monotonic() - t0, 1),
        "broker_killed": False,
        "broker_excluded_because": "embedded Tansu uses memory:// storage: a killed broker loses every topic",
        "details": [{**asdict(r), "ok": r.ok} for r in results],
    }
