"""What every Python-backend ``model.py`` of the production model repository shares: turning Triton's requests
into one list of strings, scoring them in one call, and answering each request with its slice.

A malformed request fails alone; a scorer failure fails every request of the batch with the reason — never a
default score (the judge service retries, then dead-letters). ``pb_utils`` is Triton's
``triton_python_backend_utils``, passed in because only the backend stub can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def decode_rows(batch: np.ndarray[Any, Any]) -> list[str]:
    """BYTES tensor ``[batch, 1]`` -> one string per row, as the embedded server decodes it.

    >>> decode_rows(np.array([[b"caf\\xc3\\xa9"], ["plain"]], dtype=object))
    ['café', 'plain']
    """
    rows = batch.reshape(batch.shape[0], -1)
    return [r[0].decode("utf-8", errors="replace") if isinstance(r[0], bytes) else str(r[0]) for r in rows]


def execute(
    pb_utils: Any,
    requests: Sequence[Any],
    score: Callable[[list[str]], Any],
    *,
    model: str,
    output: str,
    input_name: str = "text",
) -> list[Any]:
    """``TritonPythonModel.execute`` for a model that maps each input string to one float."""

    def error(message: str) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))

    texts: list[str] = []
    spans: list[tuple[int, int] | str] = []
    for request in requests:
        try:
            rows = decode_rows(pb_utils.get_input_tensor_by_name(request, input_name).as_numpy())
        except Exception as exc:
            spans.append(f"{model}: bad input: {type(exc).__name__}: {exc}")
            continue
        spans.append((len(texts), len(texts) + len(rows)))
        texts.extend(rows)
    try:
        scores = np.asarray(score(texts) if texts else [], dtype=np.float32).reshape(-1, 1)
    except Exception as exc:
        message = f"{model}: {type(exc).__name__}: {exc}"
        return [error(message) for _ in requests]
    responses = []
    for span in spans:
        if isinstance(span, str):
            responses.append(error(span))
        else:
            tensor = pb_utils.Tensor(output, scores[span[0] : span[1]])
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
    return responses
