"""The learner alone against a real broker: real gradient steps, weight pushes, dedupe and exact resume."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import msgspec
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from schemas import JudgedRollout, LearnerStep, PolicyUpdate, PromptTask, Rollout
from services._generator import Generator
from services._learner import Learner
from services._policy import build_policy, load_weights_blob
from services._settings import Settings
from streams import Publisher, decode, decode_any, ensure_topics
from tests.factories import make_judged
from tests.services.helpers import collect


def judged_groups(settings: Settings, n_groups: int) -> list[JudgedRollout]:
    gen = Generator(settings)
    out = []
    for i in range(n_groups):
        group = gen.generate(PromptTask(prompt_id=f"p{i}", text=f"Tell me about topic {i}."))
        for rank, r in enumerate(group):
            reward = rank / (len(group) - 1)  # any signal with spread inside a group
            out.append(make_judged(r, {"a": reward}))
    return out


async def run_learner(settings: Settings) -> Learner:
    learner = Learner(settings)
    await asyncio.wait_for(learner.run(), 120)
    return learner


async def test_learner_steps_pushes_dedupes_and_resumes(tiny_settings: Settings) -> None:
    s = tiny_settings.model_copy(update={"max_steps": 2, "checkpoint_every": 1, "group_timeout_s": 600})
    await ensure_topics(s.kafka, s.topics.specs())
    events = judged_groups(s, 6)
    async with Publisher(s.kafka) as pub:
        first = events[: 4 * s.group_size]
        # every record twice: at-least-once delivery must not train twice on a rollout
        await pub.send_many(s.topics.rewards, [(e.rollout.group_id, e) for e in first + first])
        learner = await run_learner(s)
        assert learner.state.step == 2 and learner.state.version == 2
        assert learner.state.counters["duplicates"] == len(first)
        trained = set(learner.state.trained)
        assert len(trained) == 2 * s.groups_per_step * s.group_size

        steps = [
            decode(r.value, LearnerStep) for r in await collect(s.kafka, s.topics.learner, lambda rs: len(rs) >= 2)
        ]
        assert [st.step for st in steps] == [1, 2]
        assert all(st.metrics["trained_rollouts"] > 0 and "kl" in st.metrics for st in steps)
        policy = [
            decode_any(r.value)
            for r in await collect(
                s.kafka,
                s.topics.policy,
                lambda rs: sum(isinstance(decode_any(x.value), PolicyUpdate) for x in rs) >= 2,
            )
        ]
        updates = [u for u in policy if isinstance(u, PolicyUpdate)]
        assert [u.policy_version for u in updates] == [1, 2]

        # the pushed weights really changed: v2 differs from the base model
        base, _ = build_policy(s.student_model, s.cache_dir, lora=False)
        blob = (s.run_dir / "policy" / "v000002.safetensors").resolve().read_bytes()
        tensors = load_weights_blob(blob, base, lora=False)
        base_state = base.state_dict()
        diff = sum(float((v - base_state[k]).abs().sum()) for k, v in tensors.items())
        assert diff > 0

        # restart: the checkpoint holds the buffered (untrained) groups and offsets; feed the rest
        await pub.send_many(s.topics.rewards, [(e.rollout.group_id, e) for e in events[4 * s.group_size :]])
        resumed = await run_learner(s.model_copy(update={"max_steps": 3}))
        assert resumed.state.step == 3
        assert trained <= resumed.state.trained
        assert resumed.state.counters["duplicates"] == len(first)  # nothing re-read from before the checkpoint
        assert resumed.state.counters["consumed"] == len(events)

        # restarted after its last step (a chaos run caught this: aiokafka's stop() right after start() raised
        # CancelledError, the learner exited 1 and was restarted forever): it must stop at once, cleanly
        done = await run_learner(s.model_copy(update={"max_steps": 3}))
        assert done.state.step == 3 and done.state.counters == resumed.state.counters


@pytest.mark.parametrize(
    ("scale", "floor", "epochs", "lr"),
    # two AdamW updates at 1e-2 overshoot on the tiny random model: the second can undo the first
    [("group", 0.0, 1, 1e-2), ("step", 0.0, 1, 1e-2), ("group", 0.05, 1, 1e-2), ("group", 0.0, 2, 1e-3)],
)
def test_positive_advantage_raises_completion_logprob(
    tiny_settings: Settings, scale: str, floor: float, epochs: int, lr: float
) -> None:
    """One real learner step moves probability towards the better completion of a group, whichever std
    scales the advantages (a floor below the group's spread changes nothing) and however many updates it takes."""
    from services._learner_algo import completion_logprobs

    s = tiny_settings.model_copy(
        update={
            "learning_rate": lr,
            "kl_coef": 0.0,
            "advantage_scale": scale,
            "advantage_std_floor": floor,
            "ppo_epochs": epochs,
        }
    )
    learner = Learner(s)
    events = judged_groups(s, 1)
    rewards = [1.0] + [0.0] * (len(events) - 1)
    events = [make_judged(e.rollout, e.scores, reward=r) for e, r in zip(events, rewards, strict=True)]
    best: Rollout = events[0].rollout
    seq = [(best.prompt_token_ids, best.completion_token_ids)]
    with torch.no_grad():
        before = completion_logprobs(learner.model, seq, 0)[0].sum().item()
    metrics = learner.train_step([events])
    with torch.no_grad():
        after = completion_logprobs(learner.model, seq, 0)[0].sum().item()
    assert after > before
    assert learner.state.step == 1
    # the first update is on-policy (nothing clipped); the second sees the policy the first one moved
    assert metrics["clip_frac"] == 0.0
    assert metrics["entropy"] > 0.0  # the first update's; the later ones skip computing it
    if epochs > 1:
        assert metrics["clip_frac_last_epoch"] > 0.0
    else:
        assert "clip_frac_last_epoch" not in metrics


def test_minibatches_update_once_per_span_of_whole_groups(tiny_settings: Settings) -> None:
    """With ``ppo_minibatches=2`` an epoch is two AdamW updates, one per half of the step's groups, and each
    group's better completion still gains probability; the metrics are averaged over the first epoch's."""
    from services._learner_algo import completion_logprobs

    s = tiny_settings.model_copy(update={"learning_rate": 1e-3, "kl_coef": 0.0, "ppo_epochs": 2, "ppo_minibatches": 2})
    learner = Learner(s)
    raw = judged_groups(s, 2)
    groups = []
    for i in range(2):
        members = raw[i * s.group_size : (i + 1) * s.group_size]
        rewards = [1.0] + [0.0] * (len(members) - 1)
        groups.append([make_judged(e.rollout, e.scores, reward=r) for e, r in zip(members, rewards, strict=True)])
    best = [[(g[0].rollout.prompt_token_ids, g[0].rollout.completion_token_ids)] for g in groups]
    with torch.no_grad():
        before = [completion_logprobs(learner.model, seq, 0)[0].sum().item() for seq in best]
    metrics = learner.train_step(groups)
    with torch.no_grad():
        after = [completion_logprobs(learner.model, seq, 0)[0].sum().item() for seq in best]
    assert all(a > b for a, b in zip(after, before, strict=True))
    adam_steps = {int(state["step"]) for state in learner.optimizer.state.values()}
    assert adam_steps == {2 * 2}  # epochs x minibatches
    assert metrics["trained_rollouts"] == 2 * s.group_size
    assert metrics["entropy"] > 0.0 and metrics["clip_frac_last_epoch"] > 0.0


def test_decoupled_clip_matches_the_behaviour_clip_on_fresh_rollouts() -> None:
    """With the proximal policy equal to the behaviour policy (staleness 0) the decoupled loss is the usual one,
    in value and in gradient, clipped tokens included."""
    from services._learner_algo import LossConfig, policy_loss

    torch.manual_seed(0)
    behaviour = torch.randn(3, 5)
    mask, adv, ref = torch.ones(3, 5), torch.tensor([1.0, -0.5, 2.0]), torch.randn(3, 5)
    grads = []
    for cfg in (LossConfig(), LossConfig(decoupled=True)):
        logp = (behaviour + 0.3 * torch.randn(3, 5, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss, metrics = policy_loss(logp, behaviour, ref, adv, mask, cfg, logp_prox=behaviour)
        loss.backward()
        grads.append((loss.item(), logp.grad, metrics["clip_frac"]))
    (loss_a, grad_a, clip_a), (loss_b, grad_b, clip_b) = grads
    assert clip_a == clip_b > 0.0  # some tokens are outside 1 +- eps, and clipped alike
    assert loss_a == pytest.approx(loss_b) and torch.allclose(grad_a, grad_b)


def test_stale_rollouts_move_the_policy_a_full_step_only_when_clipped_against_the_proximal_policy(
    tiny_settings: Settings,
) -> None:
    """Rollouts whose every token the policy has already made e^0.5 times likelier than when they were sampled
    (as steps on other prompts can): clipped against the behaviour policy, the best completion's own term is
    flat and it gains only through the others being pushed down; against the proximal policy it gets its
    gradient, weighted by e^0.5."""
    from services._learner_algo import completion_logprobs

    gains, step_metrics = {}, {}
    for clip_against in ("behaviour", "proximal"):
        s = tiny_settings.model_copy(
            update={"learning_rate": 1e-3, "kl_coef": 0.0, "ppo_epochs": 1, "ppo_clip_against": clip_against}
        )
        learner = Learner(s)  # the same seed: the same initial policy both times
        members = judged_groups(s, 1)
        seqs = [(e.rollout.prompt_token_ids, e.rollout.completion_token_ids) for e in members]
        with torch.no_grad():
            logp, _, mask = completion_logprobs(learner.model, seqs, 0)
        stale = []
        for i, e in enumerate(members):
            behaviour = [float(x) - 0.5 for x in logp[i, : int(mask[i].sum())]]
            rollout = msgspec.structs.replace(e.rollout, behaviour_logprobs=behaviour)
            stale.append(make_judged(rollout, e.scores, reward=1.0 if i == 0 else 0.0))
        step_metrics[clip_against] = learner.train_step([stale])
        with torch.no_grad():
            after = completion_logprobs(learner.model, seqs[:1], 0)[0].sum().item()
        gains[clip_against] = after - logp[0, : int(mask[0].sum())].sum().item()
    assert step_metrics["behaviour"]["clip_frac"] == 1.0  # every token past 1 + eps
    assert step_metrics["behaviour"]["is_weight_mean"] == 1.0
    assert step_metrics["proximal"]["clip_frac"] == 0.0  # the step starts inside its own trust region
    assert step_metrics["proximal"]["is_weight_mean"] == pytest.approx(math.exp(0.5), rel=1e-3)
    assert gains["proximal"] > 5 * max(gains["behaviour"], 0.01), gains  # measured: 2.96 against 0.08 nats


def test_checkpoint_after_a_push_refers_to_the_policy_file(tiny_settings: Settings) -> None:
    """Right after a push the checkpoint does not write the weights again; a restart reads (and checks) them
    from the policy store."""
    import pytest

    from schemas import IntegrityError
    from services._policy import trainable_state, write_weights
    from streams import file_sha256

    learner = Learner(tiny_settings)
    learner.train_step([judged_groups(tiny_settings, 1)])
    path = learner.policy_store / "v000001.safetensors"
    write_weights(learner.model, tiny_settings.lora, path)
    learner.save_checkpoint(weights_file=path, weights_sha256=file_sha256(path))
    assert not any(k.startswith("model.") for k in load_file(learner.ckpt_path))

    resumed = Learner(tiny_settings)
    want, got = trainable_state(learner.model, False), trainable_state(resumed.model, False)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.state.step == 1

    path.write_bytes(path.read_bytes()[:-8])  # a damaged policy file must not be trained on silently
    with pytest.raises(IntegrityError):
        Learner(tiny_settings)


def test_the_learning_rate_follows_its_schedule_step_by_step(tiny_settings: Settings) -> None:
    s = tiny_settings.model_copy(update={"learning_rate": 1e-3, "lr_decay_steps": 2, "lr_min_ratio": 0.5})
    learner = Learner(s)
    used = [learner.train_step([judged_groups(s, 1)])["lr"] for _ in range(4)]
    assert used == pytest.approx([1e-3, 0.75e-3, 0.5e-3, 0.5e-3])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)


@pytest.mark.parametrize("packed", [True, False], ids=["packed-optimizer-state", "tensor-by-tensor"])
def test_a_restart_resumes_adamw_exactly(tiny_settings: Settings, monkeypatch: Any, packed: bool) -> None:
    """A small optimizer state is checkpointed as a few packed tensors, a big one tensor by tensor; both come
    back as the same AdamW moments and step counts."""
    from services import _optim_state

    if not packed:  # as for full weights beyond the small-payload limit
        monkeypatch.setattr(_optim_state, "SMALL_PAYLOAD_BYTES", 0)
    learner = Learner(tiny_settings)
    for n_groups in (1, 2):  # two optimizer steps
        learner.train_step([judged_groups(tiny_settings, n_groups)])
    learner.save_checkpoint()
    keys = [k for k in load_file(learner.ckpt_path) if k.startswith("optim.")]
    assert all(k.startswith("optim.flat.") for k in keys) == packed and keys

    want, got = learner.optimizer.state_dict(), Learner(tiny_settings).optimizer.state_dict()
    assert want["state"].keys() == got["state"].keys()
    for pid, st in want["state"].items():
        for name, value in st.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got["state"][pid][name])), (pid, name)


