"""Kafka connection settings, identical for the embedded Tansu broker and Apache Kafka in production."""

from __future__ import annotations

import ssl
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaConfig(BaseSettings):
    """``RLAIF_KAFKA_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="RLAIF_KAFKA_", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "rlaif."
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # Tansu holds JoinGroup for session_timeout/2, so short sessions keep rebalances fast.
    session_timeout_ms: int = Field(default=10_000, ge=6_000)
    heartbeat_interval_ms: int = 1_000
    request_timeout_ms: int = 30_000
    max_request_size: int = 8 * 1024 * 1024
    replication_factor: int = Field(default=1, ge=1)

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        from streams._topics import validate_topic_name

        if value:
            validate_topic_name(value + "x")
        return value

    def client_kwargs(self) -> dict[str, Any]:
        """Connection kwargs shared by aiokafka producers, consumers and admin clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            context = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            kwargs["ssl_context"] = context
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kwargs
