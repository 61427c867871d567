"""bench learning's bookkeeping: the async run is read from complete eval rounds, and the summary is written."""

from __future__ import annotations

import json
from pathlib import Path

from services._bench_learning import async_timeline, summarize


def _round(eval_round: int, version: int, reward: float, by_prompt: dict[str, float]) -> dict[str, object]:
    return {
        "eval_round": eval_round,
        "policy_version": version,
        "reward": reward,
        "by_principle": {"a": reward},
        "reward_by_prompt": by_prompt,
    }


def test_async_timeline_uses_complete_eval_rounds_not_per_version_slices(tmp_path: Path) -> None:
    up_report = {
        "eval_results": [_round(5, 7, 0.35, {"p1": 0.30, "p2": 0.40}), _round(0, 0, 0.33, {"p1": 0.26, "p2": 0.40})],
        # a version that held two of a round's eight answers: noisy, and not a round
        "eval_reward_by_version": {"0": {"reward": 0.33}, "6": {"reward": 0.27}, "7": {"reward": 0.40}},
        "eval_seen_at": {"0": 60.0, "6": 300.0, "7": 320.0},
    }
    timeline = async_timeline(up_report)
    assert [(p["eval_round"], p["policy_version"], p["reward"], p["t"]) for p in timeline] == [
        (0, 0, 0.33, 60.0),
        (5, 7, 0.35, 320.0),
    ]

    sync = [{"t": 30.0, "step": 0, "policy_version": 0, "reward": 0.33, "by_principle": {"a": 0.33}}]  # an old report
    result = {
        "async": {"eval_timeline": timeline, "kl_last": 0.01},
        "sync": {"eval_timeline": [*sync, {**sync[0], "t": 200.0, "step": 5, "reward": 0.36}]},
    }
    report = tmp_path / "learning.json"
    summarize(result, report)
    written = json.loads(report.read_text())
    assert (written["eval_reward_first"], written["eval_reward_last"]) == (0.33, 0.35)
    assert (written["sync_eval_reward_first"], written["sync_eval_reward_last"]) == (0.33, 0.36)
    assert written["kl_last"] == 0.01 and written["eval_reward_by_version"] == {"0": 0.33, "7": 0.35}
    # the gain prompt by prompt: p1 +0.04, p2 +0.00, so a mean of +0.02 and a standard error of 0.02
    gain = written["eval_gain_paired"]
    assert (gain["n"], round(gain["gain"], 6), round(gain["stderr"], 6)) == (2, 0.02, 0.02)
    assert written["sync_eval_gain_paired"] == {"gain": None, "stderr": None, "n": 0}  # no per-prompt rewards
    assert report.with_suffix(".png").stat().st_size > 10_000
