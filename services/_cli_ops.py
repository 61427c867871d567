"""Operator commands: ``rlaif dashboard`` (a live web view of a run)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from services._logging import configure_logging
from services._settings import Settings


def dashboard(
    port: Annotated[int, typer.Option(help="port to listen on (0 = any free port)")] = 8050,
    host: Annotated[str, typer.Option(help="address to bind; keep it on loopback unless behind a proxy")] = "127.0.0.1",
) -> None:
    """Serve a live dashboard of the run on RLAIF_KAFKA_BOOTSTRAP_SERVERS (topics under RLAIF_KAFKA_TOPIC_PREFIX)."""
    from services._dashboard import serve

    settings = Settings()
    configure_logging("dashboard")
    asyncio.run(serve(settings, host=host, port=port))


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)
