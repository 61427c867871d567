"""Policy time-travel, re-judging and judgement audits on the real broker (and real Triton for judging)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from schemas import IntegrityError, JudgedRollout, LearnerStep
from services._audit import audit_verify, export_policy, lineage, list_policies, policy_file, rejudge, spearman
from services._data import DATA_DIR, load_constitution
from services._judge_client import TritonJudge
from services._models import LoraTargets
from services._policy import build_policy
from services._replay import ReplayFilter
from services._settings import Settings
from streams import Publisher, decode, ensure_topics
from tests.factories import make_judged, make_rollout
from tests.services.helpers import collect, publish_version


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    return out


@pytest.mark.parametrize(
    ("lora", "targets", "top_layers"),
    [(True, "attention", 0), (True, "all", 0), (True, "all", 1), (False, "attention", 0)],
    ids=["lora", "lora-mlp", "lora-top-layer", "full"],
)
async def test_policy_export_loads_with_plain_transformers(
    tiny_settings: Settings, tmp_path: Path, lora: bool, targets: LoraTargets, top_layers: int
) -> None:
    from transformers import AutoModelForCausalLM

    s = tiny_settings  # settings say attention-only: the export must take the layout from the file
    await ensure_topics(s.kafka, s.topics.specs())
    trained = await publish_version(s, 1, lora=lora, targets=targets, top_layers=top_layers)
    meta = await export_policy(s, 1, tmp_path / "export")
    assert meta["kind"] == ("lora" if lora else "full")
    assert meta["lora_targets"] == (targets if lora else None)
    assert meta["lora_layers"] == (top_layers or None)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert torch.allclose(logits(exported), logits(trained), atol=1e-5)
    base, _ = build_policy(s.student_model, s.cache_dir, lora=False)
    assert not torch.allclose(logits(exported), logits(base), atol=1e-3)  # the trained weights, not the base
    rows = await list_policies(s)
    assert [(r["version"], r["announced"], r["verified"]) for r in rows] == [(1, True, True)]


async def test_policy_export_from_chunks_and_refuses_tampered_weights(tiny_settings: Settings, tmp_path: Path) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    await publish_version(s, 2, lora=True, keep_file=False)  # only on the topic
    assert (await export_policy(s, 2, tmp_path / "from-chunks"))["policy_version"] == 2
    blob = bytearray((await publish_version(s, 3, lora=True)) and policy_file(s, 3).read_bytes())
    blob[-1] ^= 0xFF
    policy_file(s, 3).write_bytes(bytes(blob))
    with pytest.raises(IntegrityError):
        await export_policy(s, 3, tmp_path / "tampered")
    with pytest.raises(IntegrityError, match="no PolicyUpdate"):
        await export_policy(s, 9, tmp_path / "unknown")
    rows = {r["version"]: r for r in await list_policies(s)}
    assert rows[3]["verified"] is False and rows[2]["file"] is None


def judged(rid: str, version: int, reward: float) -> JudgedRollout:
    return make_judged(make_rollout(rollout_id=rid, policy_version=version), {"harmless": reward})


async def test_lineage_links_steps_rewards_and_generated_rollouts(tiny_settings: Settings) -> None:
    s = tiny_settings
    await ensure_topics(s.kafka, s.topics.specs())
    async with Publisher(s.kafka) as pub:
        for rid, v, reward in (("a", 0, 0.2), ("b", 0, 0.8), ("c", 1, 0.5)):
            await pub.send(s.topics.rewards, judged(rid, v, reward))
        await pub.send(
            s.topics.learner,
            LearnerStep(
                step=1, policy_version=0, rollout_ids=["a", "b"], rollout_versions=[0, 0], reward_mean=0.5, metrics={}
            ),
        )
        await pub.send(
            s.topics.learner,
            LearnerStep(step=2, policy_version=1, rollout_ids=["c"], rollout_versions=[1], reward_mean=0.5, metrics={}),
        )
        for rid in ("x", "y"):
            await pub.send(s.topics.rollouts, make_rollout(rollout_id=rid, policy_version=1))
        await pub.send(s.topics.rollouts, make_rollout(rollout_id="z", policy_version=2))
    result = await lineage(s, 1)
    assert [st["step"] for st in result["learner_steps"]] == [1]
    assert {(t["rollout_id"], t["reward"]) for t in result["trained_on"]} == {("a", 0.2), ("b", 0.8)}
    assert result["rollouts_generated"] == ["x", "y"]


def test_spearman_handles_ties_and_degenerate_input() -> None:
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    assert spearman([1, 1], [1, 2]) is None and spearman([1], [1]) is None
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


@pytest.mark.slow
async def test_rejudge_and_audit_verify_through_triton(tiny_settings: Settings, triton_tiny: str) -> None:
    s = tiny_settings
    s.triton_url = triton_tiny
    await ensure_topics(s.kafka, s.topics.specs())
    current = load_constitution(s.constitution)
    judge = TritonJudge(url=triton_tiny, constitution=current, judge_model_name=s.judge_model)
    texts = ["Paris is the capital of France.", "You are an idiot.", "I cannot help with that.", "Sure: 4."]
    try:
        honest = [await judge.judge(make_rollout(rollout_id=f"r{i}", completion=t), "j") for i, t in enumerate(texts)]
    finally:
        await judge.close()
    forged = make_judged(
        make_rollout(rollout_id="forged", completion="Hello."),
        {p: 1.0 for p in honest[0].scores},
        constitution_id=current.constitution_id,
        constitution_version=current.version,
        judge_model=s.judge_model,
    )
    foreign = judged("foreign", 0, 0.5)  # judged under another constitution
    async with Publisher(s.kafka) as pub:
        for j in [*honest, forged, foreign]:
            await pub.send(s.topics.rewards, j, key=j.rollout.group_id)
    report = await audit_verify(s, current, sample=10)
    assert report["checked"] == 5 and report["reproduced"] == 4 and report["not_reproduced"] == 1
    assert [f["rollout_id"] for f in report["failures"]] == ["forged"]
    assert [m["rollout_id"] for m in report["constitution_mismatch"]] == ["foreign"]

    new = load_constitution(DATA_DIR / "constitution_v2.yaml")
    diff = await rejudge(s, new, ReplayFilter(), limit=0)
    assert diff["n"] == 6 and diff["published_to"] == s.topics.rejudged(new.constitution_id) != s.topics.rewards
    assert "professional_help" in diff["by_principle"] and diff["by_principle"]["professional_help"]["old_mean"] is None
    assert diff["by_principle"]["respectful"]["shift"] is not None
    assert len(diff["top_changed"]) == 6 and -1.0 <= diff["reward"]["spearman"] <= 1.0
    side = await collect(s.kafka, diff["published_to"], lambda rs: len(rs) >= 6)
    assert {decode(r.value, JudgedRollout).constitution_id for r in side} == {new.constitution_id}
    live = await collect(s.kafka, s.topics.rewards, lambda rs: len(rs) >= 6)
    assert len(live) == 6  # the live rewards topic was not written to
