"""Process plumbing shared by the services: free ports, readiness waits, and children that die with us."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Protocol

from schemas import ServiceError

_PR_SET_PDEATHSIG = 1


class Stoppable(Protocol):
    async def run(self) -> None: ...
    def stop(self) -> None: ...


def run_until_signalled(make: Callable[[], Stoppable]) -> None:
    """Build a service inside a fresh event loop (aiokafka clients bind to it) and run it until SIGTERM/SIGINT
    asks it to stop."""

    async def main() -> None:
        service = make()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.run()

    asyncio.run(main())


class StopRequest:
    """Set by SIGTERM/SIGINT; polled by a service whose main thread blocks (``rlaif broker``, ``rlaif triton``).

    The handler only assigns a bool. A Python signal handler runs in the main thread between two bytecodes,
    possibly while that thread is inside ``threading.Event.set`` or ``wait`` on the very Event the handler
    would set, and the Event's lock is not reentrant: ``rlaif triton`` hung for good that way after two
    SIGTERMs arrived during its shutdown (py-spy: three nested ``Event.set`` frames).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.requested = False
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s``, returning early once a stop is requested; True if one was."""
        deadline = time.monotonic() + timeout_s
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.05, left))
        return self.requested


def default_service_id(kind: str) -> str:
    """Unique across containers and processes (ports are not: each container has its own port space)."""
    return f"{kind}-{socket.gethostname()}-{os.getpid()}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise ServiceError(f"{what} not ready after {timeout_s:.0f}s")


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: the kernel signals this child when its parent dies, so a killed supervisor leaves no
    orphans behind (Linux only; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    except OSError:
        pass
