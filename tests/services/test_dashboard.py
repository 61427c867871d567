"""``rlaif dashboard``: the state API against a real broker, and the page itself in headless Chromium over a
real tiny loop started with ``rlaif up``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from schemas import DeadLetter, JudgedRollout, LearnerStep, PolicyUpdate, Rollout, SamplingParams
from services._dashboard import Dashboard
from services._proc import die_with_parent
from services._settings import Settings
from streams import Publisher, ensure_topics
from tests.factories import make_judged, make_rollout

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1800",
    "--virtual-time-budget=5000",
]


def rollout(i: int, group: str, version: int, generator: str = "gen-a", split: str = "train") -> Rollout:
    return make_rollout(
        rollout_id=f"r{i}",
        group_id=group,
        prompt_id=f"p-{group}",
        prompt=f"prompt {group}",
        completion=f"<completion {i}>",
        completion_token_ids=[3],
        behaviour_logprobs=[-0.5],
        policy_version=version,
        generator_id=generator,
        sampling=SamplingParams(),
        split=split,
    )


def judged(r: Rollout, helpful: float, harmless: float) -> JudgedRollout:
    return make_judged(r, {"helpful": helpful, "harmless": harmless}, judge_latency_s=0.01, judge_id="judge-0")


async def test_state_api_follows_the_topics(tiny_settings: Settings) -> None:
    s, topics = tiny_settings, tiny_settings.topics
    await ensure_topics(s.kafka, topics.specs())
    rs = [rollout(i, f"g{i // 2}", version=i // 2) for i in range(4)] + [rollout(9, "ge", 1, "gen-b", "eval")]
    js = [judged(r, 0.2 + 0.1 * i, 0.9) for i, r in enumerate(rs[:4])]
    async with Publisher(s.kafka) as pub:
        await pub.send_many(topics.rollouts, [(r.group_id, r) for r in rs + rs[:1]])  # one duplicate
        # the learner's record comes before the rewards it trained on: read order across topics is arbitrary
        step = LearnerStep(
            step=1, policy_version=1, rollout_ids=["r0", "r1"], rollout_versions=[0, 0], reward_mean=0.6, metrics={}
        )
        await pub.send(topics.learner, step)
        await pub.send_many(topics.rewards, [(j.rollout.group_id, j) for j in js])
        update = PolicyUpdate(
            policy_version=1, learner_step=1, base_model="b", kind="full", sha256="0" * 64, size_bytes=1, n_chunks=0
        )
        await pub.send(topics.policy, update)
        dead = DeadLetter(
            source_topic=topics.rollouts,
            partition=0,
            offset=4,
            key=None,
            error_type="JudgeUnavailable",
            message="x",
            payload=b"",
            service="judge",
        )
        await pub.send(topics.dead_letters, dead)

    dash = Dashboard(s)
    follower = asyncio.create_task(dash.follow_forever())
    server = TestServer(dash.app())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            state: dict[str, Any] = {}
            for _ in range(100):
                async with http.get(server.make_url("/api/state")) as resp:
                    state = await resp.json()
                if state["totals"]["policy_version"] == 1 and state["totals"]["dead_letters"] == 1:
                    break
                await asyncio.sleep(0.1)
            t = state["totals"]
            assert t["rollouts_published"] == 5 and t["eval_rollouts"] == 1
            assert t["judged"] == 4 and t["learner_step"] == 1 and t["learner_consumed"] == 2
            assert state["lag"] == {"judge": 5 - 4 - 1, "learner": 4 - 2}
            assert state["principles"] == ["harmless", "helpful"]
            by_step = {series["name"]: series["points"] for series in state["reward_by_step"]}
            assert by_step["reward (learner batch mean)"] == [[1, 0.6]]
            assert by_step["helpful"] == [[1, pytest.approx(0.25)]]  # mean of r0 (0.2) and r1 (0.3)
            by_version = {series["name"]: series["points"] for series in state["reward_by_version"]}
            assert by_version["helpful (train)"] == [[0, pytest.approx(0.25)], [1, pytest.approx(0.45)]]
            serving = {g["id"]: g["serving"] for g in state["generators"]}
            assert serving == {"gen-a": 1, "gen-b": 1}
            assert [r["rollout_id"] for r in state["latest_rollouts"]] == ["r3", "r2", "r1", "r0"]
            assert sum(state["timeline"]["rollouts_per_s"]) > 0 and state["timeline"]["judge_lag"][-1] == 0
            async with http.get(server.make_url("/healthz")) as resp:
                assert resp.status == 200 and (await resp.json())["following"] is True
            async with http.get(server.make_url("/")) as resp:
                assert resp.status == 200 and "/static/app.js" in await resp.text()
            async with http.get(server.make_url("/static/app.js")) as resp:
                assert resp.status == 200 and "lineChart" in await resp.text()
            async with http.get(server.make_url("/static/..%2Fsecret")) as resp:
                assert resp.status == 404
    finally:
        await server.close()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


# ---- the page in a real browser, over a real loop ------------------------------------------------------------


def chromium() -> str:
    """Debian's chromium; installed here when missing (CI installs it up front)."""
    found = shutil.which("chromium")
    if found is None:
        cmd = ["apt-get", "install", "-y", "-qq", "chromium"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
            subprocess.run(cmd, env=env, check=True, capture_output=True)
        found = shutil.which("chromium")
    assert found, "chromium is not installed and could not be installed"
    return found


def png_pixels(path: Path) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Decode an 8-bit, non-interlaced PNG (what Chromium writes) to an (h, w, channels) array with zlib only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert header is not None
    w, h, depth, colour_type, _, _, interlace = header
    assert depth == 8 and interlace == 0, header
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, w * bpp + 1)
    out = np.zeros((h, w * bpp), dtype=np.int64)
    prev = np.zeros(w * bpp, dtype=np.int64)
    for y in range(h):
        kind_of_filter, line = int(rows[y, 0]), rows[y, 1:].astype(np.int64)
        if kind_of_filter == 0:
            cur = line
        elif kind_of_filter == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(w, bpp), axis=0).reshape(-1) % 256
        elif kind_of_filter == 2:  # Up
            cur = (line + prev) % 256
        else:  # Average / Paeth depend on the pixel just decoded: byte by byte
            raw, up, done = line.tolist(), prev.tolist(), [0] * (w * bpp)
            for i in range(w * bpp):
                a = done[i - bpp] if i >= bpp else 0
                b, c = up[i], (up[i - bpp] if i >= bpp else 0)
                if kind_of_filter == 3:
                    done[i] = (raw[i] + (a + b) // 2) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    done[i] = (raw[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            cur = np.array(done, dtype=np.int64)
        out[y], prev = cur, cur
    return out.astype(np.uint8).reshape(h, w, bpp)


def colour_census(path: Path) -> dict[tuple[int, int, int], int]:
    """Pixels per RGB colour."""
    try:
        from PIL import Image  # faster when present; not a dependency
    except ImportError:
        px = png_pixels(path)[:, :, :3].astype(np.int64)
    else:
        with Image.open(path) as img:
            px = np.asarray(img.convert("RGB")).astype(np.int64)
    packed, counts = np.unique((px[:, :, 0] << 16) | (px[:, :, 1] << 8) | px[:, :, 2], return_counts=True)
    return {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255): int(n) for v, n in zip(packed, counts, strict=True)}


