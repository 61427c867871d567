"""The one exception tree of rlaif.

Every error the project raises on purpose derives from :class:`RlaifError` and says whether retrying the
same operation can help (``retriable``)::

    RlaifError
    ├── ConfigError              bad settings, constitution or profile (not retriable)
    ├── SchemaError              an event that does not decode or validate (not retriable: dead-letter it)
    │   └── UnknownSchemaVersion an event from a newer producer than this consumer understands
    ├── IntegrityError           weights whose sha256, size, shapes or dtypes are wrong (not retriable)
    ├── TransportError           Kafka unreachable, timeouts, broker errors (retriable)
    ├── JudgeError               the judge could not score a rollout (retriable; dead-lettered when retries run out)
    │   └── JudgeUnavailable     Triton down or the circuit breaker open (retriable)
    └── ServiceError             a supervised process failed to start or stop (not retriable)
"""

from __future__ import annotations


class RlaifError(Exception):
    """Base of every error rlaif raises on purpose."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class ConfigError(RlaifError):
    """Settings, constitution or profile are invalid."""


class SchemaError(RlaifError):
    """An event failed to decode or validate."""


class UnknownSchemaVersion(SchemaError):
    """An event carries a schema_version newer than this code understands."""


class IntegrityError(RlaifError):
    """Weights failed verification (checksum, truncation, shapes or dtypes)."""


class TransportError(RlaifError):
    """Kafka could not be reached or refused a request."""

    retriable = True


class JudgeError(RlaifError):
    """The judge failed to score a rollout."""

    retriable = True


class JudgeUnavailable(JudgeError):
    """Triton is unreachable or the circuit breaker is open."""


class ServiceError(RlaifError):
    """A supervised process failed to start or stop."""
