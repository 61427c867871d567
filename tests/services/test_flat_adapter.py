"""The LoRA adapter held in one buffer: same file bytes, same checks, one copy; any mismatch falls back."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load

from schemas import IntegrityError
from services import _flat_adapter as flat
from services import _optim_state
from services._models import LoraTargets
from services._policy import (
    apply_weights,
    build_policy,
    load_weights_blob,
    read_weights_file,
    serialize_tensors,
    serialize_weights,
    weights_on_cpu,
)
from services._settings import Settings


def _adapter(s: Settings, seed: int = 0, targets: LoraTargets = "attention") -> Any:
    model, _ = build_policy(s.student_model, s.cache_dir, lora=True, lora_rank=4, lora_targets=targets, seed=seed)
    return model


def _train_a_step(model: torch.nn.Module) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


def test_the_adapter_is_one_buffer_and_its_file_is_what_safetensors_writes(tiny_settings: Settings) -> None:
    model = _adapter(tiny_settings)
    _train_a_step(model)  # the optimizer writes through the views: the buffer is the parameters
    held = flat.buffer_of(model)
    assert held is not None
    buffer, layout = held
    tensors = weights_on_cpu(model, True)
    assert len(tensors) == len(layout.names) > 1
    assert torch.equal(buffer, torch.cat([tensors[n].reshape(-1) for n in layout.names]))
    meta = {"policy_version": "7"}
    assert serialize_weights(model, True, meta) == serialize_tensors(tensors, meta)
    assert serialize_weights(model, True) == serialize_tensors(tensors)


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_a_flat_file_is_applied_in_one_copy_with_the_same_result(tiny_settings: Settings, targets: LoraTargets) -> None:
    learner, generator = _adapter(tiny_settings, targets=targets), _adapter(tiny_settings, targets=targets)
    _train_a_step(learner)
    parsed = load_weights_blob(serialize_weights(learner, True), generator, True)
    assert isinstance(parsed, flat.FlatState)
    apply_weights(generator, parsed, True)
    mine, theirs = weights_on_cpu(learner, True), weights_on_cpu(generator, True)
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert flat.buffer_of(generator) is not None  # still views after the copy
    assert any(".mlp." in n for n in mine) == (targets == "all")


def test_an_adapter_of_the_other_layout_is_refused(tiny_settings: Settings) -> None:
    on_mlp, attention_only = _adapter(tiny_settings, targets="all"), _adapter(tiny_settings)
    with pytest.raises(IntegrityError):
        load_weights_blob(serialize_weights(on_mlp, True), attention_only, True)


def test_nan_in_a_flat_file_is_refused_by_name(tiny_settings: Settings) -> None:
    learner, generator = _adapter(tiny_settings), _adapter(tiny_settings)
    name = sorted(weights_on_cpu(learner, True))[3]
    with torch.no_grad():
        dict(weights_on_cpu(learner, True))[name].view(-1)[0] = float("nan")
    with pytest.raises(IntegrityError, match=name):
        load_weights_blob(serialize_weights(learner, True), generator, True)


def test_a_file_of_another_layout_goes_the_general_way(tiny_settings: Settings) -> None:
    generator = _adapter(tiny_settings)
    other_model, _ = build_policy(tiny_settings.student_model, tiny_settings.cache_dir, lora=True, lora_rank=2)
    with pytest.raises(IntegrityError, match="expected"):  # shapes differ: named by the general parser
        load_weights_blob(serialize_weights(other_model, True), generator, True)
    # the same tensors written in another order of bytes (metadata, not layout) still parse flat
    tensors = weights_on_cpu(generator, True)
    assert isinstance(load_weights_blob(serialize_tensors(tensors, {"x": "y"}), generator, True), flat.FlatState)


def test_views_broken_by_a_reassignment_fall_back_to_tensor_by_tensor(tiny_settings: Settings) -> None:
    learner, generator = _adapter(tiny_settings), _adapter(tiny_settings)
    _train_a_step(learner)
    param = next(p for p in generator.parameters() if p.requires_grad)
    param.data = param.data.clone()  # what a .to(other device) or load_state_dict(assign=True) does
    assert flat.buffer_of(generator) is None
    parsed = load_weights_blob(serialize_weights(learner, True), generator, True)
    assert not isinstance(parsed, flat.FlatState)
    apply_weights(generator, parsed, True)
    mine, theirs = weights_on_cpu(learner, True), weights_on_cpu(generator, True)
    assert all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_truncated_or_garbled_headers_are_integrity_errors(tiny_settings: Settings) -> None:
    learner, generator = _adapter(tiny_settings), _adapter(tiny_settings)
    blob = serialize_weights(learner, True)
    for bad in (blob[:-4], blob[:6], b"\xff" * 8 + blob[8:], blob[:8] + b"[" + blob[9:]):
        with pytest.raises(IntegrityError):
            load_weights_blob(bad, generator, True)


def test_a_flat_state_reads_like_the_safetensors_parse_and_aliases_a_writable_file(
    tiny_settings: Settings, tmp_path: Any
) -> None:
    learner, generator = _adapter(tiny_settings), _adapter(tiny_settings)
    _train_a_step(learner)
    path = tmp_path / "v1.safetensors"
    path.write_bytes(serialize_weights(learner, True))
    blob = read_weights_file(path)
    assert isinstance(blob, bytearray)  # small: read into a writable buffer
    parsed = load_weights_blob(blob, generator, True)
    assert isinstance(parsed, flat.FlatState)
    expected = st_load(bytes(blob))
    assert list(parsed) == sorted(expected) and len(parsed) == len(expected)
    assert all(torch.equal(parsed[n], expected[n]) and parsed[n].shape == expected[n].shape for n in expected)
    # parsed in place: the tensor is the file's buffer, not a copy of it
    assert parsed.flat.data_ptr() == torch.frombuffer(blob, dtype=torch.uint8)[-parsed.flat.nbytes :].data_ptr()


def test_the_packed_optimizer_state_restores_adamw_exactly(tiny_settings: Settings) -> None:
    model = _adapter(tiny_settings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    state = opt.state_dict()
    tensors, layout = _optim_state.pack(state["state"])
    assert len(tensors) == 3  # step, exp_avg, exp_avg_sq: not 3 per parameter
    restored = torch.optim.AdamW(params, lr=1e-2)
    restored.load_state_dict({**state, "state": _optim_state.unpack(st_load(serialize_tensors(tensors)), layout)})
    for pid, st in state["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored.state_dict()["state"][pid][name]))


def test_tensors_written_straight_from_memory_are_what_safetensors_writes(tmp_path: Any) -> None:
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.tensor(3.0), "c": torch.empty(0), "d": torch.ones(2)[::1]}
    layout = flat.cpu_layout(tensors)
    assert layout is not None
    flat.write_file(tmp_path / "x.safetensors", layout, tensors, {"step": "4"})
    assert (tmp_path / "x.safetensors").read_bytes() == serialize_tensors(tensors, {"step": "4"})
    assert flat.cpu_layout({"a": torch.ones(2), "n": torch.arange(2)}) is None  # two dtypes: the general writer
