"""The whole loop on real parts: Tansu, tritonserver, tiny models, one command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from services._proc import die_with_parent

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("tansu", "tritonserver", "services.cli", "triton_python_backend_stub")


def our_processes(run_dir: Path) -> set[int]:
    """Processes of *this* run: every child inherits RLAIF_RUN_DIR from the environment the test gives
    `rlaif up`, so concurrent runs elsewhere on the machine are not counted."""
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if not any(w in cmdline or w in (proc.info["name"] or "") for w in WATCHED):
            continue
        try:
            if proc.environ().get("RLAIF_RUN_DIR") == str(run_dir):
                pids.add(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def wait_gone(run_dir: Path, timeout_s: float = 20) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = our_processes(run_dir)
        if not left:
            return set()
        time.sleep(0.5)
    return our_processes(run_dir)


def test_tiny_loop_closes_and_leaves_nothing_behind(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    run_dir = tmp_path / "run"
    env = {**os.environ, "RLAIF_CACHE_DIR": str(ROOT / ".cache" / "rlaif"), "RLAIF_RUN_DIR": str(run_dir)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--profile",
            "tiny",
            "--steps",
            "3",
            "--report",
            str(report),
            "--run-dir",
            str(run_dir),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=die_with_parent,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    r = json.loads(report.read_text())
    assert r["learner_steps"] == 3
    assert r["policy_versions_published"] == [1, 2, 3]
    served = {v for versions in r["generator_versions_served"].values() for v in versions}
    assert any(v > 0 for v in served) and served <= {0, 1, 2, 3}
    assert r["rollouts_published"] >= r["rewards_consumed_by_learner"] > 0
    assert r["rewards_published"] > 0
    assert r["rewards_consumed_by_learner"] == 3 * 2 * 4  # steps × groups_per_step × group_size
    assert list(r["reward_mean_by_step"]) == ["1", "2", "3"]
    assert r["broker"]["name"] == "tansu" and r["broker"]["version"].startswith("tansu")
    assert r["triton"]["version"] and "judge_llm" in r["triton"]["models"]
    assert r["wall_seconds"] > 0 and r["loop_closed"] is True
    # effectively-once accounting, checked against the rewards topic and the learner's saved ledger
    assert r["learner_trained"] == r["learner_unique"] == 24
    assert r["rollouts_judged"] == r["learner_unique"] + r["learner_dropped_stale"] + r["learner_pending_at_exit"]
    assert r["lost"] == 0 and r["double_counted"] == 0
    assert not wait_gone(run_dir), "processes left behind after rlaif up"


def test_sigterm_shuts_everything_down(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "RLAIF_CACHE_DIR": str(ROOT / ".cache" / "rlaif"), "RLAIF_RUN_DIR": str(run_dir)}
    report = tmp_path / "report.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--profile",
            "tiny",
            "--report",
            str(report),
            "--run-dir",
            str(run_dir),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + 180
    learner_log = tmp_path / "run" / "logs" / "learner.log"
    while time.monotonic() < deadline:  # wait until the learner is training
        if learner_log.exists() and "learner_step" in learner_log.read_text():
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(1)
    else:
        pytest.fail("no learner step within 180 s")
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert json.loads(report.read_text())["learner_steps"] >= 1  # the report is written on shutdown too
    assert not wait_gone(run_dir), "processes left behind after SIGTERM"