def test_versions_continue_after_the_newest_policy_file(tiny_settings: Settings) -> None:
    """Killed after announcing v5 but before checkpointing: the restart must not announce a different v5."""
    from services._policy import write_weights

    learner = Learner(tiny_settings)
    assert learner.state.version == 0
    write_weights(learner.model, tiny_settings.lora, learner.policy_store / "v000005.safetensors")
    assert Learner(tiny_settings).state.version == 5


async def test_push_inline_and_by_uri_carry_the_policy_file(tiny_settings: Settings) -> None:
    """Under ``weights_inline_max_bytes`` the chunks are the policy file's bytes; at 0 the update points at the
    file instead. Either way the file in the store is the one announced."""
    from streams import ChunkAssembler, file_sha256

    for limit in (tiny_settings.weights_inline_max_bytes, 0):
        kafka = tiny_settings.kafka.model_copy(update={"topic_prefix": f"{tiny_settings.kafka.topic_prefix}l{limit}."})
        s = tiny_settings.model_copy(
            update={"weights_inline_max_bytes": limit, "kafka": kafka, "run_dir": tiny_settings.run_dir / str(limit)}
        )
        await ensure_topics(s.kafka, s.topics.specs())
        learner = Learner(s)
        learner.train_step([judged_groups(s, 1)])
        await learner.publisher.start()
        try:
            await learner.publish_policy({})
        finally:
            await learner.publisher.stop()
        path = learner.policy_store / "v000001.safetensors"
        announced = 1 + (limit > 0)  # the update, and at least one chunk when inline
        records = await collect(s.kafka, s.topics.policy, lambda rs: len(rs) >= announced)  # noqa: B023
        update = decode_any(records[0].value)
        assert isinstance(update, PolicyUpdate) and update.sha256 == file_sha256(path)
        if limit:
            assert update.uri is None and update.n_chunks >= 1
            assembler, blob = ChunkAssembler(update), None
            everything = 1 + update.n_chunks
            for record in await collect(s.kafka, s.topics.policy, lambda rs: len(rs) >= everything):  # noqa: B023
                event = decode_any(record.value)
                if not isinstance(event, PolicyUpdate):
                    blob = assembler.feed(event) or blob  # type: ignore[arg-type]
            assert blob == path.read_bytes()
        else:
            assert update.n_chunks == 0 and update.uri == f"file://{path}"


