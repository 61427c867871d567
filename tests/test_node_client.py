"""A non-Python client (Node.js kafkajs) reads the rewards topic and validates it against the JSON Schema (ajv).

kcat (tests/test_kcat.py) is the obvious choice but librdkafka cannot parse Tansu's ApiVersions v3 answer;
kafkajs has its own protocol code, so this test proves the topic is readable from outside Python.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services._settings import Settings
from streams import Publisher, ensure_topics
from tests.schemas.test_events import sample_judged_rollouts

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "json" / "JudgedRollout.json"
READER = ROOT / "tests" / "node" / "read_rewards.mjs"
NODE_CACHE = ROOT / ".cache" / "node-client"
PACKAGES = {"kafkajs": "kafkajs@2", "ajv": "ajv@8", "ajv-formats": "ajv-formats@3"}


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """kafkajs + ajv installed once into a cache folder; skipped only where node or npm is missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed (scripts/system-deps installs them)")
    if all((NODE_CACHE / "node_modules" / name / "package.json").exists() for name in PACKAGES):
        return NODE_CACHE
    NODE_CACHE.mkdir(parents=True, exist_ok=True)
    # --prefix + --no-save: only node_modules/ lands in the (git-ignored) cache, no package.json or lockfile
    argv = ["npm", "install", "--prefix", str(NODE_CACHE), "--no-audit", "--no-fund", "--no-save", *PACKAGES.values()]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(argv)}` failed (rc={proc.returncode}); the npm registry must be reachable for the first run.\n"
            f"{proc.stderr[-2000:]}"
        )
    return NODE_CACHE


async def test_kafkajs_reads_rewards_and_ajv_validates_them(tiny_settings: Settings, node_modules: Path) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    sent = sample_judged_rollouts(4)
    # valid JSON, wrong contract: the reader must flag it rather than skip or accept it
    invalid = json.dumps({"rollout": {"rollout_id": 7}, "reward": "high"}).encode()
    async with Publisher(s.kafka) as pub:
        await pub.send_many(s.topics.rewards, [(j.rollout.group_id, j) for j in sent])
        await pub.send_raw(s.topics.rewards, invalid, key="bad")

    argv = ["node", str(READER), s.kafka.bootstrap_servers, s.topics.rewards, str(SCHEMA), str(len(sent) + 1)]
    env = {**os.environ, "NODE_CLIENT_MODULES": str(node_modules), "NODE_READER_TIMEOUT_MS": "25000"}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"node reader failed (rc={proc.returncode}):\n{err.decode()[-3000:]}"

    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert [line["offset"] for line in lines] == list(range(len(sent) + 1))
    assert all(line["valid"] and line["errors"] is None for line in lines[: len(sent)]), lines
    assert lines[-1]["valid"] is False
    assert lines[-1]["errors"], lines[-1]
