"""The replayed bottom of a top-layers LoRA policy gives the learner the numbers a full forward gives."""

from __future__ import annotations

import contextlib

import pytest
import torch

from services._frozen_prefix import FrozenPrefix
from services._learner import Learner
from services._learner_algo import LossConfig, micro_batch_loss, reference_logprobs
from services._policy import build_policy
from services._settings import Settings
from tests.services.test_learner import judged_groups

PROMPT, OTHER = list(range(10, 30)), list(range(40, 47))
# a group of three sharing a prompt (the cache path), a lone prompt, and an empty completion
SEQUENCES = [(PROMPT, list(range(50, 62))), (PROMPT, [3]), (PROMPT, list(range(70, 75))), (OTHER, [5, 6, 7])]
ADVANTAGES = [1.0, -0.5, -0.5, 0.0]


def top_layer_lora(settings: Settings) -> tuple[torch.nn.Module, int]:
    model, tok = build_policy(settings.student_model, settings.cache_dir, lora=True, lora_rank=4, lora_layers=1)
    with torch.no_grad():  # B = 0 at init would make the adapter a no-op and the test blind to it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, int(tok.pad_token_id)


def loss_and_grads(model: torch.nn.Module, pad: int, prefix: FrozenPrefix | None, share: bool) -> list[torch.Tensor]:
    model.zero_grad()
    behaviour = [[-2.0] * len(c) for _, c in SEQUENCES]
    ref = reference_logprobs(model, None, SEQUENCES, pad, 0.8, share)
    if prefix is not None:
        with prefix.recording("mb"):
            ref = reference_logprobs(model, None, SEQUENCES, pad, 0.8, share)
    out = []
    for _ in range(2):  # two PPO updates replay one recording
        with prefix.replaying("mb") if prefix else contextlib.nullcontext():
            loss, _ = micro_batch_loss(
                model, None, SEQUENCES, behaviour, ADVANTAGES, pad, 0.8, LossConfig(), share, ref
            )
        loss.backward()
        out.append(loss.detach().reshape(1))
    out.append(ref)
    out.extend(p.grad.clone() for p in model.parameters() if p.requires_grad)
    return out


@pytest.mark.parametrize("share", [True, False])
def test_replayed_bottom_layers_give_the_same_loss_and_gradients(tiny_settings: Settings, share: bool) -> None:
    model, pad = top_layer_lora(tiny_settings)
    full = loss_and_grads(model, pad, None, share)
    replayed = loss_and_grads(model, pad, FrozenPrefix(model, 1), share)
    assert len(full) == len(replayed) > 3
    for a, b in zip(full, replayed, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_a_replay_of_other_sequences_or_an_adapted_layer_is_refused(tiny_settings: Settings) -> None:
    model, pad = top_layer_lora(tiny_settings)
    prefix = FrozenPrefix(model, 1)
    with prefix.recording("mb"):
        reference_logprobs(model, None, SEQUENCES[:3], pad, 1.0)
    with pytest.raises(RuntimeError), prefix.replaying("mb"):
        reference_logprobs(model, None, SEQUENCES, pad, 1.0)  # one prompt more than was recorded
    with pytest.raises(RuntimeError), prefix.replaying("mb"):
        reference_logprobs(model, None, SEQUENCES[:1], pad, 1.0)  # fewer calls than recorded
    with pytest.raises(KeyError):
        prefix.replaying("other").__enter__()
    with pytest.raises(ValueError, match="of 2 layers in a model of 2"):
        FrozenPrefix(model, 2)
    everywhere, _ = build_policy(tiny_settings.student_model, tiny_settings.cache_dir, lora=True, lora_rank=4)
    with pytest.raises(ValueError, match="not frozen"):
        FrozenPrefix(everywhere, 1)
    assert FrozenPrefix.below_adapter(everywhere) is None


def test_the_learner_replays_the_bottom_and_trains_the_same_adapter(tiny_settings: Settings) -> None:
    s = tiny_settings.model_copy(update={"lora": True, "lora_rank": 4, "lora_layers": 1, "ppo_epochs": 2})
    groups = judged_groups(s, s.groups_per_step)
    size = s.group_size
    batches = [groups[i : i + size] for i in range(0, len(groups), size)]
    replaying, plain = Learner(s), Learner(s)
    assert replaying.frozen_prefix is not None and replaying.frozen_prefix.count == 1
    plain.frozen_prefix = None
    # the adapter at init is a no-op (B = 0); one step makes it matter for the second
    for _ in range(2):
        a, b = replaying.train_step(batches), plain.train_step(batches)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    trained = {n: p for n, p in replaying.model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n for n in trained)  # the tiny model's top layer only
    for name, p in plain.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, trained[name], atol=1e-6), name
