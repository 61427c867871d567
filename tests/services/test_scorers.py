"""The LLM judge's scorer: computing a shared prefix once must give the scores of the plain padded batch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import render_judge_question
from services._data import load_constitution
from services._models import prepare_model
from services._settings import Settings
from services.bench._common import realistic_rollout
from services.triton._scorers import LlmJudge, common_prefix_len, prefix_groups


def _questions(n_rollouts: int) -> list[str]:
    constitution = load_constitution(Settings().constitution)
    llm = [p for p in constitution.principles if p.scorer == "llm"]
    rollouts = [realistic_rollout(prompt_tokens=20 + 7 * i, completion_tokens=15 + 3 * i, seq=i) for i in range(3)]
    qs = [render_judge_question(p, r.prompt, r.completion) for r in rollouts[:n_rollouts] for p in llm]
    return [*qs, "Is this short question fine?"]  # one row that shares nothing


@pytest.mark.parametrize("render_mode", ["plain", "chat"])
def test_shared_prefix_scores_equal_the_padded_batch(tiny_settings: Settings, render_mode: str) -> None:
    judge = LlmJudge.from_pretrained(
        prepare_model(tiny_settings.judge_model, tiny_settings.cache_dir), render_mode=render_mode
    )
    questions = _questions(3)
    groups = prefix_groups(judge.token_rows(questions), judge.min_shared_tokens)
    shared = [members for prefix, members in groups if prefix]
    # the questions about each rollout form one group; the odd row goes alone
    assert sorted(len(m) for m in shared) == [4, 4, 4] and sum(len(m) for _, m in groups) == len(questions)

    judge.share_prefixes = False
    padded = judge.score(questions)
    one_by_one = np.concatenate([judge.score([q]) for q in questions])
    judge.share_prefixes = True
    fast = judge.score(questions)
    assert np.abs(fast - padded).max() < 1e-4
    assert np.abs(fast - one_by_one).max() < 1e-4
    assert judge.score([]).shape == (0,)


rows_strategy = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=24)


@settings(max_examples=300, deadline=None)
@given(rows=rows_strategy, min_shared=st.integers(1, 4))
def test_prefix_groups_partition_rows_and_leave_every_row_a_suffix(rows: list[list[int]], min_shared: int) -> None:
    groups = prefix_groups(rows, min_shared)
    assert sorted(i for _, members in groups for i in members) == list(range(len(rows)))
    for prefix, members in groups:
        if prefix == 0:
            assert len(members) == 1
            continue
        assert prefix >= min_shared and len(members) > 1
        first = rows[members[0]]
        for i in members:
            assert len(rows[i]) > prefix  # a token of its own to read the answer at
            assert common_prefix_len(first, rows[i]) >= prefix
    # never more token positions than scoring every row alone
    cost = sum(sum(len(rows[i]) for i in m) - (len(m) - 1) * p for p, m in groups)
    assert cost <= sum(len(r) for r in rows)
