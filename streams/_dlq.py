"""Dead-letter routing: a record that cannot be processed is published with its reason, never dropped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import structlog

from schemas import DeadLetter, RlaifError
from streams._client import Publisher

log = structlog.get_logger(__name__)


class RecordLike(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


# A dead letter must itself fit on the dead-letter topic: an oversized poison record would otherwise make the
# DLQ send fail, crash the consumer and crash it again on every restart (a poison-pill loop).
MAX_DEAD_LETTER_PAYLOAD = 1024 * 1024


def dead_letter_for(record: RecordLike, exc: BaseException, service: str) -> DeadLetter:
    payload = record.value or b""
    message = str(exc)[:4000]
    if len(payload) > MAX_DEAD_LETTER_PAYLOAD:
        message += f" [payload truncated from {len(payload)} to the first {MAX_DEAD_LETTER_PAYLOAD} bytes]"
        payload = payload[:MAX_DEAD_LETTER_PAYLOAD]
    return DeadLetter(
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        error_type=type(exc).__name__,
        message=message,
        payload=payload,
        service=service,
        retriable=isinstance(exc, RlaifError) and exc.retriable,
    )


class DeadLetterSink:
    """Publishes DeadLetter events to the dead-letter topic and logs them with their coordinates."""

    def __init__(
        self,
        publisher: Publisher,
        topic: str,
        service: str,
        on_dead_letter: Callable[[str, str, str], None] | None = None,
    ) -> None:
        self._publisher = publisher
        self._topic = topic
        self._service = service
        self._on_dead_letter = on_dead_letter  # (service, source topic, error type), e.g. a metrics counter
        self.count = 0

    async def send(self, record: RecordLike, exc: BaseException) -> None:
        letter = dead_letter_for(record, exc, self._service)
        log.warning(
            "dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error_type=letter.error_type,
            reason=letter.message[:300],
        )
        await self._publisher.send(self._topic, letter, key=record.key)
        self.count += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter(self._service, record.topic, letter.error_type)
