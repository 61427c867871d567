"""A LoRA adapter held in one buffer, laid out the way a safetensors file stores it.

A push of the adapter is ~240 small tensors. Serialized, parsed, checked and copied one by one, they cost
~12 ms per push and generator on this CPU (serialize 3.8, parse + check 7.7, apply 0.7 ms), ~4.7 ms as one
buffer (1.3, 3.0, 0.4 ms; measured side by side, see ``docs/benchmarks.md``). safetensors stores tensors of
one dtype sorted by name, back to back after its JSON header; when the adapter's parameters are views of one
buffer in that order, the file is the header plus the buffer's bytes, and a received file whose header
matches the layout is one buffer to check for NaN/inf and one copy into the model.

The views are set up once (:func:`flatten`), after the model is on its device and before an optimizer holds
its parameters; parameters keep their identity (only ``.data`` moves), so optimizer steps update the buffer in
place. Anything that breaks the views later (``.to()`` to another device, a ``load_state_dict(assign=True)``)
is noticed by :func:`buffer_of`, and the callers fall back to the tensor-by-tensor path.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


@dataclass(frozen=True)
class Layout:
    """Names in file order, and the header entries a file of exactly this adapter must carry."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]  # in elements
    dtype: torch.dtype
    numel: int
    entries: dict[str, dict[str, Any]]


class FlatState(Mapping[str, torch.Tensor]):
    """Parsed weights that are views of one buffer laid out as ``layout``: checked and applied in one go.

    The per-tensor views are made only when asked for: building all ~240 of an adapter costs ~1.8 ms of
    Python on this CPU, held under the GIL, and the push path (one NaN/inf check, one copy) never needs them.
    """

    def __init__(self, flat: torch.Tensor, layout: Layout) -> None:
        self.flat, self.layout = flat, layout
        self._index = {name: i for i, name in enumerate(layout.names)}

    def __getitem__(self, name: str) -> torch.Tensor:
        i = self._index[name]
        off, shape = self.layout.offsets[i], self.layout.shapes[i]
        return self.flat[off : off + _numel(shape)].view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.names)

    def __len__(self) -> int:
        return len(self.layout.names)


_FLAT: weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, Layout, list[torch.Tensor]]] = weakref.WeakKeyDictionary()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_layout(named: dict[str, torch.Tensor]) -> Layout | None:
    """The file layout of ``named``, or None when it cannot be one buffer (mixed dtypes or devices)."""
    names = tuple(sorted(named))  # safetensors orders tensors of one dtype by name
    tensors = [named[n] for n in names]
    if not tensors or len({(t.dtype, t.device) for t in tensors}) != 1 or tensors[0].dtype not in _ST_DTYPES:
        return None
    dtype, size = tensors[0].dtype, tensors[0].element_size()
    shapes = tuple(tuple(t.shape) for t in tensors)
    offsets, entries, at = [], {}, 0
    for name, shape in zip(names, shapes, strict=True):
        offsets.append(at)
        n = _numel(shape)
        entries[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [at * size, (at + n) * size]}
        at += n
    return Layout(names, shapes, tuple(offsets), dtype, at, entries)


def flatten(model: Any, named: dict[str, torch.Tensor]) -> bool:
    """Make the parameters ``named`` (name -> the model's own Parameter) views of one buffer, in file order."""
    layout = make_layout(named)
    if layout is None:
        return False
    params = [named[n] for n in layout.names]
    flat = torch.empty(layout.numel, dtype=layout.dtype, device=params[0].device)
    with torch.no_grad():
        for p, off in zip(params, layout.offsets, strict=True):
            view = flat[off : off + p.numel()].view_as(p)
            view.copy_(p.detach())
            p.data = view
    _FLAT[model] = (flat, layout, params)
    return True


def buffer_of(model: Any) -> tuple[torch.Tensor, Layout] | None:
    """The model's adapter buffer and layout, if its parameters are still views of it (~0.1 ms to check)."""
    entry = _FLAT.get(model)
    if entry is None:
        return None
    flat, layout, params = entry
    base, size = flat.data_ptr(), flat.element_size()
    for p, off in zip(params, layout.offsets, strict=True):
        if p.data_ptr() != base + off * size or not p.is_contiguous() or p.device != flat.device:
            _FLAT.pop(model, None)
            return None
    return flat, layout


def header(layout: Layout, metadata: dict[str, str] | None) -> bytes:
    """The safetensors header (length prefix, JSON, space padding to 8 bytes) of a file with this layout."""
    doc: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    doc.update(layout.entries)
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


def to_bytes(flat: torch.Tensor, layout: Layout, metadata: dict[str, str] | None) -> bytes:
    """The safetensors file of the buffer: the header, then the buffer's bytes as they are."""
    cpu = flat.detach().to("cpu").contiguous()
    return header(layout, metadata) + cpu.view(torch.uint8).numpy().tobytes()


def cpu_layout(tensors: dict[str, torch.Tensor]) -> Layout | None:
    """The file layout of ``tensors`` if :func:`write_file` can write them (one dtype, on the CPU)."""
    layout = make_layout(tensors)
    return layout if layout is not None and tensors[layout.names[0]].device.type == "cpu" else None


def write_file(path: Path, layout: Layout, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """Write ``tensors`` (laid out as ``layout``, see :func:`cpu_layout`) as a safetensors file straight from
    their memory: the same bytes as safetensors' writer, without first building the file in memory (which took
    18 ms for a LoRA checkpoint's 7.4 MB on this CPU, holding the GIL)."""
    with open(path, "wb") as fh:
        fh.write(header(layout, metadata))
        for name in layout.names:
            fh.write(tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def parse(blob: bytes | bytearray, layout: Layout) -> FlatState | None:
    """The weights in ``blob`` as one buffer, if its header describes exactly ``layout``; None otherwise (the
    caller then parses it the general way, which names what differs)."""
    if len(blob) < 8:
        return None
    n = int.from_bytes(blob[:8], "little")
    if len(blob) != 8 + n + layout.numel * torch.tensor([], dtype=layout.dtype).element_size():
        return None
    try:
        doc = json.loads(blob[8 : 8 + n])
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    doc.pop("__metadata__", None)
    if doc != layout.entries:
        return None
    body = memoryview(blob)[8 + n :]
    # the tensor may alias a writable buffer (a file read into a bytearray); bytes are immutable, so copied
    data = torch.frombuffer(body if isinstance(blob, bytearray) else bytearray(body), dtype=layout.dtype)
    return FlatState(data, layout)


def copy_into(model: Any, state: FlatState) -> bool:
    """One copy of a parsed buffer into the model's, when both have the same layout."""
    mine = buffer_of(model)
    if mine is None or mine[1] != state.layout:
        return False
    with torch.no_grad():
        mine[0].copy_(state.flat)
    return True
