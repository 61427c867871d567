"""The student policy as both the learner and the generators hold it, and its weights on the wire.

Both sides build the same model from the same source (same base weights, same LoRA layout), so a
PolicyUpdate only has to carry the trainable tensors: the LoRA adapter (small) or every weight (full mode).
Weights travel as safetensors — never pickle — and are checked tensor by tensor before they are swapped in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from schemas import IntegrityError
from services._models import load_causal_lm

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_policy(model_name: str, cache_dir: Path, *, lora: bool, lora_rank: int = 8, seed: int = 0) -> tuple[Any, Any]:
    model, tok = load_causal_lm(model_name, cache_dir)
    if lora:
        model = with_lora(model, lora_rank, seed)
    return model, tok


def with_lora(model: Any, lora_rank: int, seed: int = 0) -> Any:
    """The project's LoRA adapter (rank r, alpha 2r, on q,k,v,o) around ``model``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # identical adapter init everywhere (B = 0, so v0 == the base model)
    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def _live_state(model: Any, lora: bool) -> dict[str, torch.Tensor]:
    """The tensors that travel (the adapter, or every weight), as the model holds them: no copies."""
    if lora:
        from peft import get_peft_model_state_dict

        state: dict[str, torch.Tensor] = get_peft_model_state_dict(model)
        return state
    return dict(model.state_dict())


def trainable_state(model: Any, lora: bool) -> dict[str, torch.Tensor]:
    """A CPU copy of the tensors that travel, safe to keep while training goes on."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in _live_state(model, lora).items()}


def serialize_weights(model: Any, lora: bool, metadata: dict[str, str] | None = None) -> bytes:
    return st_save(trainable_state(model, lora), metadata=metadata)


def load_weights_blob(blob: bytes, model: Any, lora: bool) -> dict[str, torch.Tensor]:
    """Parse and validate a weights blob against ``model``: same tensor names, shapes and dtypes, all finite."""
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own SafetensorError for any malformed header
        raise IntegrityError(f"not a safetensors file: {exc}") from exc
    expected = _live_state(model, lora)  # shapes and dtypes only: no copy of the model's tensors
    missing, unexpected = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or unexpected:
        raise IntegrityError(f"tensor names differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    for name, tensor in tensors.items():
        ref = expected[name]
        if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
            raise IntegrityError(
                f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise IntegrityError(f"{name}: non-finite values")
    return tensors


def apply_weights(model: Any, tensors: dict[str, torch.Tensor], lora: bool) -> None:
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, tensors)
    else:
        model.load_state_dict(tensors, strict=True)


def render_prompt(tokenizer: Any, text: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        rendered: str = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return rendered
    return f"User: {text}\nAssistant:"
