"""Tests for the pure-torch port of toxic-comment-classifier==0.3.0 (services/triton/_toxicity.py).

Reference values below were produced by the *original* package (``ToxicCommentClassifier().classify``)
running on TensorFlow 2.21.0 / Keras 3.15.1 (CPU) in a throwaway venv.  Over 34 varied sentences and
512 random token sequences the port matched it to a max abs difference of 2.4e-7; the tolerance here
is the 1e-3 asked for, to stay robust to other CPUs / BLAS builds.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from services.triton._toxicity import (
    LABELS,
    KerasTokenizer,
    ToxicityClassifier,
    package_model_dir,
)

INSULTS = [
    "You are an idiot and a moron.",
    "Shut up, you pathetic loser.",
    "What a stupid, worthless piece of garbage you are.",
    "Go to hell, you ignorant fool.",
    "fuck you asshole",
]
BENIGN = [
    "Thank you for your help with the article, I really appreciate the edits.",
    "Could you please add a citation for this claim?",
    "The weather in Paris is lovely in spring.",
    "I disagree with your revert, let's discuss it on the talk page.",
    "Great job on the cleanup, the references look much better now.",
]

# text -> Keras probabilities in LABELS order (toxic, severe_toxic, obscene, threat, insult, identity_hate)
KERAS_REFERENCE: dict[str, list[float]] = {
    "You are so dumb and stupid!": [0.98894, 0.0725677, 0.620429, 0.0193484, 0.866407, 0.0407295],
    "I hate you so much!": [0.556558, 0.00552653, 0.0464967, 0.0207058, 0.131008, 0.076697],
    "Have a nice day :)": [0.0416102, 0.000328123, 0.0122548, 0.0002314, 0.0130209, 0.00165764],
    "You are an idiot and a moron.": [0.997519, 0.268625, 0.95896, 0.0133216, 0.945847, 0.0650127],
    "I will kill you if you revert my edit again.": [
        0.432973,
        0.0136003,
        0.0689465,
        0.0656178,
        0.144983,
        0.0494086,
    ],
    "fuck you asshole": [0.999091, 0.490849, 0.992254, 0.01129, 0.928863, 0.056606],
    "Gay people are disgusting freaks.": [0.966213, 0.0765925, 0.473742, 0.0347705, 0.629535, 0.576474],
    # no known word -> all-padding input
    "": [0.067534, 0.00237295, 0.0293819, 0.00100565, 0.0153553, 0.00400619],
    # Keras splits on " " only: "\r" and NBSP glue words together -> unknown -> same as ""
    "hello\rworld you\u00a0idiot": [0.067534, 0.00237295, 0.0293819, 0.00100565, 0.0153553, 0.00400619],
    # 151 tokens, truncated from the front: "idiot" survives
    "the " * 150 + "idiot": [0.863938, 0.0521118, 0.561706, 0.0234774, 0.573311, 0.0669125],
}


@pytest.fixture(scope="module")
def clf() -> ToxicityClassifier:
    return ToxicityClassifier()


def test_labels(clf: ToxicityClassifier) -> None:
    assert clf.labels == ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
    assert clf.labels == LABELS


def test_shape_dtype_range(clf: ToxicityClassifier) -> None:
    texts = INSULTS + BENIGN + [""]
    probs = clf.predict(texts)
    assert probs.shape == (len(texts), 6)
    assert probs.dtype == np.float32
    assert np.all((probs >= 0.0) & (probs <= 1.0))
    p = clf.p_toxic(texts)
    assert p.shape == (len(texts),)
    assert p.dtype == np.float32
    np.testing.assert_array_equal(p, probs.max(axis=1))
    assert clf.predict([]).shape == (0, 6)
    assert clf.p_toxic([]).shape == (0,)


def test_insults_score_far_above_benign(clf: ToxicityClassifier) -> None:
    # measured against Keras: insults p_toxic 0.983..0.999, benign 0.0020..0.0054
    insult = clf.p_toxic(INSULTS)
    benign = clf.p_toxic(BENIGN)
    assert insult.mean() > 0.9
    assert insult.min() > 0.8
    assert benign.mean() < 0.05
    assert benign.max() < 0.1


def test_matches_keras_reference(clf: ToxicityClassifier) -> None:
    texts = list(KERAS_REFERENCE)
    expected = np.array([KERAS_REFERENCE[t] for t in texts], dtype=np.float32)
    np.testing.assert_allclose(clf.predict(texts), expected, atol=1e-3, rtol=0)


def test_batching_does_not_change_results(clf: ToxicityClassifier) -> None:
    texts = INSULTS + BENIGN
    small = ToxicityClassifier(batch_size=3)
    np.testing.assert_allclose(small.predict(texts), clf.predict(texts), atol=1e-6, rtol=0)


def test_tokenisation_matches_keras(clf: ToxicityClassifier) -> None:
    # ids recorded from tokenizer.texts_to_sequences + pad_sequences(maxlen=100) in Keras
    ids = clf.encode(
        [
            "You are so dumb and stupid!",
            "Numbers 123 and 2023 and e-mail foo@bar.com http://example.com/stupid",
            "the " * 150 + "idiot",
            "idiot " + "the " * 150,
        ]
    )
    assert ids.shape == (4, 100)
    assert ids.dtype == np.int64
    assert ids[0, :94].tolist() == [0] * 94  # pre-padding
    assert ids[0, 94:].tolist() == [6, 19, 37, 1753, 4, 604]
    assert ids[1, 87:].tolist() == [988, 3881, 4, 4, 311, 1364, 9926, 2212, 237, 179, 320, 237, 604]
    assert ids[2, -1] == 1005 and set(ids[2, :-1].tolist()) == {1}  # pre-truncation keeps the tail
    assert set(ids[3].tolist()) == {1}
    assert int(ids.max()) < 20000


def test_restricted_unpickler_rejects_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    bad = tmp_path / "tokenizer.pickle"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.print is not allowed"):
        KerasTokenizer.from_package_file(bad, check_sha256=False)
    with pytest.raises(ValueError, match="sha256"):
        KerasTokenizer.from_package_file(bad)


def test_package_files_located_without_importing_tensorflow() -> None:
    import sys

    model_dir = package_model_dir()
    assert (model_dir / "model.weights.h5").is_file()
    assert "toxic_classifier" not in sys.modules
    assert "tensorflow" not in sys.modules
