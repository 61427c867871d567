"""Compute the adapter-free bottom of a LoRA policy once per learner step, and replay it.

With the adapter on the top layers only (``lora_layers``), the layers below it are the same function in every
pass of a step: the reference pass (adapters disabled) and each PPO update see the same tokens through the
same frozen weights. :class:`FrozenPrefix` records what the topmost of those layers returns during the
reference pass and hands it back in the updates, so each update runs only the adapted layers and the LM head
(the backward pass stops at the adapter's lowest layer by itself: nothing below it needs a gradient). On
SmolLM2 with the adapter on the top 15 of 30 layers that is half of each update's forward pass.

A replay must make exactly the calls that were recorded, in the same order, with the same shapes (the same
sequences through the same code path); a mismatch raises instead of training on another batch's hidden
states. Layers are patched in place (an instance ``forward``), so parameter names, ``state_dict`` and the
adapter's layout do not change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class _Tape:
    """What one micro-batch's passes left behind, per call of the bottom layers (in call order)."""

    outputs: list[torch.Tensor] = field(default_factory=list)  # the topmost frozen layer's outputs
    # per frozen layer: the key/value states it added to an empty cache (a group's prompt pass), or None
    kv: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=list)


class FrozenPrefix:
    """Record-and-replay of the ``count`` bottom decoder layers of a peft LoRA model (see the module doc)."""

    def __init__(self, model: Any, count: int) -> None:
        layers = _decoder_layers(model)
        if not 0 < count < len(layers):
            raise ValueError(f"a frozen prefix of {count} layers in a model of {len(layers)}")
        for i, layer in enumerate(layers[:count]):
            if adapted := _adapted(layer):
                raise ValueError(f"layer {i} is not frozen (it has {adapted[0]}): it cannot be replayed")
        self.count = count
        self._tapes: dict[Hashable, _Tape] = {}
        self._mode: str = "off"
        self._tape = _Tape()
        self._cursor = [0] * count
        for i, layer in enumerate(layers[:count]):
            layer.forward = self._patched(i, layer.forward)

    @classmethod
    def below_adapter(cls, model: Any) -> FrozenPrefix | None:
        """The layers below a LoRA adapter's lowest layer, or None when the adapter starts at the bottom."""
        layers = _decoder_layers(model)
        lowest = next((i for i, layer in enumerate(layers) if _adapted(layer)), 0)
        return cls(model, lowest) if lowest else None

    @contextlib.contextmanager
    def recording(self, key: Hashable) -> Iterator[None]:
        """Run the bottom layers for real and keep what they produce under ``key`` (a micro-batch)."""
        self._tapes[key] = _Tape(kv=[[] for _ in range(self.count)])
        with self._in("record", self._tapes[key]):
            yield

    @contextlib.contextmanager
    def replaying(self, key: Hashable) -> Iterator[None]:
        """Skip the bottom layers, handing back what :meth:`recording` kept under ``key``."""
        if key not in self._tapes:
            raise KeyError(f"nothing recorded for {key!r}")
        with self._in("replay", self._tapes[key]):
            yield
            if self._cursor[-1] != len(self._tape.outputs):
                raise RuntimeError(f"replayed {self._cursor[-1]} of {len(self._tape.outputs)} recorded calls")

    def forget(self) -> None:
        """Drop every recording (the next step's sequences are new)."""
        self._tapes.clear()

    @contextlib.contextmanager
    def _in(self, mode: str, tape: _Tape) -> Iterator[None]:
        if self._mode != "off":
            raise RuntimeError(f"already in {self._mode} mode")
        self._mode, self._tape, self._cursor = mode, tape, [0] * self.count
        try:
            yield
        finally:
            self._mode = "off"

    def _patched(self, index: int, forward: Any) -> Any:
        top = index == self.count - 1

        def taped_forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._mode == "off":
                return forward(hidden_states, *args, **kwargs)
            layer_cache = _layer_cache(kwargs.get("past_key_values"), index)
            empty_before = layer_cache is not None and layer_cache.get_seq_length() == 0
            if self._mode == "record":
                with torch.no_grad():
                    out = forward(hidden_states, *args, **kwargs)
                added = (layer_cache.keys, layer_cache.values) if empty_before and layer_cache is not None else None
                self._tape.kv[index].append(added)
                if top:
                    self._tape.outputs.append(out.detach())
                return out
            call = self._cursor[index]
            self._cursor[index] += 1
            if call >= len(self._tape.kv[index]):
                raise RuntimeError(f"layer {index}: call {call + 1} was never recorded")
            added = self._tape.kv[index][call]
            if added is not None:
                if not empty_before:
                    raise RuntimeError(f"layer {index}: the recorded call filled an empty cache, this one has none")
                kwargs["past_key_values"].update(added[0], added[1], index)
            if not top:
                return hidden_states  # the next frozen layer ignores it too
            out = self._tape.outputs[call]
            if out.shape != hidden_states.shape:
                raise RuntimeError(f"replaying a {tuple(out.shape)} output for a {tuple(hidden_states.shape)} input")
            return out

        return taped_forward


def _decoder_layers(model: Any) -> Any:
    """The decoder layers of a (peft-wrapped) transformers causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def _adapted(layer: Any) -> list[str]:
    """The names of a layer's trainable or adapter parameters."""
    return [n for n, p in layer.named_parameters() if p.requires_grad or "lora_" in n]


def _layer_cache(cache: Any, index: int) -> Any:
    """One layer's entry of a transformers ``DynamicCache``, or None when the pass keeps no cache."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    return layers[index] if layers is not None and index < len(layers) else None
