"""The optimizer's state as a few flat tensors, for the checkpoint.

AdamW keeps ``step``, ``exp_avg`` and ``exp_avg_sq`` per parameter: 720 tensors for SmolLM2's LoRA adapter.
Written one by one they are 720 safetensors entries, built in Python while the learner's push is on its way to
the generators; concatenated per state name (in parameter order) they are three, with the shapes needed to
cut them apart again in the file's metadata.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from services._policy import SMALL_PAYLOAD_BYTES

PREFIX = "optim.flat."
LAYOUT_KEY = "optim_layout"


def to_checkpoint(state: dict[int, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state as checkpoint tensors and metadata: packed up to the small-payload limit; above it (full-weight
    AdamW moments) tensor by tensor, never concatenated into a second copy."""
    if sum(_nbytes(v) for st in state.values() for v in st.values()) <= SMALL_PAYLOAD_BYTES:
        tensors, layout = pack(state)
        return tensors, {LAYOUT_KEY: layout}
    return {
        f"optim.{pid}.{name}": torch.as_tensor(value).detach().to("cpu").contiguous()
        for pid, st in state.items()
        for name, value in st.items()
    }, {}


def from_checkpoint(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[int, dict[str, torch.Tensor]]:
    """The state :func:`to_checkpoint` wrote (also a checkpoint from before the packed layout)."""
    if LAYOUT_KEY in meta:
        return unpack(tensors, meta[LAYOUT_KEY])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return state


def pack(state: dict[int, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], str]:
    """``optimizer.state_dict()["state"]`` as one tensor per state name, and the layout (JSON) to unpack it.

    >>> st = {0: {"step": torch.tensor(3.0), "m": torch.ones(2, 2)},
    ...       1: {"step": torch.tensor(3.0), "m": torch.zeros(3)}}
    >>> tensors, layout = pack(st)
    >>> sorted(tensors), tensors["optim.flat.m"].tolist()
    (['optim.flat.m', 'optim.flat.step'], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    >>> back = unpack(tensors, layout)
    >>> back[0]["m"].shape, back[1]["step"].item()
    (torch.Size([2, 2]), 3.0)
    """
    pids = sorted(state)
    names = sorted({name for pid in pids for name in state[pid]})
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[list[int]]] = {}
    for name in names:
        parts = [torch.as_tensor(state[pid][name]) for pid in pids]
        shapes[name] = [list(p.shape) for p in parts]
        packed = torch.cat([p.reshape(-1) for p in parts]) if parts else torch.empty(0)
        tensors[PREFIX + name] = packed.detach().to("cpu")  # one copy off a GPU, not 240
    return tensors, json.dumps({"pids": pids, "shapes": shapes}, separators=(",", ":"))


def unpack(tensors: dict[str, torch.Tensor], layout: str) -> dict[int, dict[str, torch.Tensor]]:
    """The inverse of :func:`pack`: per parameter id, its state tensors (views of the packed ones)."""
    doc = json.loads(layout)
    pids: list[int] = doc["pids"]
    out: dict[int, dict[str, torch.Tensor]] = {pid: {} for pid in pids}
    for name, shapes in doc["shapes"].items():
        sizes = [_numel(s) for s in shapes]
        for pid, part, shape in zip(pids, torch.split(tensors[PREFIX + name], sizes), shapes, strict=True):
            out[pid][name] = part.view(shape)
    return out


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 8


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
