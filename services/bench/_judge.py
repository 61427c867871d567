"""Judge suite: the Triton-served judge under concurrent load vs the same server fed one row at a time.

Triton is started exactly as ``rlaif triton`` / the ``triton_tiny`` test fixture do (a subprocess of
``python -m services.cli triton`` configured by ``RLAIF_*``). Load comes from the project's client
(:class:`~services._judge_client.TritonJudge`, ``tritonclient.grpc.aio``): each request carries the judge
questions of one rollout (one row per ``llm`` principle), from 1, 8 or 32 concurrent callers. The baseline is
*unbatched*: one caller, one-row requests, so no two rows ever share a model execution. Batch sizes and busy
time come from Triton's own Prometheus metrics, diffed around each phase.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from schemas import render_judge_question
from services._data import load_constitution
from services._judge_client import JUDGE_MODEL, TritonJudge
from services._proc import free_port, port_open
from services._settings import Settings
from services.bench._common import Report, Row, realistic_rollout

_METRICS = (
    "nv_inference_request_success",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_queue_duration_us",
)


def scrape(port: int, model: str = JUDGE_MODEL) -> dict[str, float]:
    """Triton's counters for one model (summed over versions)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = dict.fromkeys(_METRICS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in out and sample.labels.get("model") == model:
                out[name] += sample.value
    return out


class TritonProcess:
    """``python -m services.cli triton`` with its own ports and run dir; stopped by process group."""

    def __init__(self, profile: str, device: str, run_dir: Path) -> None:
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.run_dir = run_dir
        self.env = {
            **os.environ,
            "RLAIF_PROFILE": profile,
            "RLAIF_DEVICE": device,
            "RLAIF_RUN_DIR": str(run_dir),
            "RLAIF_CACHE_DIR": str(Settings().cache_dir.resolve()),
            "RLAIF_TRITON_HTTP_PORT": str(self.http),
            "RLAIF_TRITON_GRPC_PORT": str(self.grpc),
            "RLAIF_TRITON_METRICS_PORT": str(self.metrics),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def start(self, timeout_s: float = 300) -> None:
        import tritonclient.http as httpclient

        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "triton.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "triton"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http}")
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    tail = (self.run_dir / "triton.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"triton exited: {tail}")
                try:
                    if port_open("127.0.0.1", self.http) and client.is_model_ready(JUDGE_MODEL):
                        return
                except Exception:  # not up yet; the deadline bounds the wait
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("triton did not become ready")
                time.sleep(0.5)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


async def _phase(
    judge: TritonJudge, metrics_port: int, requests: list[list[str]], concurrency: int, duration_s: float
) -> dict[str, Any]:
    """``concurrency`` callers send requests back to back for ``duration_s``; Triton counters diffed."""
    before = await asyncio.to_thread(scrape, metrics_port)
    done_requests = done_rows = 0
    stop_at = time.perf_counter() + duration_s

    async def caller(offset: int) -> None:
        nonlocal done_requests, done_rows
        i = offset
        while time.perf_counter() < stop_at:
            rows = requests[i % len(requests)]
            await judge._infer(JUDGE_MODEL, rows, "p_yes")
            done_requests += 1
            done_rows += len(rows)
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(concurrency)))
    wall = time.perf_counter() - started
    after = await asyncio.to_thread(scrape, metrics_port)
    delta = {k: after[k] - before[k] for k in _METRICS}
    execs = max(delta["nv_inference_exec_count"], 1.0)
    return {
        "concurrency": concurrency,
        "wall_s": wall,
        "requests": done_requests,
        "rows": done_rows,
        "requests_per_s": done_requests / wall,
        "rows_per_s": done_rows / wall,
        "mean_batch_requests": delta["nv_inference_request_success"] / execs,
        "mean_batch_rows": delta["nv_inference_count"] / execs,
        # Triton adds a batch's compute time to *every* request in it; per execution it is sum / requests
        "busy_fraction": min(
            1.0,
            delta["nv_inference_compute_infer_duration_us"]
            / 1e6
            / max(delta["nv_inference_request_success"], 1.0)
            * delta["nv_inference_exec_count"]
            / wall,
        ),
        "mean_queue_ms": delta["nv_inference_queue_duration_us"] / 1e3 / max(delta["nv_inference_request_success"], 1),
        "triton_delta": delta,
    }


async def run_judge(report: Report, *, quick: bool, device: str = "cpu") -> None:
    profile = "tiny" if quick else "default"
    duration_s = 5.0 if quick else 15.0
    settings = Settings(profile=profile)
    constitution = load_constitution(settings.constitution)
    llm = [p for p in constitution.principles if p.scorer != "classifier"]  # every principle an LM can judge
    requests = []
    for i in range(64):
        r = realistic_rollout(seq=i, group_size=settings.group_size)  # G completions per prompt, as published
        requests.append([render_judge_question(p, r.prompt, r.completion) for p in llm])
    single_rows = [[row] for req in requests for row in req]
    with tempfile.TemporaryDirectory(prefix="rlaif-bench-judge-") as tmp:
        triton = TritonProcess(profile, device, Path(tmp) / "triton")
        started = time.perf_counter()
        await asyncio.to_thread(triton.start)
        startup_s = time.perf_counter() - started
        judge = TritonJudge(
            url=triton.url,
            constitution=constitution,
            judge_model_name=settings.judge_model,
            timeout_s=settings.triton_timeout_s,  # c=32 queues minutes of CPU work behind big batches
        )
        try:
            await _phase(judge, triton.metrics, requests, 4, 1.0)  # warm-up, not reported
            unbatched = await _phase(judge, triton.metrics, single_rows, 1, duration_s)
            phases = {c: await _phase(judge, triton.metrics, requests, c, duration_s) for c in (1, 8, 32)}
        finally:
            await judge.close()
            await asyncio.to_thread(triton.stop)

    base = unbatched["rows_per_s"]
    for c, ph in phases.items():
        report.add(
            Row(
                f"judge throughput, concurrency {c}",
                ph["rows_per_s"],
                base,
                "questions/s",
                ratio_meaning="vs unbatched: 1 caller, 1-row requests (higher is better)",
                note=f"{ph['requests_per_s']:.1f} rollouts/s ({len(llm)} questions each)",
            )
        )
    top = phases[32]
    report.add(
        Row(
            "mean batch size at concurrency 32",
            top["mean_batch_rows"],
            unbatched["mean_batch_rows"],
            "rows/exec",
            ratio_meaning="batched / unbatched rows per model execution",
            note=f"{top['mean_batch_requests']:.2f} requests/exec (nv_inference_count / nv_inference_exec_count)",
        )
    )
    report.add(
        Row(
            "judge idle while requests queued (c=32)",
            1.0 - top["busy_fraction"],
            1.0 - unbatched["busy_fraction"],
            "fraction of wall",
            ratio_meaning="idle at c=32 / idle unbatched (lower is better)",
            note=f"1 - executions x mean compute time / wall; mean queue {top['mean_queue_ms']:.1f} ms/request",
        )
    )
    report.details.update(
        {
            "profile": profile,
            "judge_model": settings.judge_model,
            "llm_principles": len(llm),
            "phase_seconds": duration_s,
            "triton_startup_s": startup_s,
            "baseline": "unbatched = concurrency 1 with one-row requests on the same dynamic-batching model",
            "unbatched": unbatched,
            "phases": {str(c): ph for c, ph in phases.items()},
        }
    )