@pytest.mark.parametrize("durable_first", [False, True])
async def test_a_push_is_durable_before_its_checkpoint_and_before_its_announcement_unless_told_otherwise(
    tiny_settings: Settings, durable_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default the policy file is fsynced before it is announced; with ``weights_durable_before_announce``
    off the fsync runs beside the announcement. Either way the checkpoint, which refers to the file, waits."""
    from services._policy import VisibleFile

    s = tiny_settings.model_copy(update={"weights_durable_before_announce": durable_first})
    await ensure_topics(s.kafka, s.topics.specs())
    learner = Learner(s)
    order: list[str] = []
    real_durable, real_send, real_ckpt = VisibleFile.make_durable, learner.publisher.send_many, learner.save_checkpoint

    def durable(self: VisibleFile) -> None:
        order.append("fsync starts")
        real_durable(self)
        order.append("fsync done")

    async def send_many(*args: Any, **kwargs: Any) -> None:
        order.append("announce starts")
        await real_send(*args, **kwargs)

    def checkpoint(*args: Any, **kwargs: Any) -> None:
        order.append("checkpoint")
        real_ckpt(*args, **kwargs)

    monkeypatch.setattr(VisibleFile, "make_durable", durable)
    monkeypatch.setattr(learner.publisher, "send_many", send_many)
    monkeypatch.setattr(learner, "save_checkpoint", checkpoint)
    await learner.publisher.start()
    try:
        await learner.publish_policy({})
    finally:
        await learner.publisher.stop()
    assert order.index("fsync done") < order.index("checkpoint")
    if durable_first:
        assert order == ["fsync starts", "fsync done", "announce starts", "checkpoint"]
    assert not list(learner.policy_store.glob("*.tmp"))
    with safe_open(str(learner.ckpt_path), framework="pt") as fh:
        assert fh.metadata()["weights_file"] == "v000001.safetensors"
    update = decode_any((await collect(s.kafka, s.topics.policy, lambda rs: len(rs) >= 1))[0].value)
    assert isinstance(update, PolicyUpdate) and update.policy_version == 1


def test_place_blob_is_whole_and_hashed_before_it_is_durable(tmp_path: Any) -> None:
    from services._policy import place_blob
    from streams import file_sha256

    blob = bytes(range(256)) * 4096
    placed = place_blob(blob, tmp_path / "store" / "v000001.safetensors")
    assert placed.path.read_bytes() == blob and placed.size == len(blob)
    assert placed.sha256 == file_sha256(placed.path)
    assert [f.name for f in placed.path.parent.iterdir()] == ["v000001.safetensors"]
    placed.make_durable()


def test_completions_of_one_prompt_share_its_forward_pass_exactly(tiny_settings: Settings) -> None:
    """Log-probs and gradients through the shared prompt cache equal those of each sequence on its own."""
    from services._learner_algo import completion_logprobs

    torch.manual_seed(0)
    model, tok = build_policy(tiny_settings.student_model, tiny_settings.cache_dir, lora=False)
    prompt, other = list(range(10, 30)), list(range(40, 47))
    seqs = [(prompt, list(range(50, 62))), (prompt, [3]), (other, [5, 6, 7]), (prompt, list(range(70, 75)))]

    logp, _, mask = completion_logprobs(model, seqs, tok.pad_token_id, temperature=0.8)
    (logp * mask).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    for row, seq in enumerate(seqs):
        alone, _, alone_mask = completion_logprobs(model, [seq], tok.pad_token_id, temperature=0.8)
        assert torch.allclose(alone[0], logp[row, : alone.shape[1]].detach(), atol=1e-5)
        (alone * alone_mask).sum().backward()
    alone_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(shared_grads) == len(alone_grads)
    for shared, alone in zip(shared_grads, alone_grads, strict=True):
        assert torch.allclose(shared, alone, atol=1e-5, rtol=1e-4)
    # the GPU default, one padded batch, gives the same numbers
    padded, _, padded_mask = completion_logprobs(model, seqs, tok.pad_token_id, temperature=0.8, share_prompts=False)
    assert torch.equal(padded_mask, mask)
    assert torch.allclose(padded, logp.detach(), atol=1e-5)


def test_a_wholly_stale_group_is_dropped_not_fatal(tiny_settings: Settings) -> None:
    """A step whose group is entirely older than max_staleness (a learner that fell behind) drops it and
    trains on the rest; this once raised ZeroDivisionError and crash-looped the learner on restart."""
    learner = Learner(tiny_settings)
    stale = judged_groups(tiny_settings, 1)
    learner.state.version = tiny_settings.max_staleness + 1  # every rollout above was sampled at version 0
    fresh = [
        make_judged(msgspec.structs.replace(r.rollout, policy_version=learner.state.version), r.scores)
        for r in judged_groups(tiny_settings, 1)
    ]
    metrics = learner.train_step([stale, fresh])
    assert learner.state.counters["dropped_stale"] == len(stale)
    assert metrics["trained_rollouts"] == len(fresh)
    assert learner.train_step([stale])["trained_rollouts"] == 0


async def test_an_eval_round_is_reported_once_across_restarts(tiny_settings: Settings) -> None:
    """Answers collected before a checkpoint count after a restart, and a round re-read from the checkpoint's
    offsets is not reported again."""
    from schemas import EvalResult
    from services._data import load_prompts

    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    evals = [p for p in load_prompts(s.prompts) if p.split == "eval"][: s.eval_prompts]
    tasks = [PromptTask(prompt_id=p.prompt_id, text=p.text, split="eval", eval_round=5) for p in evals]
    answers = [make_judged(group[0], {"a": 0.5}) for group in Generator(s).generate_batch(tasks)]

    async def learner_with(events: list[JudgedRollout]) -> Learner:
        learner = Learner(s)
        await learner.publisher.start()
        try:
            for event in events:
                await learner._collect_eval(event)
        finally:
            await learner.publisher.stop()
        learner.save_checkpoint()
        return learner

    async def reported_until_marker(marker: int) -> list[tuple[int, int, list[str]]]:
        async with Publisher(s.kafka) as pub:  # everything before the marker has been read once it is
            await pub.send(
                s.topics.eval,
                EvalResult(
                    policy_version=0, eval_round=marker, n=0, reward_mean=0.0, by_principle={}, constitution_id="c"
                ),
            )
        records = await collect(
            s.kafka, s.topics.eval, lambda rs: decode(rs[-1].value, EvalResult).eval_round == marker
        )
        decoded = (decode(x.value, EvalResult) for x in records)
        return [(r.eval_round, r.n, sorted(r.reward_by_prompt)) for r in decoded if r.n]

    prompt_ids = sorted(p.prompt_id for p in evals)  # the round carries every prompt's reward, for paired gains
    await learner_with(answers[:-1])  # killed before the last answer arrived
    await learner_with(answers[-1:])  # the restart completes the round
    assert await reported_until_marker(998) == [(5, len(answers), prompt_ids)]
    replayed = await learner_with(answers)  # restarted again, re-reading all of it
    assert replayed.state.counters["eval_duplicates"] == len(answers)
    assert await reported_until_marker(999) == [(5, len(answers), prompt_ids)]


def test_an_empty_completion_in_a_group_is_masked_not_misaligned(tiny_settings: Settings) -> None:
    from services._learner_algo import completion_logprobs

    model, tok = build_policy(tiny_settings.student_model, tiny_settings.cache_dir, lora=False)
    prompt = list(range(10, 20))
    seqs = [(prompt, [5, 6]), (prompt, []), (prompt, [7])]
    logp, _, mask = completion_logprobs(model, seqs, tok.pad_token_id)
    assert mask.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    for row in (0, 2):
        alone, _, _ = completion_logprobs(model, [seqs[row]], tok.pad_token_id)
        assert torch.allclose(alone[0], logp[row, : alone.shape[1]], atol=1e-5)
