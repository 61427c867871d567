"""Audits over the topics or the archive: policy time-travel (list, export, lineage), re-judging under a new
constitution, and verifying that recorded judgements reproduce.

Everything here reads events through :mod:`services._replay` (``source="kafka"`` or ``"archive"``), so an audit
works the same on a live cluster and on an archived run. Re-judged rewards go to a side topic
(``Topics.rejudged``), never to the live rewards topic the learner trains on.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import structlog
from numpy.typing import NDArray

from schemas import (
    ConfigError,
    Constitution,
    Event,
    IntegrityError,
    JudgedRollout,
    LearnerStep,
    PolicyChunk,
    PolicyUpdate,
    Rollout,
    SchemaError,
)
from services._models import LoraTargets
from services._replay import ReplayFilter, Source, collect
from services._settings import Settings
from streams import ChunkAssembler, Publisher, decode_any, ensure_topics, sha256_hex, verify_blob
from streams._topics import TopicSpec

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=Event)
TOLERANCE = 1e-4


async def load_events(
    settings: Settings, topic: str, kind: type[E], source: Source = "kafka", flt: ReplayFilter | None = None
) -> list[E]:
    """Events of one type on ``topic`` in (partition, offset) order; re-deliveries (same event id) dropped."""
    seen: set[str] = set()
    out: list[E] = []
    for record in await collect(settings, topic, flt or ReplayFilter(), source):
        try:
            event = decode_any(record.value)
        except SchemaError:
            continue
        if isinstance(event, kind) and event.event_id not in seen:
            seen.add(event.event_id)
            out.append(event)
    return out


# ---- policy time-travel ---------------------------------------------------------------------------------
def policy_file(settings: Settings, version: int) -> Path:
    return settings.run_dir / "policy" / f"v{version:06d}.safetensors"


async def policy_updates(settings: Settings, source: Source = "kafka") -> dict[int, PolicyUpdate]:
    updates = await load_events(settings, settings.topics.policy, PolicyUpdate, source)
    return {u.policy_version: u for u in updates}  # the last announcement of a version wins


async def list_policies(settings: Settings, source: Source = "kafka") -> list[dict[str, Any]]:
    """Every version known from the policy store or the policy topic, with whether the two agree."""
    updates = await policy_updates(settings, source)
    files = {int(p.stem[1:]): p for p in (settings.run_dir / "policy").glob("v*.safetensors") if p.stem[1:].isdigit()}
    rows = []
    for version in sorted(set(updates) | set(files)):
        update, path = updates.get(version), files.get(version)
        file_sha = sha256_hex(path.read_bytes()) if path else None
        rows.append(
            {
                "version": version,
                "file": str(path) if path else None,
                "size_bytes": path.stat().st_size if path else (update.size_bytes if update else None),
                "sha256": update.sha256 if update else file_sha,
                "announced": update is not None,
                "verified": bool(update and file_sha == update.sha256) if path else None,
                "kind": update.kind if update else None,
                "learner_step": update.learner_step if update else None,
                "base_model": update.base_model if update else None,
            }
        )
    return rows


async def policy_blob(settings: Settings, version: int, source: Source = "kafka") -> tuple[PolicyUpdate, bytes]:
    """The weights of ``version``, verified against its PolicyUpdate (from the store, else from the chunks)."""
    update = (await policy_updates(settings, source)).get(version)
    if update is None:
        raise IntegrityError(f"no PolicyUpdate for v{version} on {settings.topics.policy} ({source}): cannot verify")
    path = policy_file(settings, version)
    if path.exists():
        blob = path.read_bytes()
    elif update.n_chunks:
        chunks = [
            c
            for c in await load_events(settings, settings.topics.policy, PolicyChunk, source)
            if c.policy_version == version and c.sha256 == update.sha256
        ]
        assembler, assembled = ChunkAssembler(update), None
        for chunk in sorted(chunks, key=lambda c: c.index):
            assembled = assembler.feed(chunk) or assembled
        if assembled is None:
            raise IntegrityError(f"v{version}: only {len(chunks)} of {update.n_chunks} chunks found")
        blob = assembled
    elif update.uri and update.uri.startswith("file://"):
        blob = await asyncio.to_thread(Path(update.uri.removeprefix("file://")).read_bytes)
    else:
        raise IntegrityError(f"v{version}: weights are neither in {path} nor on the topic")
    verify_blob(blob, update)
    return update, blob


def _lora_layout(tensors: dict[str, Any]) -> tuple[int, LoraTargets, int]:
    """(rank, targets, top layers) of a LoRA policy file, read from its tensors rather than trusted from
    settings, so an export rebuilds the adapter the learner actually trained. The adapter sits in the top
    layers, the last one included, so the lowest adapted layer says how many; 0 = every layer."""
    ranks = [int(t.shape[0]) for name, t in tensors.items() if "lora_A" in name]
    if not ranks:
        raise IntegrityError("a LoRA policy without lora_A tensors")
    on_mlp = any(".mlp." in name for name in tensors)
    layers = [int(m.group(1)) for name in tensors if (m := re.search(r"\.layers\.(\d+)\.", name))]
    top = max(layers) + 1 - min(layers) if layers and min(layers) > 0 else 0
    return ranks[0], "all" if on_mlp else "attention", top


def export_model(settings: Settings, update: PolicyUpdate, blob: bytes, out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir`` so ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads this version (LoRA merged)."""
    from safetensors.torch import load as st_load

    from services._policy import apply_weights, build_policy, load_weights_blob

    lora = update.kind == "lora"
    layout = _lora_layout(st_load(blob)) if lora else (settings.lora_rank, settings.lora_targets, 0)
    rank, targets, top_layers = layout
    model, tokenizer = build_policy(
        update.base_model,
        settings.cache_dir,
        lora=lora,
        lora_rank=rank,
        lora_targets=targets,
        lora_layers=top_layers,
        seed=settings.seed,
    )
    tensors = load_weights_blob(blob, model, lora)  # names, shapes, dtypes and finiteness checked
    apply_weights(model, tensors, lora)
    if lora:
        model = model.merge_and_unload()  # plain transformers weights: no peft needed to load the export
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    meta = {
        "policy_version": update.policy_version,
        "learner_step": update.learner_step,
        "base_model": update.base_model,
        "kind": update.kind,
        "sha256": update.sha256,
        "lora_rank": rank if lora else None,
        "lora_targets": targets if lora else None,
        "lora_layers": (top_layers or None) if lora else None,
    }
    (out_dir / "rlaif_policy.json").write_text(json.dumps(meta, indent=2))
    return meta


