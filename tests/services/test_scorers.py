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


def _questions() -> tuple[list[str], list[tuple[str, int]]]:
    """The judge questions about 2 prompts x 2 completions each (as a generator group publishes them), one
    per llm principle, plus one unrelated row; and (principle, prompt) for each question."""
    constitution = load_constitution(Settings().constitution)
    llm = [p for p in constitution.principles if p.scorer != "classifier"]  # every principle an LM can judge
    rollouts = [realistic_rollout(prompt_tokens=40, completion_tokens=20, seq=i, group_size=2) for i in range(4)]
    questions = [render_judge_question(p, r.prompt, r.completion) for r in rollouts for p in llm]
    about = [(p.id, i // 2) for i in range(len(rollouts)) for p in llm]
    return [*questions, "Is this short question fine?"], [*about, ("none", -1)]


@pytest.mark.parametrize("render_mode", ["plain", "chat"])
def test_shared_prefix_scores_equal_the_padded_batch(tiny_settings: Settings, render_mode: str) -> None:
    judge = LlmJudge.from_pretrained(
        prepare_model(tiny_settings.judge_model, tiny_settings.cache_dir), render_mode=render_mode
    )
    questions, about = _questions()
    groups = prefix_groups(judge.token_rows(questions), judge.min_shared_tokens)
    shared = [members for prefix, members in groups if prefix]
    # the default template puts the principle before the conversation: the questions that share a prefix worth
    # computing once are one principle's questions about the completions of one prompt
    assert len(shared) == 8 and all(len(m) == 2 and about[m[0]] == about[m[1]] for m in shared), groups
    assert sorted(i for _, m in groups for i in m) == list(range(len(questions)))

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
