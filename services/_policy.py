"""The student policy as both the learner and the generators hold it, and its weights on the wire.

Both sides build the same model from the same source (same base weights, same LoRA layout), so a
PolicyUpdate only has to carry the trainable tensors: the LoRA adapter (small) or every weight (full mode).
Weights travel as safetensors — never pickle — and are checked tensor by tensor before they are swapped in.
"""

from __future__ import annotations

import os
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from schemas import IntegrityError
from services import _flat_adapter as _flat
from services._models import LoraTargets, load_causal_lm, with_lora
from streams import file_sha256, sha256_hex


def build_policy(
    model_name: str,
    cache_dir: Path,
    *,
    lora: bool,
    lora_rank: int = 8,
    lora_targets: LoraTargets = "attention",
    lora_layers: int = 0,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[Any, Any]:
    """The student on ``device``; with LoRA, its adapter is one buffer (see ``services._flat_adapter``), so
    build it before an optimizer holds its parameters."""
    model, tok = load_causal_lm(model_name, cache_dir)
    if lora:
        model = with_lora(model, lora_rank, seed, lora_targets, lora_layers)
    model.to(torch.device(device))
    if lora:
        _flat.flatten(model, _travelling(model, lora=True))
    return model, tok


_TRAVELLING: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def _travelling(model: Any, lora: bool) -> dict[str, torch.Tensor]:
    """Name -> live parameter of every tensor that travels (the adapter, or every weight), resolved once.

    Walking the module tree (``state_dict``, peft's ``get_peft_model_state_dict``) costs ~25 ms on SmolLM2,
    which was most of a LoRA push, so it is done once per model: parameters keep their identity through
    optimizer steps and ``.to(device)``. A tensor tied to an earlier one (the LM head and the input
    embedding) travels once; writing the embedding updates the head.
    """
    cached = _TRAVELLING.get(model)
    if cached is not None:
        return cached
    if lora:
        from peft import get_peft_model_state_dict

        named: dict[str, torch.Tensor] = get_peft_model_state_dict(model)
    else:
        named = dict(model.state_dict())
    # parameters only: they keep their identity when the model moves; a buffer is replaced by ``.to()``
    owners = {p.data_ptr(): p for p in model.parameters()}
    resolved: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        owner = owners.get(tensor.data_ptr())
        if owner is None:  # a buffer or a computed entry: resolving it once could go stale, so do not cache
            return {name: t.detach() for name, t in named.items()}
        if all(owner is not seen for seen in resolved.values()):  # a tied tensor travels once
            resolved[name] = owner
    _TRAVELLING[model] = resolved
    return resolved


def _live_state(model: Any, lora: bool) -> dict[str, torch.Tensor]:
    """The tensors that travel, as the model holds them: no copies."""
    return {name: t.detach() for name, t in _travelling(model, lora).items()}


def weights_on_cpu(model: Any, lora: bool) -> dict[str, torch.Tensor]:
    """The tensors that travel on the CPU: the model's own tensors there (no copy), a copy from a GPU."""
    return {k: v.to("cpu").contiguous() for k, v in _live_state(model, lora).items()}


def trainable_state(model: Any, lora: bool) -> dict[str, torch.Tensor]:
    """A CPU copy of the tensors that travel, safe to keep while training goes on."""
    return {k: v.clone() for k, v in weights_on_cpu(model, lora).items()}


# dtypes with a numpy twin (bfloat16 and float8 have none)
_NUMPY_DTYPES = frozenset(
    {torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}
)
# below this, a payload is built in memory and checked in one pass; above it (full weights), streamed tensor by tensor
SMALL_PAYLOAD_BYTES = 64 * 1024 * 1024


def serialize_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes of CPU tensors, through safetensors' numpy writer when every dtype allows it.

    The same bytes as the torch writer, whose per-tensor bookkeeping costs ~0.1 ms a tensor: 22 ms for a LoRA
    adapter's 240 tensors on this CPU, 6 ms through numpy.

    >>> t = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    >>> serialize_tensors(t, {"v": "1"}) == st_save(t, metadata={"v": "1"})
    True
    """
    if all(t.dtype in _NUMPY_DTYPES for t in tensors.values()):
        return np_save({name: t.numpy() for name, t in tensors.items()}, metadata=metadata)
    return st_save(tensors, metadata=metadata)


def serialize_weights(model: Any, lora: bool, metadata: dict[str, str] | None = None) -> bytes:
    """The travelling tensors as a safetensors file; an adapter held in one buffer is its header plus the
    buffer's bytes (1.3 ms instead of 3.8 for SmolLM2's r8 adapter, measured side by side)."""
    flat = _flat.buffer_of(model) if lora else None
    if flat is not None:
        return _flat.to_bytes(*flat, metadata)
    return serialize_tensors(weights_on_cpu(model, lora), metadata)


def write_weights(model: Any, lora: bool, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write the travelling tensors to ``path`` durably, straight from the model (no in-memory file)."""
    write_safetensors(weights_on_cpu(model, lora), path, metadata)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    """Atomic and durable: readers see the old file or the whole new one, also after a power cut.

    A small file of one dtype (a LoRA checkpoint) is written straight from the tensors' memory; another small
    one is built in memory by the fast writer; a big one is streamed by safetensors tensor by tensor.
    """
    if payload_bytes(tensors) <= SMALL_PAYLOAD_BYTES:
        layout = _flat.cpu_layout(tensors)
        if layout is not None:
            _replace_durably(path, lambda tmp: _flat.write_file(tmp, layout, tensors, metadata))
        else:
            write_blob(serialize_tensors(tensors, metadata), path)
    else:
        _replace_durably(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def travelling_bytes(model: Any, lora: bool) -> int:
    """Bytes of the tensors that travel, read from the model's own tensors (no copy off a GPU)."""
    return payload_bytes(_live_state(model, lora))


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_weights_file(path: Path) -> bytes | bytearray:
    """A weights file's bytes. A small one (an adapter) lands in a writable buffer, which ``load_weights_blob``
    parses in place instead of copying it once more; a big one stays ``bytes``, the only type safetensors'
    parser takes."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > SMALL_PAYLOAD_BYTES:
            return fh.read()
        buf = bytearray(size)
        got = fh.readinto(buf)
    return buf if got == size else buf[:got]  # a short read fails the size check of verify_blob


def write_blob(blob: bytes, path: Path) -> None:
    """``write_safetensors`` for bytes already serialized."""
    _replace_durably(path, lambda tmp: tmp.write_bytes(blob))


@dataclass(frozen=True)
class VisibleFile:
    """A policy file renamed into place whose bytes may still sit only in the page cache.

    Readers see it whole (the rename is atomic) and check it against ``sha256``, so it *can* be announced
    before it is durable, the fsync then running beside the Kafka hop (``weights_durable_before_announce`` off;
    by default the learner fsyncs first). ``make_durable`` must return before anything *refers* to the file
    (the learner's checkpoint). Between announcement and fsync a killed process loses nothing (the page cache
    outlives it); a power cut or kernel crash can: the file is then torn (readers reject it by its hash; a
    restarted learner numbers past it) or gone, and a learner restarted on that disk announces that version
    number again with other weights. Generators that served the lost file keep it until the next version;
    their rollouts carry their own behaviour log-probs, so training stays correct, but the version's file no
    longer matches them.
    """

    path: Path
    sha256: str
    size: int

    def make_durable(self) -> None:
        _fsync(self.path)
        _fsync(self.path.parent)  # the rename itself


def place_blob(blob: bytes, path: Path) -> VisibleFile:
    """Write ``blob`` to ``path`` atomically, hashing the same bytes while the write runs; not yet durable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_hex, blob)  # hashlib and the write both run outside the GIL
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        return VisibleFile(path, digest.result(), len(blob))