async def export_policy(settings: Settings, version: int, out_dir: Path, source: Source = "kafka") -> dict[str, Any]:
    update, blob = await policy_blob(settings, version, source)
    return await asyncio.to_thread(export_model, settings, update, blob, out_dir)


async def lineage(settings: Settings, version: int, source: Source = "kafka") -> dict[str, Any]:
    """What produced ``version`` (learner steps, their rollouts and rewards) and what it generated."""
    t = settings.topics
    steps = [s for s in await load_events(settings, t.learner, LearnerStep, source) if s.policy_version + 1 == version]
    trained = {rid for s in steps for rid in s.rollout_ids}
    rewards: dict[str, JudgedRollout] = {}
    for j in await load_events(settings, t.rewards, JudgedRollout, source):
        if j.rollout.rollout_id in trained:
            rewards.setdefault(j.rollout.rollout_id, j)
    generated = [
        r.rollout_id
        for r in await load_events(settings, t.rollouts, Rollout, source, ReplayFilter(policy_version=version))
    ]
    update = (await policy_updates(settings, source)).get(version)
    return {
        "version": version,
        "policy_update": None
        if update is None
        else {"learner_step": update.learner_step, "sha256": update.sha256, "kind": update.kind},
        "learner_steps": [
            {
                "step": s.step,
                "trained_from_version": s.policy_version,
                "reward_mean": s.reward_mean,
                "n": len(s.rollout_ids),
            }
            for s in steps
        ],
        "trained_on": [
            {
                "rollout_id": rid,
                "reward": rewards[rid].reward if rid in rewards else None,
                "scores": rewards[rid].scores if rid in rewards else None,
                "sampled_with_version": rewards[rid].rollout.policy_version if rid in rewards else None,
            }
            for s in steps
            for rid in s.rollout_ids
        ],
        "rollouts_generated": generated,
    }


