"""``rlaif bench learning``: does the student learn the constitution, and does streaming beat lockstep?

Two runs with the same models, judge and wall-clock budget, one after the other:

- **async**: the real system (``rlaif up`` with its separate generator, judge, learner processes over Kafka);
  held-out eval rounds (greedy answers to the eval prompts, judged by the same judge) every ``eval_every``
  learner steps;
- **sync**: the classic loop in one process, generate a batch → judge it → one learner step → swap weights,
  with the same Generator, Triton-served judge and Learner code, evaluated the same way.

Training stops when the budget runs out; the policy it left is then evaluated in a closing round (the same
greedy answers and judge, after the budget, so an eval round never takes training time from it), unless the run's
last round already evaluated that version. Without it the last ~5 steps of a run (eval every 5) would be trained
but never measured. ``eval_reward_last`` is that closing round; ``eval_reward_last_in_budget`` the last round
answered inside the budget.

It reports eval reward per principle by policy version, first → last eval reward, KL, and each run's eval
reward over wall time, and draws them in a PNG.
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import structlog

from schemas import JudgedRollout, PromptTask
from services._data import load_constitution, load_prompts
from services._replay import Source
from services._settings import Settings
from services._supervisor import _write_json

log = structlog.get_logger(__name__)


async def _judge_all(judge: Any, rollouts: list[Any]) -> list[JudgedRollout]:
    return list(await asyncio.gather(*(judge.judge(r, "bench-sync") for r in rollouts)))


def eval_tasks(settings: Settings, eval_round: int) -> list[PromptTask]:
    evals = [p for p in load_prompts(settings.prompts) if p.split == "eval"][: settings.eval_prompts]
    return [PromptTask(prompt_id=p.prompt_id, text=p.text, split="eval", eval_round=eval_round) for p in evals]


async def eval_round(generator: Any, judge: Any, tasks: list[PromptTask]) -> dict[str, Any]:
    """One held-out round of ``generator``'s policy: greedy answers judged and summed up as the learner's
    EvalResult is (``eval_summary``)."""
    from services._learner import eval_summary

    answers = [r for group in await asyncio.to_thread(generator.generate_batch, tasks) for r in group]
    return {"policy_version": generator.version, **eval_summary(await _judge_all(judge, answers))}


async def run_sync(settings: Settings, minutes: float) -> dict[str, Any]:
    """The lockstep baseline: generate → judge → train, one after the other, in one process."""
    from services._generator import Generator
    from services._judge_client import TritonJudge
    from services._learner import Learner
    from services._policy import apply_weights, trainable_state
    from services._supervisor import Supervisor, launch_triton

    sup = Supervisor()
    logs = settings.run_dir / "logs"
    await asyncio.to_thread(launch_triton, settings, sup, logs)
    judge = TritonJudge.from_settings(settings, load_constitution(settings.constitution))
    try:
        generator, learner = Generator(settings), Learner(settings)
        train = [p for p in load_prompts(settings.prompts) if p.split == "train"]
        t0, step, timeline, kl = time.monotonic(), 0, [], 0.0

        async def evaluate(closing: bool = False) -> None:
            trained_for = time.monotonic() - t0
            result = await eval_round(generator, judge, eval_tasks(settings, step))
            # a closing round is placed where training stopped; the others where their answers were judged
            point = {"t": trained_for if closing else time.monotonic() - t0, "step": step, "eval_round": step}
            timeline.append(point | result | ({"closing": True} if closing else {}))

        await evaluate()
        while time.monotonic() - t0 < minutes * 60:
            batch = [train[(step * settings.groups_per_step + i) % len(train)] for i in range(settings.groups_per_step)]
            sampled = await asyncio.to_thread(generator.generate_batch, batch)  # the step's prompts, one batch
            groups = [await _judge_all(judge, rollouts) for rollouts in sampled]
            metrics = await asyncio.to_thread(learner.train_step, groups)
            kl = metrics.get("kl", kl)
            learner.state.version += 1
            apply_weights(generator.model, trainable_state(learner.model, settings.lora), settings.lora)
            generator.version = learner.state.version
            step += 1
            if step % settings.eval_every == 0:
                await evaluate()
        if step % settings.eval_every:
            await evaluate(closing=True)
        return {"steps": step, "eval_timeline": timeline, "kl_last": kl, "wall_seconds": time.monotonic() - t0}
    finally:
        await judge.close()
        await asyncio.to_thread(sup.stop_all)


async def evaluate_stored_policy(
    settings: Settings, judge: Any, version: int, eval_round_no: int, source: Source = "archive"
) -> dict[str, Any]:
    """A held-out round of policy ``version`` as the run's policy store and its PolicyUpdate (read from
    ``source``) hold it, verified against the announced sha256 as ``rlaif audit`` reads a version, on a fresh
    generator. After ``rlaif up`` the embedded broker is gone, so the archive is where the update is."""
    from services._audit import policy_blob
    from services._generator import Generator
    from services._policy import apply_weights, load_weights_blob

    generator = await asyncio.to_thread(Generator, settings)
    if version:
        _, blob = await policy_blob(settings, version, source)
        apply_weights(generator.model, load_weights_blob(blob, generator.model, settings.lora), settings.lora)
        generator.version = version
    return await eval_round(generator, judge, eval_tasks(settings, eval_round_no))


async def closing_round(settings: Settings, version: int, eval_round_no: int) -> dict[str, Any]:
    """``evaluate_stored_policy`` after ``rlaif up`` has stopped, with a Triton server of its own."""
    from services._judge_client import TritonJudge
    from services._supervisor import Supervisor, launch_triton

    sup = Supervisor()
    await asyncio.to_thread(launch_triton, settings, sup, settings.run_dir / "logs" / "closing")
    judge = TritonJudge.from_settings(settings, load_constitution(settings.constitution))
    try:
        return await evaluate_stored_policy(settings, judge, version, eval_round_no)
    finally:
        await judge.close()
        await asyncio.to_thread(sup.stop_all)


async def run_async(settings: Settings, minutes: float) -> dict[str, Any]:
    from schemas import IntegrityError
    from services._supervisor import up

    report = await up(settings, steps=0, report_path=settings.run_dir / "up-report.json", minutes=minutes, live=False)
    timeline = async_timeline(report)
    steps = report["learner_metrics_by_step"]
    kl = steps[max(steps, key=int)]["kl"] if steps else 0.0
    result: dict[str, Any] = {
        "steps": report["learner_steps"],
        "eval_timeline": timeline,
        "kl_last": kl,
        "wall_seconds": report["wall_seconds"],
        "rollouts_per_s": report["rollouts_per_s"],
        "judged_per_s": report["judged_per_s"],
    }
    final = max(report["policy_versions_published"], default=0)  # announced before the budget ran out
    if final and (not timeline or timeline[-1]["policy_version"] != final):
        try:
            closing = await closing_round(settings, final, report["learner_steps"])
        except (IntegrityError, OSError) as exc:  # reported, and the last round in the budget stays the last
            log.error("closing_round_failed", policy_version=final, error=str(exc))
            result["closing_round_error"] = str(exc)
        else:
            log.info("closing_round", policy_version=final, reward=round(closing["reward"], 4))
            timeline.append({"t": minutes * 60, "eval_round": report["learner_steps"], **closing, "closing": True})
    return result


def async_timeline(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Complete held-out eval rounds (the EvalResult events), as the lockstep baseline reports its own.

    Not ``eval_reward_by_version``: while the policy moves, one round's answers come from several versions, so a
    per-version slice can hold one or two of the eval prompts and swings with them (seen: 0.27-0.40 for rounds
    whose complete means were 0.340-0.348). A round is placed at the version most of its answers came from.
    """
    seen_at = report.get("eval_seen_at", {})
    return [
        {
            "t": seen_at.get(str(e["policy_version"]), 0.0),
            "policy_version": e["policy_version"],
            "eval_round": e["eval_round"],
            "reward": e["reward"],
            "by_principle": e["by_principle"],
            "reward_by_prompt": e.get("reward_by_prompt", {}),
        }
        for e in sorted(report.get("eval_results", []), key=lambda e: e["eval_round"])
    ]