def place_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None, *, sync_data: bool
) -> VisibleFile:
    """``place_blob`` for a big file, streamed by safetensors (full weights need not fit in memory twice) and
    hashed by reading it back from the page cache (~0.4 s for SmolLM2's 538 MB). With ``sync_data`` its bytes
    are fsynced while the hash runs (the hash is then free), leaving ``make_durable`` little to do; without,
    nothing waits on the disk here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    if sync_data:
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashed = pool.submit(file_sha256, tmp)  # outside the GIL, like the fsync
            _fsync(tmp)
            digest = hashed.result()
    else:
        digest = file_sha256(tmp)
    os.replace(tmp, path)
    return VisibleFile(path, digest, path.stat().st_size)


def _replace_durably(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Any NaN or infinity makes the sum non-finite; a finite tensor only fails by overflowing the sum, which
    usable weights never do (and refusing such a tensor is the safe side). 10x faster than ``isfinite().all()``.

    >>> _all_finite(torch.ones(3)), _all_finite(torch.tensor([1.0, float("nan")]))
    (True, False)
    """
    acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=acc)))


def load_weights_blob(blob: bytes | bytearray, model: Any, lora: bool) -> Mapping[str, torch.Tensor]:
    """Parse and validate a weights blob against ``model``: same tensor names, shapes and dtypes, all finite.

    A blob laid out exactly like the model's adapter buffer is read as one buffer (``_flat.FlatState``); any
    other goes through safetensors, tensor by tensor, which also names what does not match.
    """
    flat = _flat.buffer_of(model) if lora else None
    parsed = _flat.parse(blob, flat[1]) if flat is not None else None
    if parsed is not None:
        bad = first_non_finite(parsed)
        if bad is not None:
            raise IntegrityError(f"{bad}: non-finite values")
        return parsed
    try:
        tensors = st_load(bytes(blob))
    except Exception as exc:  # safetensors raises its own SafetensorError for any malformed header
        raise IntegrityError(f"not a safetensors file: {exc}") from exc
    expected = _live_state(model, lora)  # shapes and dtypes only: no copy of the model's tensors
    _check_names(tensors, expected)
    for name, tensor in tensors.items():
        ref = expected[name]
        if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
            raise IntegrityError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
            )
    bad = first_non_finite(tensors)
    if bad is not None:
        raise IntegrityError(f"{bad}: non-finite values")
    return tensors


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None.

    A small payload is summed in one pass per dtype (a LoRA adapter's 240 tensors: 1.4 ms instead of 13 ms
    tensor by tensor); a big one tensor by tensor, without the copy.

    >>> first_non_finite({"a": torch.ones(2), "b": torch.tensor([0.0, float("inf")]), "n": torch.arange(2)})
    'b'
    >>> first_non_finite({"a": torch.ones(2)}) is None
    True
    """
    if isinstance(tensors, _flat.FlatState) and _all_finite(tensors.flat):
        return None
    floats = {name: t for name, t in tensors.items() if t.is_floating_point()}
    if payload_bytes(floats) <= SMALL_PAYLOAD_BYTES:
        by_dtype: defaultdict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for t in floats.values():
            by_dtype[t.dtype].append(t.reshape(-1))
        if all(_all_finite(torch.cat(flat)) for flat in by_dtype.values()):
            return None
    return next((name for name, t in floats.items() if not _all_finite(t)), None)


def _check_names(tensors: Mapping[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        raise IntegrityError(f"tensor names differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")


def apply_weights(model: Any, tensors: Mapping[str, torch.Tensor], lora: bool) -> None:
    """Copy ``tensors`` into the model in place (every travelling tensor, nothing else)."""
    if lora and isinstance(tensors, _flat.FlatState) and _flat.copy_into(model, tensors):
        return
    live = _travelling(model, lora)
    _check_names(tensors, live)
    names = list(tensors)
    with torch.no_grad():  # one fused call: 240 separate copy_ calls of an adapter cost ~3 ms of dispatch
        torch._foreach_copy_([live[name] for name in names], [tensors[name] for name in names])


def render_prompt(tokenizer: Any, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        rendered: str = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return rendered
    return f"User: {text}\nAssistant:"
