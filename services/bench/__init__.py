"""Benchmarks that measure the project against its limits, side by side in one run (``rlaif bench SUITE``).

Every figure that judges the project is a ratio between the project's path and a baseline measured in the
same process on the same machine: raw aiokafka for the bus, unbatched Triton for the judge, disk for weight
pushes, the ideal and synchronous pipelines for the async loop. Simulated stages (``Fake*`` / ``Simulated*``)
exist only inside the pipeline suite.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from services.bench._common import Report, Row, markdown_table, print_report

SUITES = ("bus", "judge", "weights", "pipeline", "e2e", "compute")


def _suite(name: str) -> Callable[..., Coroutine[Any, Any, None]]:
    if name == "bus":
        from services.bench._bus import run_bus

        return run_bus
    if name == "judge":
        from services.bench._judge import run_judge

        return run_judge
    if name == "weights":
        from services.bench._weights import run_weights

        return run_weights
    if name == "pipeline":
        from services.bench._pipeline import run_pipeline

        return run_pipeline
    if name == "e2e":
        from services.bench._e2e import run_e2e

        return run_e2e
    if name == "compute":
        from services.bench._compute import run_compute

        return run_compute
    raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")


def run_suite(name: str, *, quick: bool = False, device: str = "cpu") -> Report:
    """Run one suite to completion and return its report."""
    report = Report(suite=name, quick=quick, device=device)
    started = time.perf_counter()
    asyncio.run(_suite(name)(report, quick=quick, device=device))
    report.wall_seconds = time.perf_counter() - started
    return report


__all__ = ["SUITES", "Report", "Row", "markdown_table", "print_report", "run_suite"]
