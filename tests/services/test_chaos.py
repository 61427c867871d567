"""Chaos, short form: two tiny runs with random SIGKILLs of services; the effectively-once accounting must hold.

The long form (``rlaif chaos --runs 20``) and its figures are in docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services._chaos import chaos, check_invariants

GOOD = {
    "rollouts_judged": 10,
    "learner_trained": 6,
    "learner_unique": 6,
    "learner_dropped_stale": 1,
    "learner_pending_at_exit": 3,
    "lost": 0,
    "double_counted": 0,
}


def test_invariants_accept_a_consistent_report_and_name_each_violation() -> None:
    assert check_invariants(GOOD) == []
    assert check_invariants({**GOOD, "learner_trained": 7, "double_counted": 1}) == [
        "learner_trained 7 != learner_unique 6",
        "double_counted 1",
    ]
    assert check_invariants({**GOOD, "learner_pending_at_exit": 2, "lost": 1, "lost_ids": ["r"]}) == [
        "rollouts_judged 10 != trained+dropped+pending 9",
        "lost 1: ['r']",
    ]
    assert check_invariants({"learner_trained": 1}) != []


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_runs_with_kills_lose_and_double_count_nothing(tmp_path: Path) -> None:
    summary = chaos(2, tmp_path, steps=4, seed=7, max_kills=2, gap_s=(2.0, 6.0), timeout_s=180)
    assert summary["runs"] == 2
    assert summary["kills_total"] >= 2, summary["details"]
    assert summary["lost"] == 0 and summary["double_counted"] == 0
    assert summary["runs_ok"] == 2, [d["violations"] for d in summary["details"]]
