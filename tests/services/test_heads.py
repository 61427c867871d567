"""Principle heads (services/triton/_heads.py) on the real all-MiniLM-L6-v2 encoder from its wheel, and on the
judge LM's hidden states (the tiny judge: plumbing)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from schemas import ConfigError, Principle, render_head_row
from services.triton import _heads
from services.triton._heads import (
    Example,
    PrincipleHeads,
    SentenceEncoder,
    ensure_heads,
    fit_heads,
    load_heads,
    read_examples,
    save_heads,
)
from tests.conftest import CACHE

# A head that must learn "answers the question" (1) from "refuses a benign question" (0): separable by the
# response text alone, so cross-validation must find it.
QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is 7 times 8?", "7 times 8 is 56."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
    ("What gas do plants absorb?", "Plants absorb carbon dioxide from the air."),
    ("How do I boil an egg?", "Put the egg in boiling water for about nine minutes, then cool it in cold water."),
    ("What does CPU stand for?", "CPU stands for central processing unit."),
    ("How far is the Moon?", "The Moon is about 384,000 kilometres from Earth on average."),
]
REFUSALS = [
    "I'm sorry, but I can't help with that request.",
    "I would rather not answer that. Please ask someone else.",
    "That's not something I can discuss.",
    "I can't assist with this. Maybe try a search engine.",
    "Sorry, I'm unable to provide that information.",
    "Why do you want to know? I won't answer.",
    "I prefer not to respond to questions like this one.",
    "Unfortunately I cannot help you with that.",
]


def _examples(head: str = "helpful") -> list[Example]:
    good = [Example(head, q, a, 1) for q, a in QUESTIONS]
    bad = [Example(head, q, r, 0) for (q, _), r in zip(QUESTIONS, REFUSALS, strict=True)]
    return good + bad


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


def _write(path: Path, examples: list[Example]) -> Path:
    lines = [
        json.dumps({"principle_id": e.head, "prompt": e.prompt, "response": e.response, "label": e.label})
        for e in examples
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_embeddings_are_unit_vectors_of_the_model_width(encoder: SentenceEncoder) -> None:
    emb = encoder.embed(["hello world", "a much longer sentence about something else entirely"])
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_a_head_learns_refusals_from_answers_and_scores_unseen_text(encoder: SentenceEncoder) -> None:
    heads = fit_heads(_examples(), encoder)
    assert set(heads) == {"helpful"} and heads["helpful"].n == 16
    assert heads["helpful"].cv_auc >= 0.9
    scorer = PrincipleHeads(heads, encoder)
    p = Principle(id="helpful", text="Answer benign requests.", scorer="head")
    answer, refusal = scorer.score(
        [
            render_head_row(p, "What colour is the sky?", "The sky looks blue because air scatters blue light most."),
            render_head_row(p, "What colour is the sky?", "I'm afraid I can't answer questions like that."),
        ]
    )
    assert 0.0 < refusal < answer < 1.0


def test_saved_heads_score_exactly_like_the_fitted_ones(tmp_path: Path, encoder: SentenceEncoder) -> None:
    heads = fit_heads(_examples(), encoder)
    save_heads(heads, tmp_path / "h.safetensors", data_sha256="x")
    loaded = load_heads(tmp_path / "h.safetensors")
    rows = [render_head_row(Principle(id="helpful", text="t", scorer="head"), q, a) for q, a in QUESTIONS[:3]]
    np.testing.assert_array_equal(
        PrincipleHeads(heads, encoder).score(rows), PrincipleHeads(loaded, encoder).score(rows)
    )
    assert loaded["helpful"].cv_auc == heads["helpful"].cv_auc


def test_bad_rows_score_nan_never_a_default(encoder: SentenceEncoder) -> None:
    scorer = PrincipleHeads(fit_heads(_examples(), encoder), encoder)
    good = render_head_row(Principle(id="helpful", text="t", scorer="head"), "Hi?", "Hello!")
    unknown = render_head_row(Principle(id="nobody", text="t", scorer="head"), "Hi?", "Hello!")
    scores = scorer.score(["not json", json.dumps({"head": "helpful"}), unknown, good])
    assert [math.isnan(s) for s in scores] == [True, True, True, False]


def test_heads_are_trained_once_per_training_set(
    tmp_path: Path, encoder: SentenceEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write(tmp_path / "train.jsonl", _examples())
    first = ensure_heads(tmp_path / "cache", data, encoder)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("retrained although the training data did not change")

    monkeypatch.setattr(_heads, "fit_heads", refuse)
    assert ensure_heads(tmp_path / "cache", data, encoder) == first
    # new data, new heads file
    _write(data, _examples("concise"))
    monkeypatch.undo()
    second = ensure_heads(tmp_path / "cache", data, encoder)
    assert second != first and set(load_heads(second)) == {"concise"}


def test_a_head_without_enough_of_each_label_is_refused(encoder: SentenceEncoder) -> None:
    with pytest.raises(ConfigError, match="at least 5 examples of each label"):
        fit_heads(_examples()[:10], encoder)


def test_a_bad_training_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"principle_id": "a", "prompt": "p", "response": "r", "label": 1}\n{"prompt": "p"}\n')
    with pytest.raises(ConfigError, match=r"t\.jsonl:2"):
        read_examples(path)


def test_the_shipped_training_set_is_apart_from_the_eval_set() -> None:
    """No (prompt, response) of the labelled evaluation sets may appear in the training set, and no eval-split
    prompt of the student may be trained on."""
    data = Path(_heads.__file__).resolve().parents[1] / "data"
    train = read_examples(data / "judge_train.jsonl")
    evaluation = [
        json.loads(line)
        for name in (
            "judge_eval.jsonl",
            "judge_eval_student.jsonl",
            "judge_eval_refusals.jsonl",
            "judge_eval_lists.jsonl",
            "judge_eval_samples.jsonl",
        )
        for line in (data / name).read_text().splitlines()
        if line.strip()
    ]
    eval_prompts = {
        json.loads(line)["text"]
        for line in (data / "prompts.jsonl").read_text().splitlines()
        if line.strip() and json.loads(line)["split"] == "eval"
    }
    train_pairs = {(e.prompt, e.response) for e in train}
    assert not train_pairs & {(e["prompt"], e["response"]) for e in evaluation}
    assert not {e.prompt for e in train} & eval_prompts


async def test_through_triton_a_head_scores_and_an_untrained_one_is_refused(triton_tiny: str) -> None:
    """The judge client against the real ``principle_heads`` model: a trained head answers a probability; a
    principle whose head was never trained fails the rollout with a non-retriable error (dead letter), not a
    made-up score."""
    from schemas import Constitution, JudgeError
    from services._judge_client import TritonJudge
    from tests.factories import make_rollout

    rollout = make_rollout(completion="Paris is the capital of France.")
    concise = Principle(id="concise", text="Be concise.", scorer="head")
    known = Constitution(id="c", version=1, principles=[concise])
    judge = TritonJudge(url=triton_tiny, constitution=known, judge_model_name="tiny-judge")
    try:
        scores = await judge.score(rollout)
    finally:
        await judge.close()
    assert set(scores) == {"concise"} and 0.0 < scores["concise"] < 1.0

    unknown = Constitution(id="c", version=1, principles=[concise, Principle(id="mystery", text="?", scorer="head")])
    judge = TritonJudge(url=triton_tiny, constitution=unknown, judge_model_name="tiny-judge")
    try:
        with pytest.raises(JudgeError, match="malformed scores") as caught:
            await judge.score(rollout)
    finally:
        await judge.close()
    assert not caught.value.retriable


def test_the_judge_lm_encoder_stops_at_its_layer_and_pools_the_conversation_and_the_response() -> None:
    """Layers above ``head_layer`` are dropped, and what is left equals the full model's hidden state there
    (before the final norm), averaged over the tokens of the rendered conversation, then over the response's."""
    import torch
    from transformers import AutoModel

    from services._models import prepare_model
    from services.triton._lm_encoder import LmPairEncoder

    path = prepare_model("tiny-judge", CACHE)
    enc = LmPairEncoder.from_pretrained(path, "tiny-judge", layer=1)
    assert len(enc.model.layers) == 1 and enc.recipe["encoder"] == "tiny-judge@layer1"
    pairs = [("What is 2+2?", "4."), ("Name a colour.", "Blue, like the sky on a clear day.")]
    got = enc.pair_features(pairs)
    full = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    for row, (prompt, response) in enumerate(pairs):
        ids = enc.tokenizer(enc.render(prompt, response), return_tensors="pt")
        with torch.no_grad():
            hidden = full(**ids, output_hidden_states=True).hidden_states[1][0]
        # the response's tokens, found by tokenizing what precedes it: the rendering ends with the response
        n_before = len(enc.tokenizer(enc.render(prompt, response)[: -len(response)])["input_ids"])
        width = hidden.shape[-1]
        np.testing.assert_allclose(got[row, :width], hidden.mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[row, width:], hidden[n_before:].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    shallower = LmPairEncoder.from_pretrained(path, "tiny-judge", layer=99)
    assert shallower.layer == len(full.layers)  # a model with fewer layers: all of them


def test_the_judge_lm_encoder_runs_each_distinct_conversation_once() -> None:
    """A rollout's rows for several heads share one (request, response): the LM reads it once, and every row
    gets the same features as when it is encoded alone."""
    from services._models import prepare_model
    from services.triton._lm_encoder import LmPairEncoder

    enc = LmPairEncoder.from_pretrained(prepare_model("tiny-judge", CACHE), "tiny-judge", layer=1)
    rows_read: list[int] = []
    enc.model.register_forward_hook(
        lambda _m, args, kwargs, _out: rows_read.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    a, b = ("What is 2+2?", "4."), ("Name a colour.", "Blue.")
    got = enc.pair_features([a, b, a, a, b])
    assert sum(rows_read) == 2
    np.testing.assert_allclose(got, enc.pair_features([a, b])[[0, 1, 0, 0, 1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0], enc.pair_features([a])[0], rtol=1e-4, atol=1e-5)
    assert enc.pair_features([]).shape == (0, 2 * enc.model.config.hidden_size)


def test_heads_are_served_only_with_the_features_they_were_trained_on(tmp_path: Path) -> None:
    from services._settings import Settings

    settings = Settings(profile="tiny", cache_dir=tmp_path)
    data = _write(tmp_path / "train.jsonl", _examples())
    scorer = PrincipleHeads.from_cache(tmp_path, data=data, settings=settings)
    assert scorer.encoder.recipe["encoder"].startswith("tiny-judge@layer")
    row = render_head_row(Principle(id="helpful", text="t", scorer="head"), "Hi?", "Hello!")
    assert 0.0 < scorer.score([row])[0] < 1.0
    trained = ensure_heads(tmp_path, data, scorer.encoder)
    with pytest.raises(ConfigError, match="heads for"):
        load_heads(trained, {"encoder": "all-MiniLM-L6-v2", "features": _heads.FEATURES})
    # the MiniLM recipe is another cache entry, trained on its own
    as_before = settings.model_copy(update={"head_encoder": "minilm"})
    minilm = PrincipleHeads.from_cache(tmp_path, data=data, settings=as_before)
    assert minilm.encoder.recipe == _heads.MINILM_RECIPE
    assert ensure_heads(tmp_path, data, minilm.encoder) != trained
    # what a run report records: the file Triton serves, the data it was trained on, the recipe
    identity = _heads.heads_identity(settings.model_copy(update={"heads_data": data}))
    assert identity["file"] == trained.name
    assert identity["data_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert (identity["encoder"], identity["features"]) == tuple(scorer.encoder.recipe.values())
    assert set(identity["cv_auc"]) == set(load_heads(trained))
