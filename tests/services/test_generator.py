"""The generator alone, against a real broker, with the tiny student."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import msgspec
import torch

from schemas import DeadLetter, PolicyChunk, PolicyUpdate, PromptTask, Rollout
from services._generator import Generator
from services._policy import build_policy, serialize_weights
from services._settings import Settings
from streams import Publisher, decode, decode_any, ensure_topics, sha256_hex, split_chunks
from tests.services.helpers import collect, stop_task


async def publish_weights(pub: Publisher, settings: Settings, version: int, blob: bytes) -> None:
    chunks = split_chunks(blob, version, chunk_bytes=64 * 1024)
    update = PolicyUpdate(
        policy_version=version,
        learner_step=version,
        base_model=settings.student_model,
        kind="full",
        sha256=sha256_hex(blob),
        size_bytes=len(blob),
        n_chunks=len(chunks),
    )
    await pub.send(settings.topics.policy, update)
    await pub.send_many(settings.topics.policy, [(None, c) for c in chunks])


async def test_generates_groups_and_hot_swaps_verified_weights(tiny_settings: Settings) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    gen = Generator(s)
    task = asyncio.create_task(gen.run())
    async with Publisher(s.kafka) as pub:
        await pub.send(s.topics.prompts, PromptTask(prompt_id="p1", text="How do I boil an egg?"))
        records = await collect(s.kafka, s.topics.rollouts, lambda rs: len(rs) >= s.group_size)
        rollouts = [decode(r.value, Rollout) for r in records]
        assert len({r.group_id for r in rollouts}) == 1 and len(rollouts) == s.group_size
        for r in rollouts:
            assert r.policy_version == 0 and r.completion_token_ids
            assert len(r.behaviour_logprobs) == len(r.completion_token_ids)
            assert all(math.isfinite(x) and x <= 0 for x in r.behaviour_logprobs)
            assert r.prompt_token_ids and r.sampling.seed is not None

        # new weights: a perturbed copy of the same model, published as verified chunks
        model, _ = build_policy(s.student_model, s.cache_dir, lora=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        await publish_weights(pub, s, 1, serialize_weights(model, lora=False))
        # a corrupted v2 must be refused: generator keeps serving v1 and dead-letters the bad record
        good = serialize_weights(model, lora=False)
        bad_update = PolicyUpdate(
            policy_version=2,
            learner_step=2,
            base_model="m",
            kind="full",
            sha256=sha256_hex(good),
            size_bytes=len(good),
            n_chunks=1,
        )
        await pub.send(s.topics.policy, bad_update)
        corrupted = good[:-10] + b"x" * 10
        await pub.send(
            s.topics.policy,
            PolicyChunk(policy_version=2, index=0, total=1, sha256=sha256_hex(good), data=corrupted),
        )
        letters = await collect(s.kafka, s.topics.dead_letters, lambda rs: len(rs) >= 1)
        letter = decode(letters[0].value, DeadLetter)
        assert letter.error_type == "IntegrityError" and "sha256" in letter.message
        assert isinstance(decode_any(letter.payload), PolicyChunk)

        await pub.send(s.topics.prompts, PromptTask(prompt_id="p2", text="Name a colour."))
        records = await collect(s.kafka, s.topics.rollouts, lambda rs: len(rs) >= 2 * s.group_size)
        later = [decode(r.value, Rollout) for r in records[s.group_size :]]
        assert {r.policy_version for r in later} == {1}
        assert gen.version == 1
    await stop_task(task, gen.stop)


async def test_bad_prompt_is_dead_lettered_and_generator_goes_on(tiny_settings: Settings) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    gen = Generator(s)
    task = asyncio.create_task(gen.run())
    async with Publisher(s.kafka) as pub:
        await pub.send_raw(s.topics.prompts, b"\x00not json", key=b"k")
        await pub.send(s.topics.prompts, PromptTask(prompt_id="p1", text="Hello"))
        letters = await collect(s.kafka, s.topics.dead_letters, lambda rs: len(rs) >= 1)
        letter = decode(letters[0].value, DeadLetter)
        assert letter.payload == b"\x00not json" and letter.source_topic == s.topics.prompts
        await collect(s.kafka, s.topics.rollouts, lambda rs: len(rs) >= s.group_size)
    await stop_task(task, gen.stop)


def test_batched_prompts_sample_as_if_alone(tiny_settings: Settings) -> None:
    """Prompts of different lengths share one left-padded batch: each row's behaviour log-probs are what the
    learner recomputes for it without padding, a greedy answer is the one it gets alone, and groups come
    back in the order of the tasks, eval (one greedy completion) and train (a sampled group) mixed."""
    from services._learner_algo import completion_logprobs

    gen = Generator(tiny_settings)
    tasks = [
        PromptTask(prompt_id="e1", text="Hi", split="eval", eval_round=0),
        PromptTask(prompt_id="t1", text="How do I boil an egg so that the yolk stays soft in the middle?"),
        PromptTask(prompt_id="e2", text="Name three prime numbers larger than one hundred.", split="eval"),
        PromptTask(prompt_id="t2", text="Why?"),
    ]
    groups = gen.generate_batch(tasks)
    assert [g[0].prompt_id for g in groups] == ["e1", "t1", "e2", "t2"]
    assert [len(g) for g in groups] == [1, tiny_settings.group_size, 1, tiny_settings.group_size]
    assert all(r.sampling.greedy == (r.split == "eval") for g in groups for r in g)

    rollouts = [r for g in groups for r in g]
    with torch.no_grad():
        logp, _, _ = completion_logprobs(
            gen.model, [(r.prompt_token_ids, r.completion_token_ids) for r in rollouts], gen.tokenizer.pad_token_id
        )
    for row, r in enumerate(rollouts):
        recomputed = logp[row, : len(r.behaviour_logprobs)]
        assert torch.allclose(recomputed, torch.tensor(r.behaviour_logprobs), atol=1e-4)
    for task, group in zip(tasks, groups, strict=True):
        if task.split == "eval":
            assert gen.generate(task)[0].completion_token_ids == group[0].completion_token_ids


def test_a_policy_file_whose_hash_differs_is_not_staged(tiny_settings: Settings, tmp_path: Path) -> None:
    """Read by URI, the file is hashed while it is parsed; a mismatch must leave nothing staged."""
    import pytest

    from schemas import IntegrityError

    gen = Generator(tiny_settings)
    blob = serialize_weights(gen.model, lora=False)
    path = tmp_path / "v000001.safetensors"
    path.write_bytes(blob)
    update = PolicyUpdate(
        policy_version=1,
        learner_step=1,
        base_model=tiny_settings.student_model,
        kind="full",
        sha256=sha256_hex(blob + b"x"),
        size_bytes=len(blob),
        n_chunks=0,
        uri=f"file://{path}",
    )
    with pytest.raises(IntegrityError):
        gen._stage_file(update, path)
    assert gen._staged is None
    gen._stage_file(msgspec.structs.replace(update, sha256=sha256_hex(blob)), path)
    assert gen._staged is not None and gen._staged[0] == 1


def test_a_group_shares_its_prompts_prefill_without_changing_a_token(tiny_settings: Settings) -> None:
    """The prompt runs once and its cache serves the group's samples: with the same seed the sampled tokens
    and behaviour log-probs are those of running the prompt once per sample."""
    gen = Generator(tiny_settings)
    tasks = [
        PromptTask(prompt_id="t1", text="How do I boil an egg so that the yolk stays soft in the middle?"),
        PromptTask(prompt_id="t2", text="Why?"),
    ]
    shared = gen.generate_batch(tasks)
    gen._counter = 0  # the same seed again
    gen._shared_prompt_cache = lambda ids, attention, n: None  # type: ignore[method-assign]
    alone = gen.generate_batch(tasks)
    for a, b in zip([r for g in shared for r in g], [r for g in alone for r in g], strict=True):
        assert a.completion_token_ids == b.completion_token_ids
        assert a.sampling.seed == b.sampling.seed
        assert torch.allclose(torch.tensor(a.behaviour_logprobs), torch.tensor(b.behaviour_logprobs), atol=1e-4)


async def test_waiting_prompts_are_sampled_together_up_to_the_row_budget(tiny_settings: Settings) -> None:
    """16 eval prompts (one row each) are one batch; 6 train prompts (group_size rows each) are a batch of
    ``generate_batch`` and then the rest."""
    s = tiny_settings.model_copy(update={"generate_linger_ms": 3000})
    assert s.generate_batch * s.group_size == 16
    await ensure_topics(s.kafka, s.topics.specs())
    async with Publisher(s.kafka) as pub:
        evals = [PromptTask(prompt_id=f"e{i}", text=f"Name {i} colours.", split="eval") for i in range(16)]
        await pub.send_many(s.topics.prompts, [(t.prompt_id, t) for t in evals])
    gen = Generator(s)
    calls: list[list[str]] = []
    sample = gen.generate_batch

    def recording(tasks: list[PromptTask]) -> list[list[Rollout]]:
        calls.append([t.split for t in tasks])
        return sample(tasks)

    gen.generate_batch = recording  # type: ignore[method-assign]
    task = asyncio.create_task(gen.run())
    await collect(s.kafka, s.topics.rollouts, lambda rs: len(rs) >= 16)
    async with Publisher(s.kafka) as pub:
        trains = [PromptTask(prompt_id=f"t{i}", text=f"Count to {i}.") for i in range(6)]
        await pub.send_many(s.topics.prompts, [(t.prompt_id, t) for t in trains])
    await collect(s.kafka, s.topics.rollouts, lambda rs: len(rs) >= 16 + 6 * s.group_size)
    await stop_task(task, gen.stop)
    assert calls == [["eval"] * 16, ["train"] * 4, ["train"] * 2]