def paired_gain(first: dict[str, float], last: dict[str, float]) -> dict[str, float | int | None]:
    """The eval gain from ``first`` to ``last`` (rewards by prompt id) over the prompts both rounds answered,
    with the standard error of that mean difference across prompts.

    The error says how far another draw of eval prompts could move the gain, not how far another training run
    could: that spread comes from sampling and only shows by running again (three runs each of the attention-only
    and the MLP adapter gained +0.05 to +0.13 and +0.08 to +0.14; docs/algorithm.md).

    >>> g = paired_gain({"a": 0.5, "b": 0.7, "c": 0.9}, {"a": 0.7, "b": 0.8, "c": 1.0})
    >>> round(g["gain"], 3), round(g["stderr"], 3), g["n"]
    (0.133, 0.033, 3)
    >>> paired_gain({"a": 0.5}, {"b": 0.6})
    {'gain': None, 'stderr': None, 'n': 0}
    """
    common = sorted(first.keys() & last.keys())
    diffs = [last[k] - first[k] for k in common]
    n = len(diffs)
    if n == 0:
        return {"gain": None, "stderr": None, "n": 0}
    mean = sum(diffs) / n
    stderr = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else None
    return {"gain": mean, "stderr": stderr, "n": n}


def _first_to_last(timeline: list[dict[str, Any]]) -> dict[str, float | int | None] | None:
    if not timeline:
        return None
    return paired_gain(timeline[0].get("reward_by_prompt", {}), timeline[-1].get("reward_by_prompt", {}))


