"""A non-Python client (kcat, librdkafka) reads the topics, and what it reads validates against the JSON Schema."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from services._settings import Settings
from streams import Publisher, ensure_topics
from tests.schemas.test_events import sample_judged_rollouts

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "json" / "JudgedRollout.json"


@pytest.fixture(scope="session")
def kcat() -> str:
    """Debian's kcat, installed on first use; skipped only where apt itself is unavailable."""
    found = shutil.which("kcat")
    if found is None:
        if shutil.which("apt-get") is None:
            pytest.skip("kcat is not installed and apt-get is unavailable")
        subprocess.run(["apt-get", "install", "-y", "-q", "kcat"], check=False, capture_output=True, timeout=300)
        found = shutil.which("kcat")
        if found is None:  # the package lists may be stale on a fresh machine
            subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-q", "kcat"], check=True, capture_output=True, timeout=300)
            found = shutil.which("kcat")
    assert found is not None
    return found


async def test_kcat_reads_judged_rollouts_that_match_the_json_schema(tiny_settings: Settings, kcat: str) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    sent = sample_judged_rollouts(4)
    async with Publisher(s.kafka) as pub:
        await pub.send_many(s.topics.rewards, [(j.rollout.group_id, j) for j in sent])
    argv = [kcat, "-C", "-b", s.kafka.bootstrap_servers, "-t", s.topics.rewards, "-e", "-o", "beginning", "-q"]
    argv += ["-X", "api.version.request=true", "-f", "%s\n"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if proc.returncode != 0 and b"Broker transport failure" in err:
        # Measured with Debian 12's kcat (librdkafka 2.0.2) on Tansu 0.6.0: librdkafka always sends
        # ApiVersions v3 and fails to parse Tansu's answer ("Protocol read buffer underflow for ApiVersion v3 at
        # 274/279"), with or without api.version.request. aiokafka uses v0 and is unaffected; Apache Kafka is.
        pytest.xfail(f"kcat cannot talk to this broker (librdkafka ApiVersions v3 parse): {err.decode()[-300:]}")
    assert proc.returncode == 0, err.decode()
    values = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    for value in values:
        validator.validate(value)
    assert sorted(v["rollout"]["rollout_id"] for v in values) == [f"r{i}" for i in range(4)]
