"""``rlaif judge-eval``: how well does the judge the trainer uses agree with human labels?

Every labelled line is scored through the same Triton-served judge (and the same templates) as live rewards.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas import ConfigError, Principle
from services._data import load_constitution
from services._judge_client import TritonJudge
from services._settings import Settings


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve by ranks (ties count half); 0.5 when one class is absent.

    >>> roc_auc([0.1, 0.9, 0.8, 0.2], [0, 1, 1, 0])
    1.0
    >>> roc_auc([0.5, 0.5], [0, 1])
    0.5
    """
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not pos or not neg:
        return 0.5
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _summary(scores: list[float], labels: list[int]) -> dict[str, float | None]:
    """AUC, accuracy at 0.5, and the mean score of each class: what a consistent answer earns tells how much
    reward a student can gain at best (the judge's ceiling), beyond how well it ranks.

    >>> _summary([0.2, 0.6, 0.1], [1, 1, 0])["mean_score_consistent"]
    0.4
    """
    correct = sum((s >= 0.5) == (y == 1) for s, y in zip(scores, labels, strict=True))
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    return {
        "auc": roc_auc(scores, labels),
        "accuracy": correct / len(labels),
        "n": len(labels),
        "mean_score_consistent": sum(pos) / len(pos) if pos else None,
        "mean_score_inconsistent": sum(neg) / len(neg) if neg else None,
    }


def reward_gap(by_principle: dict[str, dict[str, float | None]], weights: dict[str, float]) -> float | None:
    """How far the judge's reward moves from an all-inconsistent to an all-consistent student: the weighted
    mean, over principles, of (mean score of consistent answers - mean score of inconsistent ones). No policy
    can raise its eval reward by more than about this much, whatever the learner does.

    >>> reward_gap({"a": {"mean_score_consistent": 0.9, "mean_score_inconsistent": 0.1},
    ...             "b": {"mean_score_consistent": 0.3, "mean_score_inconsistent": 0.3}}, {"a": 1.0, "b": 3.0})
    0.2
    """
    total, gap = 0.0, 0.0
    for pid, weight in weights.items():
        row = by_principle.get(pid, {})
        pos, neg = row.get("mean_score_consistent"), row.get("mean_score_inconsistent")
        if pos is None or neg is None:
            return None
        total, gap = total + weight, gap + weight * (pos - neg)
    return round(gap / total, 6) if total else None


def load_items(path: Path) -> list[dict[str, Any]]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"prompt", "response", "principle", "label"} - row.keys()
        if missing or row["label"] not in (0, 1):
            raise ConfigError(f"{path}:{n}: needs prompt, response, principle and a 0/1 label")
        items.append(row)
    return items


async def score_items(settings: Settings, items: list[dict[str, Any]], concurrency: int = 8) -> list[float]:
    constitution = load_constitution(settings.constitution)
    by_text = {p.text: p for p in constitution.principles}
    judge = TritonJudge.from_settings(settings, constitution)
    gate = asyncio.Semaphore(concurrency)

    async def one(item: dict[str, Any]) -> float:
        principle = by_text.get(item["principle"]) or Principle(id="adhoc", text=item["principle"])
        async with gate:
            return await judge.score_principle(principle, item["prompt"], item["response"])

    try:
        return list(await asyncio.gather(*(one(i) for i in items)))
    finally:
        await judge.close()


async def judge_eval(settings: Settings, data: Path, triton_url: str | None) -> dict[str, Any]:
    from services._supervisor import Supervisor, launch_triton

    items = load_items(data)
    sup = Supervisor()
    try:
        if triton_url:
            settings.triton_url = triton_url
        else:
            logs = Path(tempfile.mkdtemp(prefix="rlaif-judge-eval-"))
            await asyncio.to_thread(launch_triton, settings, sup, logs)
        scores = await score_items(settings, items)
    finally:
        await asyncio.to_thread(sup.stop_all)
    labels = [int(i["label"]) for i in items]
    by_principle: dict[str, tuple[list[float], list[int]]] = defaultdict(lambda: ([], []))
    constitution = load_constitution(settings.constitution)
    ids = {p.text: p.id for p in constitution.principles}
    for item, score in zip(items, scores, strict=True):
        key = ids.get(item["principle"], item["principle"][:40])
        by_principle[key][0].append(score)
        by_principle[key][1].append(int(item["label"]))
    per_principle = {k: _summary(s, y) for k, (s, y) in sorted(by_principle.items())}
    return {
        **_summary(scores, labels),
        "by_principle": per_principle,
        "reward_gap": reward_gap(per_principle, {p.id: p.weight for p in constitution.principles}),
        "judge_model": settings.judge_model,
        "judge_render": settings.judge_render,
        "scorers": {p.id: p.scorer for p in constitution.principles},
        "constitution_id": constitution.constitution_id,
        "data": str(data),
    }
