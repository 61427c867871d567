"""What every suite shares: the report shape, percentiles, a realistic rollout, and the table printer.

A report is a list of *rows*; each row compares the project's path (``project``) with a baseline measured in
the same run (``baseline``) and states their ``ratio``. Absolute numbers depend on the machine; the ratios
are what judge the project.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from schemas import Rollout, SamplingParams, new_id


@dataclass
class Row:
    metric: str
    project: float
    baseline: float | None = None
    unit: str = ""
    ratio: float | None = None
    ratio_meaning: str = ""  # how to read the ratio, e.g. "project / raw (lower is better)"
    note: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline not in (None, 0.0):
            assert self.baseline is not None
            self.ratio = self.project / self.baseline


@dataclass
class Report:
    suite: str
    quick: bool
    device: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    wall_seconds: float = 0.0

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "quick": self.quick,
            "device": self.device,
            "machine": machine_info(),
            "started_at": self.started_at,
            "wall_seconds": round(self.wall_seconds, 2),
            "rows": [asdict(r) for r in self.rows],
            "details": self.details,
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a project dependency
        info["cuda"] = None
    return info


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (``q`` in 0..100) of a non-empty sample."""
    if not values:
        return math.nan
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def realistic_rollout(
    prompt_tokens: int = 60, completion_tokens: int = 40, *, seq: int = 0, group_size: int = 1
) -> Rollout:
    """A rollout the size the default profile produces (~60 prompt tokens, ~40 completion tokens).

    Rollouts ``seq // group_size`` share a prompt, as the G completions of one generator group do; texts differ
    from the first word otherwise, so no judge question shares more with another than a real run's would.
    """
    words = ["the", "policy", "answers", "politely", "and", "explains", "why", "kafka", "helps", "here"]
    group = seq // group_size
    prompt = f"Request {group}: " + " ".join(words[(i + group) % len(words)] for i in range(prompt_tokens))
    completion = f"Answer {seq}: " + " ".join(words[(i * 3 + seq) % len(words)] for i in range(completion_tokens))
    return Rollout(
        rollout_id=new_id(),
        group_id=new_id(),
        group_size=4,
        prompt_id=f"bench-{seq}",
        prompt=prompt,
        completion=completion,
        prompt_token_ids=[(i * 7919 + group) % 49152 for i in range(prompt_tokens)],
        completion_token_ids=[(i * 104729 + seq) % 49152 for i in range(completion_tokens)],
        behaviour_logprobs=[-((i % 13) + 1) * 0.173 for i in range(completion_tokens)],
        policy_version=seq % 7,
        generator_id="bench-gen",
        sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=completion_tokens, seed=seq),
    )


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2e}"


HEADERS = ("metric", "project", "baseline", "unit", "ratio", "ratio meaning", "note")


def table_rows(report: Report) -> list[tuple[str, ...]]:
    return [
        (r.metric, _fmt(r.project), _fmt(r.baseline), r.unit, _fmt(r.ratio), r.ratio_meaning, r.note)
        for r in report.rows
    ]


def markdown_table(report: Report) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    return "\n".join(lines)


def print_report(report: Report, *, plain: bool = False) -> None:
    """A rich table on a terminal, the markdown table otherwise (or when ``plain``)."""
    title = (
        f"bench {report.suite} ({'quick' if report.quick else 'full'}, {report.device}, {report.wall_seconds:.0f} s)"
    )
    if plain:
        print(f"### {title}\n\n{markdown_table(report)}")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        print(f"### {title}\n\n{markdown_table(report)}")
        return
    table = Table(title=title)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for cells in table_rows(report):
        table.add_row(*cells)
    console.print(table)
