"""The supervisor refuses to resume an earlier run's learner state against a fresh embedded broker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from schemas import ConfigError
from services._learner import checkpoint_path
from services._supervisor import refuse_stale_run_dir


def test_a_run_dir_with_an_earlier_checkpoint_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    refuse_stale_run_dir(run_dir)  # nothing there yet
    (run_dir / "logs").mkdir(parents=True)
    refuse_stale_run_dir(run_dir)  # logs alone are harmless
    checkpoint_path(run_dir).parent.mkdir(parents=True)
    checkpoint_path(run_dir).write_bytes(b"")
    with pytest.raises(ConfigError, match="earlier run"):
        refuse_stale_run_dir(run_dir)

    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--profile", "tiny", "--steps", "1", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "ConfigError" in done.stderr and "earlier run" in done.stderr and "Traceback" not in done.stderr
