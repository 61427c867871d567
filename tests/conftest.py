"""Shared fixtures: a real Tansu broker per session, a unique topic prefix per test, real tiny models and a
real Triton server (tiny judge) when a test asks for one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services._broker import EmbeddedBroker
from services._proc import free_port, port_open
from services._settings import Settings
from streams import KafkaConfig

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "rlaif"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log") as b:
        yield b


@pytest.fixture
def kafka(broker: EmbeddedBroker) -> KafkaConfig:
    """Kafka settings with a topic prefix of its own, so tests never see each other's records."""
    return KafkaConfig(bootstrap_servers=broker.bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.")


@pytest.fixture
def tiny_settings(kafka: KafkaConfig, tmp_path: Path) -> Settings:
    return Settings(profile="tiny", kafka=kafka, run_dir=tmp_path / "run", cache_dir=CACHE, partitions=1)


@pytest.fixture(scope="session")
def triton_tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tritonserver serving the tiny judge (and the toxicity classifier); yields its gRPC URL."""
    run_dir = tmp_path_factory.mktemp("triton")
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "RLAIF_PROFILE": "tiny",
        "RLAIF_RUN_DIR": str(run_dir),
        "RLAIF_CACHE_DIR": str(CACHE),
        "RLAIF_TRITON_HTTP_PORT": str(http),
        "RLAIF_TRITON_GRPC_PORT": str(grpc),
        "RLAIF_TRITON_METRICS_PORT": str(metrics),
    }
    log = open(run_dir / "triton.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "triton"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    import tritonclient.http as httpclient

    from services._supervisor import triton_models

    models = triton_models(Settings(profile="tiny"))  # heads may still be training when judge_llm is up
    client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"triton exited: {(run_dir / 'triton.log').read_text()[-3000:]}")
            try:
                if port_open("127.0.0.1", http) and all(map(client.is_model_ready, models)):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("triton did not become ready")
            time.sleep(0.5)
        yield f"127.0.0.1:{grpc}"
    finally:
        client.close()
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