class DomCensus(HTMLParser):
    """Counts what the charts and tables hold in Chromium's serialised DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, int]] = {}
        self.rows: dict[str, int] = {}
        self._chart: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg" and (a.get("aria-label") or "").startswith("chart-"):
            self._chart = str(a["aria-label"])
            points = int(a.get("data-points") or 0)
            self.charts[self._chart] = {"data_points": points, "paths": 0, "circles": 0}
        elif self._chart and tag == "path" and a.get("class") == "series":
            self.charts[self._chart]["paths"] += 1
        elif self._chart and tag == "circle" and a.get("class") == "point":
            self.charts[self._chart]["circles"] += 1
        elif tag == "tr" and a.get("class"):
            self.rows[str(a["class"])] = self.rows.get(str(a["class"]), 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


def wait_for(what: str, predicate: Any, timeout_s: float, proc: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (
            f"rlaif up exited ({proc.returncode}) while waiting for {what}:\n" + log.read_text()[-3000:]
        )
        with contextlib.suppress(OSError, ValueError):
            found = predicate()
            if found:
                return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n" + log.read_text()[-3000:])


def dashboard_url_from(log: Path) -> str | None:
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "dashboard" and event.get("url"):
                return str(event["url"])
    return None


@pytest.mark.slow
def test_dashboard_page_in_headless_chromium(tmp_path: Path) -> None:
    browser = chromium()
    err_log, report = tmp_path / "up.stderr", tmp_path / "report.json"
    env = {**os.environ, "RLAIF_CACHE_DIR": str(ROOT / ".cache" / "rlaif")}
    argv = [sys.executable, "-m", "services.cli", "up", "--profile", "tiny", "--run-dir", str(tmp_path / "run")]
    with open(err_log, "wb") as err, open(tmp_path / "up.stdout", "wb") as out:
        up = subprocess.Popen(
            [*argv, "--report", str(report)], cwd=ROOT, env=env, stdout=out, stderr=err, preexec_fn=die_with_parent
        )
    try:
        url = wait_for("the dashboard URL", lambda: dashboard_url_from(err_log), 60, up, err_log)
        wait_for("/healthz", lambda: get_json(url + "healthz")["status"] == "ok", 30, up, err_log)
        state = wait_for(
            "learner step 2 on /api/state",
            lambda: (s := get_json(url + "api/state"))["totals"]["learner_step"] >= 2 and s["latest_rollouts"] and s,
            150,
            up,
            err_log,
        )
        shot = tmp_path / "dashboard.png"
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"]
        subprocess.run([browser, *flags, f"--screenshot={shot}", url], check=True, capture_output=True, timeout=90)
        dom = subprocess.run([browser, *flags, "--dump-dom", url], check=True, capture_output=True, timeout=90)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
    assert up.returncode == 0, err_log.read_text()[-3000:]
    assert json.loads(report.read_text())["dashboard_url"] == url

    if keep := os.environ.get("RLAIF_DASHBOARD_SCREENSHOT"):
        Path(keep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep)
    colours = colour_census(shot)
    assert len(colours) > 100, f"screenshot looks blank: {len(colours)} colours"
    # the reward series (first palette colour, #58a6ff) is drawn as lines and dots on both reward charts
    assert colours.get((88, 166, 255), 0) > 100, "the reward series is not drawn"

    census = DomCensus()
    census.feed(dom.stdout.decode())
    charts = census.charts
    assert set(charts) == {"chart-step", "chart-version", "chart-throughput", "chart-lag"}, charts
    for name in ("chart-step", "chart-version"):
        assert charts[name]["data_points"] > 0 and charts[name]["paths"] > 0 and charts[name]["circles"] > 0, charts
    for name in ("chart-throughput", "chart-lag"):
        assert charts[name]["data_points"] > 0 and charts[name]["paths"] > 0, charts
    assert census.rows.get("rollout-row", 0) > 0 and census.rows.get("generator-row", 0) > 0, census.rows
    assert len(state["principles"]) > 0 and state["generators"], state
