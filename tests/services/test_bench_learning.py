"""bench learning's bookkeeping: the async run is read from complete eval rounds, and the summary is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas import IntegrityError
from services._audit import policy_file
from services._bench_learning import async_timeline, eval_round, eval_tasks, evaluate_stored_policy, summarize
from services._data import load_constitution
from services._generator import Generator
from services._judge_client import TritonJudge
from services._policy import apply_weights, trainable_state
from services._settings import Settings
from streams import ensure_topics
from tests.services.helpers import publish_version


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


def test_the_closing_round_is_the_last_and_the_last_round_in_the_budget_is_kept(tmp_path: Path) -> None:
    inside = [
        {**_round(0, 0, 0.33, {"p1": 0.26, "p2": 0.40}), "t": 60.0},
        {**_round(5, 5, 0.35, {"p1": 0.30, "p2": 0.40}), "t": 1500.0},
    ]
    closing = {**_round(7, 7, 0.39, {"p1": 0.36, "p2": 0.42}), "t": 1800.0, "closing": True}
    sync = [{**r, "t": 60.0 * i} for i, r in enumerate(inside, 1)]
    result = {
        "async": {"eval_timeline": [*inside, closing], "kl_last": 0.02},
        "sync": {"eval_timeline": sync},  # its last step was evaluated inside the budget: no closing round
    }
    report = tmp_path / "learning.json"
    summarize(result, report)
    written = json.loads(report.read_text())
    assert (written["eval_reward_last"], written["eval_reward_last_in_budget"]) == (0.39, 0.35)
    assert (written["sync_eval_reward_last"], written["sync_eval_reward_last_in_budget"]) == (0.35, 0.35)
    assert round(written["eval_gain_paired"]["gain"], 6) == 0.06  # p1 +0.10, p2 +0.02: against the closing round


@pytest.mark.slow
async def test_closing_round_evaluates_the_announced_final_policy(tiny_settings: Settings, triton_tiny: str) -> None:
    """The policy a run leaves is evaluated from its file, verified against its announcement, and scores as
    the same weights held in process; a file that does not match its announcement is refused."""
    s = tiny_settings
    s.triton_url = triton_tiny
    await ensure_topics(s.kafka, s.topics.specs())
    trained = await publish_version(s, 3, lora=s.lora)
    in_process = Generator(s)
    apply_weights(in_process.model, trainable_state(trained, s.lora), s.lora)
    in_process.version = 3
    tasks = eval_tasks(s, 7)
    assert len(tasks) == s.eval_prompts
    judge = TritonJudge.from_settings(s, load_constitution(s.constitution))
    try:
        closing = await evaluate_stored_policy(s, judge, 3, 7, source="kafka")
        held = await eval_round(in_process, judge, tasks)
        policy_file(s, 3).write_bytes(policy_file(s, 3).read_bytes()[:-8] + b"tampered")
        with pytest.raises(IntegrityError):
            await evaluate_stored_policy(s, judge, 3, 7, source="kafka")
    finally:
        await judge.close()
    assert closing["policy_version"] == 3 and sorted(closing["reward_by_prompt"]) == sorted(t.prompt_id for t in tasks)
    assert closing["reward_by_prompt"] == pytest.approx(held["reward_by_prompt"], abs=1e-5)
    assert closing["reward"] == pytest.approx(held["reward"], abs=1e-5)
    # the weights moved the greedy answers: a round of the base policy would not have measured this version
    answers = [r.completion for g in in_process.generate_batch(tasks) for r in g]
    base = [r.completion for g in Generator(s).generate_batch(tasks) for r in g]
    assert answers != base
