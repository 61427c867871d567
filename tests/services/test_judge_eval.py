"""``rlaif judge-eval`` against a real tritonserver (tiny judge): every line scored, the report's shape."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from schemas import ConfigError
from services._judge_eval import judge_eval, load_items
from services._settings import Settings

DATA = Path(__file__).resolve().parents[2] / "services" / "data" / "judge_eval.jsonl"


def _two_per_principle_and_label(tmp_path: Path) -> Path:
    picked: dict[tuple[str, int], list[str]] = {}
    for line in DATA.read_text().splitlines():
        row = json.loads(line)
        bucket = picked.setdefault((row["principle"], row["label"]), [])
        if len(bucket) < 2:
            bucket.append(line)
    path = tmp_path / "subset.jsonl"
    path.write_text("\n".join(line for lines in picked.values() for line in lines) + "\n")
    return path


async def test_judge_eval_scores_every_line_through_triton(
    tiny_settings: Settings, triton_tiny: str, tmp_path: Path
) -> None:
    data = _two_per_principle_and_label(tmp_path)
    report = await judge_eval(tiny_settings, data, triton_tiny)

    assert report["n"] == 20
    assert set(report["by_principle"]) == {"concise", "harmless", "helpful", "honest", "respectful"}
    for row in report["by_principle"].values():
        assert row["n"] == 4 and 0.0 <= row["auc"] <= 1.0
        assert 0.0 <= row["mean_score_consistent"] <= 1.0 and 0.0 <= row["mean_score_inconsistent"] <= 1.0
    gaps = {pid: r["mean_score_consistent"] - r["mean_score_inconsistent"] for pid, r in report["by_principle"].items()}
    weights = {"harmless": 1.0, "honest": 1.0, "respectful": 0.8, "helpful": 0.8, "concise": 0.4}
    want = sum(weights[p] * g for p, g in gaps.items()) / sum(weights.values())
    assert math.isclose(report["reward_gap"], want, abs_tol=1e-6)


def test_judge_eval_refuses_unlabelled_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r", "principle": "t", "label": 2}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1"):
        load_items(bad)
