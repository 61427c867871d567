"""Benchmarks that measure the project against its limits, side by side in one run (``rlaif bench SUITE``).

Every figure that judges the project is a ratio between the project's path and a baseline measured in the
same process on the same machine: raw aiokafka for the bus, unbatched Triton for the judge, disk for weight
pushes, the ideal and synchronous pipelines for the async loop. Simulated stages (``Fake*`` / ``Simulated*``)
exist only inside the pipeline suite.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

from services.bench._common import Report, Row, markdown_table, print_report

# suite name -> its coroutine in services.bench._<name>, imported on first use (each pulls in heavy modules)
_RUNNERS = {
    "bus": "run_bus",
    "judge": "run_judge",
    "weights": "run_weights",
    "pipeline": "run_pipeline",
    "e2e": "run_e2e",
    "compute": "run_compute",
}
SUITES = tuple(_RUNNERS)


def _suite(name: str) -> Callable[..., Coroutine[Any, Any, None]]:
    if name not in _RUNNERS:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}")
    runner: Callable[..., Coroutine[Any, Any, None]] = getattr(
        importlib.import_module(f"services.bench._{name}"), _RUNNERS[name]
    )
    return runner


def run_suite(name: str, *, quick: bool = False, device: str = "cpu") -> Report:
    """Run one suite to completion and return its report."""
    report = Report(suite=name, quick=quick, device=device)
    started = time.perf_counter()
    asyncio.run(_suite(name)(report, quick=quick, device=device))
    report.wall_seconds = time.perf_counter() - started
    return report


__all__ = ["SUITES", "Report", "Row", "markdown_table", "print_report", "run_suite"]
