"""Process plumbing: services that block their main thread stop on a storm of signals instead of deadlocking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from services._proc import StopRequest, free_port


def test_stop_request_is_set_by_a_signal_and_wait_returns_early() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    try:
        stop = StopRequest(signals=(signal.SIGUSR1,))
        assert not stop.wait(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)
        started = time.monotonic()
        assert stop.wait(5.0) and stop.requested
        assert time.monotonic() - started < 1.0
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_the_broker_service_exits_on_a_burst_of_sigterms() -> None:
    """``rlaif broker`` blocks its main thread; a handler that set a ``threading.Event`` could re-enter the
    Event's (non-reentrant) lock when a second signal arrived inside ``set``/``wait`` and hang for good —
    ``rlaif triton`` did, after two SIGTERMs (py-spy showed three nested ``Event.set`` frames)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "broker", "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("bootstrap:")
        for _ in range(50):
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_workspaces_of_dead_triton_services_are_swept(tmp_path: Path) -> None:
    from services.triton._server import OWNER_FILE, WORKSPACE_PREFIX, sweep_dead_workspaces

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def workspace(name: str, owner: str | None) -> Path:
        path = tmp_path / f"{WORKSPACE_PREFIX}{name}"
        (path / "ws").mkdir(parents=True)
        if owner is not None:
            (path / OWNER_FILE).write_text(owner)
        return path

    gone = workspace("gone", str(dead.pid))
    alive = workspace("alive", str(os.getpid()))
    unknown = workspace("unknown", None)
    garbled = workspace("garbled", "not a pid")
    other = tmp_path / "someone-else"
    other.mkdir()

    assert sweep_dead_workspaces(tmp_path) == [gone]
    assert not gone.exists()
    assert alive.exists() and unknown.exists() and garbled.exists() and other.exists()


def test_reexec_with_tuned_malloc_keeps_the_pid_and_arguments_and_sets_the_env() -> None:
    """glibc reads MALLOC_* once at exec, so the CLI re-executes itself with them; the user can opt out."""
    probe = (
        "import os, sys; from services._malloc import reexec_with_tuned_malloc; reexec_with_tuned_malloc(); "
        "print(os.getpid(), os.environ.get('MALLOC_ARENA_MAX'), os.environ.get('MALLOC_MMAP_MAX_'), sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "RLAIF_TUNE_MALLOC"}
    proc = subprocess.Popen([sys.executable, "-c", probe, "--flag", "x"], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert out.strip().split(maxsplit=3) == [str(proc.pid), "1", "0", "['--flag', 'x']"]

    opted_out = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "RLAIF_TUNE_MALLOC": "0"}, capture_output=True, text=True
    )
    assert opted_out.stdout.split()[1:3] == ["None", "None"]
    users_own = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True, text=True
    )
    assert users_own.stdout.split()[1:3] == ["4", "None"]  # their choice stands, nothing added to it


def test_the_console_script_reexecs_before_it_imports_the_cli() -> None:
    """``rlaif`` (services._entry) re-executes before the CLI's imports, so a re-executed command imports
    typer, the settings and torch once, not twice."""
    probe = (
        "import sys; import services._entry, services._malloc; "
        "print([m for m in ('typer', 'torch', 'pydantic', 'schemas', 'services.cli') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    with open(Path(__file__).parents[2] / "pyproject.toml", "rb") as fh:
        assert tomllib.load(fh)["project"]["scripts"]["rlaif"] == "services._entry:main"