# ---- re-judging -----------------------------------------------------------------------------------------
def _ranks(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Ranks with ties averaged (what Spearman's rho needs)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation; None when undefined (fewer than 2 points or a constant side).

    >>> spearman([1, 2, 3], [10, 20, 30])
    1.0
    >>> spearman([1, 2, 3], [3, 2, 1])
    -1.0
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return round(float(np.corrcoef(rx, ry)[0, 1]), 12)


async def judged_rollouts(
    settings: Settings, flt: ReplayFilter, source: Source = "kafka", limit: int = 0
) -> list[JudgedRollout]:
    """Recorded judgements (the first one of each rollout), filtered, at most ``limit`` (0 = all)."""
    firsts: dict[str, JudgedRollout] = {}
    for j in await load_events(settings, settings.topics.rewards, JudgedRollout, source, flt):
        firsts.setdefault(j.rollout.rollout_id, j)
    out = list(firsts.values())
    return out[:limit] if limit else out


async def _judge_all(settings: Settings, constitution: Constitution, rollouts: list[Rollout]) -> list[JudgedRollout]:
    from services._judge_client import TritonJudge

    judge = TritonJudge.from_settings(settings, constitution)
    sem = asyncio.Semaphore(settings.judge_concurrency)

    async def one(r: Rollout) -> JudgedRollout:
        async with sem:
            return await judge.judge(r, judge_id="rejudge")

    try:
        return list(await asyncio.gather(*(one(r) for r in rollouts)))
    finally:
        await judge.close()


def diff_report(old: list[JudgedRollout], new: list[JudgedRollout], top: int = 10) -> dict[str, Any]:
    principles = sorted({p for j in old for p in j.scores} | {p for j in new for p in j.scores})
    by_principle: dict[str, dict[str, float | None]] = {}
    for p in principles:
        o = [j.scores[p] for j in old if p in j.scores]
        n = [j.scores[p] for j in new if p in j.scores]
        om, nm = (float(np.mean(o)) if o else None), (float(np.mean(n)) if n else None)
        by_principle[p] = {"old_mean": om, "new_mean": nm, "shift": None if om is None or nm is None else nm - om}
    old_r, new_r = [j.reward for j in old], [j.reward for j in new]
    changes = sorted(
        (
            {
                "rollout_id": o.rollout.rollout_id,
                "old_reward": o.reward,
                "new_reward": n.reward,
                "delta": n.reward - o.reward,
                "completion": o.rollout.completion[:200],
            }
            for o, n in zip(old, new, strict=True)
        ),
        key=lambda row: -abs(float(row["delta"])),  # type: ignore[arg-type]
    )
    return {
        "n": len(old),
        "by_principle": by_principle,
        "reward": {
            "old_mean": float(np.mean(old_r)) if old_r else None,
            "new_mean": float(np.mean(new_r)) if new_r else None,
            "spearman": spearman(old_r, new_r),
        },
        "top_changed": changes[:top],
    }


async def rejudge(
    settings: Settings,
    constitution: Constitution,
    flt: ReplayFilter,
    source: Source = "kafka",
    limit: int = 0,
) -> dict[str, Any]:
    """Re-judge recorded rollouts under ``constitution``; publish to the side topic; return the diff report."""
    old = await judged_rollouts(settings, flt, source, limit)
    new = await _judge_all(settings, constitution, [j.rollout for j in old])
    topic = settings.topics.rejudged(constitution.constitution_id)
    await ensure_topics(settings.kafka, [TopicSpec(topic, settings.partitions)])
    async with Publisher(settings.kafka) as pub:
        await pub.send_many(topic, [(j.rollout.group_id, j) for j in new])
    report = diff_report(old, new)
    report.update(
        {
            "constitution_id": constitution.constitution_id,
            "constitution_version": constitution.version,
            "old_constitution_ids": sorted({j.constitution_id for j in old}),
            "published_to": topic,
            "source": source,
        }
    )
    return report


async def audit_verify(
    settings: Settings,
    constitution: Constitution,
    sample: int,
    source: Source = "kafka",
    seed: int = 0,
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Re-judge a sample of recorded judgements with their constitution; count those that reproduce."""
    if sample < 1:
        raise ConfigError("--sample must be at least 1")
    every = await judged_rollouts(settings, ReplayFilter(), source)
    chosen = random.Random(seed).sample(every, min(sample, len(every)))
    matching = [j for j in chosen if j.constitution_id == constitution.constitution_id]
    other = [j for j in chosen if j.constitution_id != constitution.constitution_id]
    new = await _judge_all(settings, constitution, [j.rollout for j in matching])
    failures = []
    reproduced = 0
    for old, fresh in zip(matching, new, strict=True):
        deltas = {p: abs(fresh.scores.get(p, float("nan")) - s) for p, s in old.scores.items()}
        bad = {p: d for p, d in deltas.items() if not d <= tolerance}
        if set(fresh.scores) != set(old.scores):
            bad["<principles differ>"] = float("nan")
        if bad:
            failures.append(
                {"rollout_id": old.rollout.rollout_id, "max_abs_diff": {p: float(d) for p, d in bad.items()}}
            )
        else:
            reproduced += 1
    return {
        "constitution_id": constitution.constitution_id,
        "sampled": len(chosen),
        "checked": len(matching),
        "reproduced": reproduced,
        "not_reproduced": len(matching) - reproduced,
        "tolerance": tolerance,
        "constitution_mismatch": [
            {"rollout_id": j.rollout.rollout_id, "constitution_id": j.constitution_id} for j in other
        ],
        "failures": failures,
        "source": source,
    }
