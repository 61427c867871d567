"""The faust app factory: settings that work on Tansu and Apache Kafka alike."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust
from faust.types.auth import SASLMechanism

from streams._config import KafkaConfig


def make_app(app_id: str, cfg: KafkaConfig, *, web_port: int, datadir: Path, **overrides: Any) -> faust.App:
    """A faust app with raw-bytes topics (our codecs decode them) and short group sessions.

    faust binds its web port even with the web server disabled, so each worker needs its own ``web_port``;
    it also creates ``datadir`` (default: ``<app id>-data`` in the working directory, so pass one in the run dir).
    Critical state stays out of faust Tables: table recovery after crashes skipped messages on Tansu.
    """
    credentials: Any = None
    if cfg.security_protocol.startswith("SASL"):
        credentials = faust.SASLCredentials(
            username=cfg.sasl_username or "",
            password=cfg.sasl_password.get_secret_value() if cfg.sasl_password else "",
            mechanism=SASLMechanism(cfg.sasl_mechanism or "PLAIN"),
            ssl_context=cfg.client_kwargs().get("ssl_context"),
        )
    elif cfg.security_protocol == "SSL":
        credentials = faust.SSLCredentials(cfg.client_kwargs()["ssl_context"])
    settings: dict[str, Any] = {
        "broker": ";".join(f"kafka://{h}" for h in cfg.bootstrap_servers.split(",")),
        "broker_credentials": credentials,
        "broker_session_timeout": cfg.session_timeout_ms / 1000,
        "broker_heartbeat_interval": cfg.heartbeat_interval_ms / 1000,
        "broker_request_timeout": max(cfg.request_timeout_ms / 1000, cfg.session_timeout_ms / 1000 + 5),
        "producer_max_request_size": cfg.max_request_size,
        "consumer_max_fetch_size": cfg.max_request_size,
        "consumer_auto_offset_reset": "earliest",
        "topic_replication_factor": cfg.replication_factor,
        "topic_allow_declare": False,
        "store": "memory://",
        "web_enabled": False,
        "web_port": web_port,
        "datadir": str(datadir),
        "web_bind": "127.0.0.1",
        "web_host": "127.0.0.1",
        "value_serializer": "raw",
        "key_serializer": "raw",
        "autodiscover": False,
    }
    settings.update(overrides)
    datadir.parent.mkdir(parents=True, exist_ok=True)  # faust creates only the last level
    return faust.App(app_id, **settings)
