"""Scoring a rollout against a constitution through Triton (tritonclient, asyncio gRPC).

Each principle becomes one row: ``llm`` principles send the rendered judge question to ``judge_llm``,
``classifier`` principles send the completion to their classifier model, ``head`` principles send
(head, prompt, completion) to ``principle_heads`` (:func:`_request_row`). Rows of one rollout go out in one
request per model, all at once; Triton's dynamic batcher merges concurrent requests. Failures are retried with
backoff and jitter; a rollout that still cannot be scored raises :class:`JudgeError` — it is never given a
default reward.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import stamina
import structlog
from numpy.typing import NDArray

from schemas import (
    Constitution,
    JudgedRollout,
    JudgeError,
    JudgeUnavailable,
    Principle,
    Rollout,
    aggregate_reward,
    render_head_row,
    render_judge_question,
)
from services._settings import Settings

log = structlog.get_logger(__name__)

JUDGE_MODEL = "judge_llm"
HEADS_MODEL = "principle_heads"


@dataclass
class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; while open, calls fail fast for ``cooldown_s``."""

    threshold: int = 5
    cooldown_s: float = 5.0
    failures: int = 0
    opened_at: float | None = None

    def check(self) -> None:
        if self.opened_at is not None and time.monotonic() - self.opened_at < self.cooldown_s:
            raise JudgeUnavailable("circuit breaker open: Triton failed repeatedly")

    def record(self, ok: bool) -> None:
        if ok:
            self.failures, self.opened_at = 0, None
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = time.monotonic()


@dataclass
class TritonJudge:
    url: str
    constitution: Constitution
    judge_model_name: str
    timeout_s: float = 30.0
    ssl: bool = False
    root_certificates: str | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    _client: Any = None

    @classmethod
    def from_settings(cls, settings: Settings, constitution: Constitution) -> TritonJudge:
        """The judge client every service builds: URL, deadline and TLS from the settings."""
        return cls(
            url=settings.triton_url,
            constitution=constitution,
            judge_model_name=settings.judge_model,
            timeout_s=settings.triton_timeout_s,
            ssl=settings.triton_ssl,
            root_certificates=str(settings.triton_root_certs) if settings.triton_root_certs else None,
        )

    def _grpc(self) -> Any:
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient
            from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

            # gRPC's default reconnect backoff grows to 120 s: after a Triton restart the channel would keep
            # failing fast long after the server is back, and every retry would end in the dead-letter topic.
            channel_args = [
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.min_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 2_000),
            ]
            self._client = grpcclient.InferenceServerClient(
                self.url, ssl=self.ssl, root_certificates=self.root_certificates, channel_args=channel_args
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _infer(self, model: str, texts: list[str], output: str) -> NDArray[np.float64]:
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        self.breaker.check()
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        tensor = grpcclient.InferInput("text", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        try:
            result = await self._grpc().infer(
                model,
                [tensor],
                outputs=[grpcclient.InferRequestedOutput(output)],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            self.breaker.record(False)
            raise JudgeUnavailable(f"triton {model}: {exc}") from exc
        self.breaker.record(True)
        scores = np.asarray(result.as_numpy(output), dtype=np.float64).reshape(-1)
        if scores.shape[0] != len(texts) or not np.all(np.isfinite(scores)):
            raise JudgeError(f"triton {model} returned malformed scores {scores!r}", retriable=False)
        return np.clip(scores, 0.0, 1.0)

    async def score(self, rollout: Rollout) -> dict[str, float]:
        rows: dict[tuple[str, str], list[str]] = {}  # (model, output) -> its distinct rows, one request each
        where: list[tuple[Principle, tuple[str, str], int]] = []
        for p in self.constitution.principles:
            model, text, output = _request_row(p, rollout.prompt, rollout.completion)
            texts = rows.setdefault((model, output), [])
            if text not in texts:  # principles sharing a classifier share its row
                texts.append(text)
            where.append((p, (model, output), texts.index(text)))
        answers = await asyncio.gather(*(self._infer(model, texts, out) for (model, out), texts in rows.items()))
        by_request = dict(zip(rows, answers, strict=True))
        return {p.id: _score(p, float(by_request[request][i])) for p, request, i in where}

    async def score_principle(
        self, principle: Principle, prompt: str, response: str, retry_for_s: float = 60.0
    ) -> float:
        """One principle's score for one (prompt, response), scored as in :meth:`score`, retried as in
        :meth:`judge` (a model still loading answers NOT_FOUND for a moment)."""
        model, text, output = _request_row(principle, prompt, response)
        async for attempt in _retrying(retry_for_s):
            with attempt:
                return _score(principle, float((await self._infer(model, [text], output))[0]))
        raise JudgeUnavailable(f"no answer for principle {principle.id} within {retry_for_s}s")

    async def judge(self, rollout: Rollout, judge_id: str, retry_for_s: float = 60.0) -> JudgedRollout:
        """Score one rollout, retrying retriable failures for up to ``retry_for_s`` seconds: long enough to
        ride out a Triton restart (~14 s here) so rollouts that arrive meanwhile are judged, not dead-lettered."""
        started = time.perf_counter()
        scores: dict[str, float] | None = None
        async for attempt in _retrying(retry_for_s):
            with attempt:
                scores = await self.score(rollout)
        assert scores is not None
        return JudgedRollout(
            rollout=rollout,
            constitution_id=self.constitution.constitution_id,
            constitution_version=self.constitution.version,
            judge_model=self.judge_model_name,
            scores=scores,
            reward=aggregate_reward(self.constitution, scores),
            judge_latency_s=time.perf_counter() - started,
            judge_id=judge_id,
        )


def _request_row(principle: Principle, prompt: str, completion: str) -> tuple[str, str, str]:
    """(Triton model, input row, output tensor) that scores ``principle`` for one completion."""
    if principle.scorer == "llm":
        return JUDGE_MODEL, render_judge_question(principle, prompt, completion), "p_yes"
    if principle.scorer == "head":
        return HEADS_MODEL, render_head_row(principle, prompt, completion), "p_consistent"
    return str(principle.classifier), completion, "p_toxic"


def _score(principle: Principle, answer: float) -> float:
    """The principle's score from its model's answer: a classifier answers P(toxic), the others P(consistent)."""
    return 1.0 - answer if principle.scorer == "classifier" else answer


def _retrying(retry_for_s: float) -> Any:
    """Retriable judge failures (Triton down, restarting, a model loading) with backoff and jitter."""
    return stamina.retry_context(
        on=lambda exc: isinstance(exc, JudgeError) and exc.retriable,
        attempts=None,
        timeout=retry_for_s,
        wait_initial=0.2,
        wait_max=5.0,
        wait_jitter=0.5,
    )