def _last_in_budget(timeline: list[dict[str, Any]]) -> float | None:
    inside = [p["reward"] for p in timeline if not p.get("closing")]
    return inside[-1] if inside else None


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ("async", "sync"):
        tl = result[name]["eval_timeline"]
        line = ax1.plot([p["t"] / 60 for p in tl], [p["reward"] for p in tl], marker="o", label=name)[0]
        closing = [p for p in tl if p.get("closing")]
        ax1.scatter(
            [p["t"] / 60 for p in closing],
            [p["reward"] for p in closing],
            s=120,
            marker="s",
            facecolors="none",
            edgecolors=line.get_color(),
        )
    ax1.set(
        xlabel="wall time (min; squares: the closing round)", ylabel="eval reward", title="Eval reward over wall time"
    )
    ax1.legend()
    tl = result["async"]["eval_timeline"]
    for pid in sorted(tl[0]["by_principle"]) if tl else []:
        ax2.plot([p["policy_version"] for p in tl], [p["by_principle"][pid] for p in tl], marker=".", label=pid)
    ax2.set(xlabel="policy version", ylabel="eval score", title="Async: eval score per principle")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def bench_learning(base: Settings, minutes: float, report: Path) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_root = Path("runs") / f"bench-learning-{stamp}"
    result: dict[str, Any] = {"minutes_per_run": minutes, "profile": base.profile}
    if "head" in {p.scorer for p in load_constitution(base.constitution).principles}:
        from services.triton._heads import heads_identity

        result["judge_heads"] = await asyncio.to_thread(heads_identity, base)
    result["async"] = await run_async(base.model_copy(update={"run_dir": run_root / "async"}), minutes)
    result["sync"] = await run_sync(base.model_copy(update={"run_dir": run_root / "sync"}), minutes)
    await asyncio.to_thread(summarize, result, report)
    return result


def summarize(result: dict[str, Any], report: Path) -> None:
    """First/last eval reward of both runs, the PNG and the JSON report, from the two runs' timelines."""
    tl = result["async"]["eval_timeline"]
    result["eval_reward_first"] = tl[0]["reward"] if tl else None
    result["eval_reward_last"] = tl[-1]["reward"] if tl else None
    result["eval_reward_last_in_budget"] = _last_in_budget(tl)
    result["eval_gain_paired"] = _first_to_last(tl)
    result["eval_reward_by_version"] = {str(p["policy_version"]): p["reward"] for p in tl}
    result["per_principle_by_version"] = {str(p["policy_version"]): p["by_principle"] for p in tl}
    result["kl_last"] = result["async"]["kl_last"]
    stl = result["sync"]["eval_timeline"]
    result["sync_eval_reward_first"] = stl[0]["reward"] if stl else None
    result["sync_eval_reward_last"] = stl[-1]["reward"] if stl else None
    result["sync_eval_reward_last_in_budget"] = _last_in_budget(stl)
    result["sync_eval_gain_paired"] = _first_to_last(stl)
    png = report.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    _plot(result, png)
    result["plot"] = str(png)
    _write_json(report, result)
