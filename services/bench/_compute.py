"""Compute suite: the model-bound stages alone, in one process, with no broker and no Triton in the way.

What the other suites cannot isolate: how fast the judge's scorer, the learner's optimizer step and the
generator's sampling run on a device, and what batching buys the judge there.

- **judge scorer** (:class:`~services.triton._scorers.LlmJudge`, the code Triton serves): questions/s for one
  row per forward (*unbatched*, the baseline), one padded batch, and the same batch with shared prefixes (the
  default). The rows are the default constitution's LLM questions about G completions per prompt, as the
  generator publishes them; with the principle-first template, questions about one principle and one prompt
  share the instructions, the principle and the prompt.
- **learner step**: seconds per optimizer step over ``groups_per_step x group_size`` rollouts of the default
  profile's size, with the learner's own math (:func:`micro_batch_loss`: policy and reference passes and the
  clipped loss; then gradient clipping and AdamW), LoRA and full-weight, run as the learner would run it on
  this device and thread count (:func:`share_prompts_by_default`); the LoRA step is also timed the other way.
- **generator**: completion tokens/s for one group (G samples of ``max_new_tokens``) with the generator's
  sampling settings.
- **judge heads encoder** (:class:`~services.triton._lm_encoder.LmPairEncoder`, what ``principle_heads``
  runs for the default constitution): rollouts/s when a batch of rollouts' head rows (one per head principle,
  as the judge client sends them) is encoded at once, against one rollout's rows at a time.

With ``--device cuda`` the same measurements also run on the CPU in the same process, and GPU/CPU ratios are
reported. ``--random-weights`` (for a machine that cannot install the model wheels) builds the default
profile's architectures from their ``config.json`` with random weights: speed is unaffected; no score is
read from such a model.

``python -m services.bench._compute --device cuda --random-weights --model-dir DIR --report PATH`` runs it
where only torch, transformers, peft, msgspec and structlog are installed (as ``rlaif bench compute`` does
with the project's models).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas import Constitution, render_judge_question
from services._frozen_prefix import FrozenPrefix
from services._learner_algo import (
    LossConfig,
    group_advantages,
    micro_batch_loss,
    reference_logprobs,
    share_prompts_by_default,
)
from services._models import load_tokenizer, with_lora
from services.bench import _allocator
from services.bench._common import Report, Row, realistic_rollout
from services.triton._lm_encoder import LmPairEncoder
from services.triton._scorers import LlmJudge


@dataclass(frozen=True)
class Shape:
    """The default profile's sizes (``services._settings.PROFILES["default"]``)."""

    groups_per_step: int = 4
    group_size: int = 4
    prompt_tokens: int = 60
    completion_tokens: int = 40
    max_new_tokens: int = 40
    lora_rank: int = 8
    lora_top_layers: int = 15
    ppo_epochs: int = 2
    judge_rollouts: int = 16
    head_layer: int = 20
    head_principles: int = 4


@dataclass
class Models:
    """Where the student and judge come from: a model directory each (config + tokenizer [+ weights])."""

    student_dir: Path
    judge_dir: Path
    random_weights: bool

    def load(self, which: str, device: str) -> tuple[Any, Any]:
        from transformers import AutoConfig, AutoModelForCausalLM

        path = self.student_dir if which == "student" else self.judge_dir
        tok = load_tokenizer(path)
        if self.random_weights:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return model.to(torch.device(device)), tok


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best_seconds(fn: Callable[[], Any], device: str, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls, after one untimed warm-up (noise only ever adds time)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


@contextlib.contextmanager
def _threads(device: str, cpu_threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if device == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def judge_questions(constitution: Constitution, shape: Shape) -> list[str]:
    llm = [p for p in constitution.principles if p.scorer != "classifier"]  # every principle an LM can judge
    rollouts = [
        realistic_rollout(shape.prompt_tokens, shape.completion_tokens, seq=i, group_size=shape.group_size)
        for i in range(shape.judge_rollouts)
    ]
    return [render_judge_question(p, r.prompt, r.completion) for r in rollouts for p in llm]


def measure_judge(models: Models, questions: list[str], device: str, repeats: int) -> dict[str, float]:
    model, tok = models.load("judge", device)
    if device != "cpu":
        model = model.to(torch.bfloat16)  # as LlmJudge.from_pretrained serves it on a GPU
    judge = LlmJudge(model.eval(), tok)

    def unbatched() -> None:
        for q in questions:
            judge.score([q])

    def batch(share: bool) -> Callable[[], None]:
        def run() -> None:
            judge.share_prefixes = share
            judge.score(questions)

        return run

    judge.share_prefixes = False
    rows = judge.token_rows(questions)
    out = {
        "rows": float(len(questions)),
        "mean_tokens": sum(map(len, rows)) / len(rows),
        "unbatched_s": _best_seconds(unbatched, device, repeats),
        "padded_s": _best_seconds(batch(False), device, repeats),
        "shared_s": _best_seconds(batch(True), device, repeats),
    }
    judge.share_prefixes = False
    plain = judge.score(questions)
    judge.share_prefixes = True
    out["max_abs_diff_shared_vs_padded"] = float(abs(judge.score(questions) - plain).max())
    return out


def measure_learner_step(
    models: Models, shape: Shape, device: str, lora: bool, repeats: int, share_prompts: bool
) -> dict[str, float]:
    model, tok = models.load("student", device)
    reference = None
    if lora:
        model = with_lora(model, shape.lora_rank)
    else:
        reference, _ = models.load("student", device)
        reference.eval()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    seqs, advantages = _step_batch(shape, int(model.get_input_embeddings().num_embeddings))
    pad = tok.pad_token_id

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = micro_batch_loss(model, reference, seqs, None, advantages, pad, 1.0, LossConfig(), share_prompts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    seconds = _best_seconds(step, device, repeats)
    tokens = sum(len(p) + len(c) for p, c in seqs)
    return {"step_s": seconds, "tokens_per_s": tokens / seconds, "rollouts": float(len(seqs)), "tokens": float(tokens)}


def _step_batch(shape: Shape, vocab: int) -> tuple[list[tuple[list[int], list[int]]], list[float]]:
    """One learner step's (prompt, completion) token ids and group-normalised advantages, of the shape's size."""
    n = shape.groups_per_step * shape.group_size
    rollouts = [
        realistic_rollout(shape.prompt_tokens, shape.completion_tokens, seq=i, group_size=shape.group_size)
        for i in range(n)
    ]
    seqs = [([t % vocab for t in r.prompt_token_ids], [t % vocab for t in r.completion_token_ids]) for r in rollouts]
    rewards = [((i * 37) % 11) / 10 for i in range(n)]
    advantages = [a for g in range(0, n, shape.group_size) for a in group_advantages(rewards[g : g + shape.group_size])]
    return seqs, advantages


def measure_lora_layers(
    models: Models, shape: Shape, device: str, repeats: int, share_prompts: bool
) -> dict[str, float]:
    """A whole learner step as the default profile runs it (the reference pass once, then ``ppo_epochs``
    updates, the adapter on every projection) with the adapter in every layer, against the adapter in the top
    ``lora_top_layers`` only with the layers below replayed from the reference pass (:class:`FrozenPrefix`)."""
    out: dict[str, float] = {}
    for label, wanted in (("every_layer_s", 0), ("top_layers_s", shape.lora_top_layers)):
        step, top, layers = _default_learner_step(models, shape, device, share_prompts, wanted)
        out[label] = _best_seconds(step, device, repeats)
        out["top_layers"], out["layers"] = float(top), float(layers)
    return out


def _default_learner_step(
    models: Models, shape: Shape, device: str, share_prompts: bool, top_layers: int
) -> tuple[Callable[[], None], int, int]:
    """(one learner step, the adapter's top layers, the model's layers); ``top_layers=0``: every layer."""
    base, tok = models.load("student", device)
    layers = int(base.config.num_hidden_layers)
    top = min(top_layers, layers - 1)  # the tiny student has 2 layers: its top one
    model = with_lora(base, shape.lora_rank, targets="all", top_layers=top)
    model.train()
    prefix = FrozenPrefix.below_adapter(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    seqs, advantages = _step_batch(shape, int(model.get_input_embeddings().num_embeddings))
    pad, cfg = tok.pad_token_id, LossConfig()

    def step() -> None:
        with prefix.recording(0) if prefix else contextlib.nullcontext():
            ref = reference_logprobs(model, None, seqs, pad, 1.0, share_prompts)
        for epoch in range(shape.ppo_epochs):
            optimizer.zero_grad(set_to_none=True)
            with prefix.replaying(0) if prefix else contextlib.nullcontext():
                loss, _ = micro_batch_loss(
                    model, None, seqs, None, advantages, pad, 1.0, cfg, share_prompts, ref, epoch == 0
                )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()

    return step, top, layers


def measure_generator(models: Models, shape: Shape, device: str, repeats: int) -> dict[str, float]:
    model, tok = models.load("student", device)
    model.eval()
    prompt = realistic_rollout(shape.prompt_tokens, shape.completion_tokens).prompt
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].repeat(shape.group_size, 1)
    ids = ids.to(device)

    @torch.inference_mode()
    def sample() -> None:
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=shape.max_new_tokens,
            min_new_tokens=shape.max_new_tokens,  # fixed work per call: random weights never stop early either
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
        )

    seconds = _best_seconds(sample, device, repeats)
    return {"group_s": seconds, "tokens_per_s": shape.group_size * shape.max_new_tokens / seconds}


def measure_heads_encoder(models: Models, shape: Shape, device: str, repeats: int) -> dict[str, float]:
    model, tok = models.load("judge", device)
    encoder = LmPairEncoder(model.model, tok, "judge", shape.head_layer, device)
    rollouts = [
        realistic_rollout(shape.prompt_tokens, shape.completion_tokens, seq=i, group_size=shape.group_size)
        for i in range(shape.judge_rollouts)
    ]
    rows = [[(r.prompt, r.completion)] * shape.head_principles for r in rollouts]

    def one_rollout_at_a_time() -> None:
        for rollout_rows in rows:
            encoder.pair_features(rollout_rows)

    def batched() -> None:
        encoder.pair_features([row for rollout_rows in rows for row in rollout_rows])

    return {
        "rollouts": float(len(rows)),
        "rows_per_rollout": float(shape.head_principles),
        "layers": float(encoder.layer),
        "unbatched_s": _best_seconds(one_rollout_at_a_time, device, repeats),
        "batched_s": _best_seconds(batched, device, repeats),
    }


def measure(
    models: Models, constitution: Constitution, shape: Shape, device: str, repeats: int, cpu_threads: int | None
) -> dict[str, Any]:
    with _threads(device, cpu_threads):
        share = share_prompts_by_default(device, torch.get_num_threads())
        return {
            "judge": measure_judge(models, judge_questions(constitution, shape), device, repeats),
            # the learner's default on this device first (Learner.share_prompts), then the other way
            "learner_lora": measure_learner_step(models, shape, device, True, repeats, share_prompts=share),
            "learner_full": measure_learner_step(models, shape, device, False, repeats, share_prompts=share),
            "learner_lora_other": measure_learner_step(models, shape, device, True, repeats, share_prompts=not share),
            "learner_shares_prompts": share,
            "learner_lora_layers": measure_lora_layers(models, shape, device, repeats, share),
            "generator": measure_generator(models, shape, device, repeats),
            "heads_encoder": measure_heads_encoder(models, shape, device, repeats),
        }


def fill_report(report: Report, results: dict[str, dict[str, Any]], device: str) -> None:
    m = results[device]
    j = m["judge"]
    unbatched = j["rows"] / j["unbatched_s"]
    note = f"{int(j['rows'])} questions, {j['mean_tokens']:.0f} tokens each on average"
    report.add(
        Row(
            f"judge scorer, shared-prefix batch ({device})",
            j["rows"] / j["shared_s"],
            unbatched,
            "questions/s",
            ratio_meaning="vs one question per forward (higher is better)",
            note=f"{note}; max |shared - padded| = {j['max_abs_diff_shared_vs_padded']:.1e}",
        )
    )
    report.add(
        Row(
            f"judge scorer, padded batch ({device})",
            j["rows"] / j["padded_s"],
            unbatched,
            "questions/s",
            ratio_meaning="vs one question per forward (higher is better)",
            note=note,
        )
    )
    for mode in ("lora", "full"):
        step = m[f"learner_{mode}"]
        report.add(
            Row(
                f"learner step, {mode} ({device})",
                step["step_s"],
                m["learner_full"]["step_s"] if mode == "lora" else None,
                "s/step",
                ratio_meaning="LoRA / full-weight step time (lower is better)" if mode == "lora" else "",
                note=f"{int(step['rollouts'])} rollouts, {step['tokens_per_s']:.0f} tokens/s",
            )
        )
    other = m["learner_lora_other"]
    default_way, other_way = ("prompts shared", "padded batch")[:: 1 if m["learner_shares_prompts"] else -1]
    report.add(
        Row(
            f"learner step, lora, {other_way} ({device})",
            other["step_s"],
            m["learner_lora"]["step_s"],
            "s/step",
            ratio_meaning=f"vs the default here ({default_way})",
            note="the learner's other way of running a step (learner_share_prompts)",
        )
    )
    lay = m["learner_lora_layers"]
    report.add(
        Row(
            f"learner step, LoRA in the top {int(lay['top_layers'])} of {int(lay['layers'])} layers ({device})",
            lay["top_layers_s"],
            lay["every_layer_s"],
            "s/step",
            ratio_meaning="vs the adapter in every layer (lower is better)",
            note="reference pass + 2 updates, adapter on every projection; the frozen layers replayed (lora_layers)",
        )
    )
    report.add(
        Row(f"generator ({device})", m["generator"]["tokens_per_s"], None, "tokens/s", note="one group of G samples")
    )
    h = m["heads_encoder"]
    report.add(
        Row(
            f"judge heads encoder, batch ({device})",
            h["rollouts"] / h["batched_s"],
            h["rollouts"] / h["unbatched_s"],
            "rollouts/s",
            ratio_meaning="vs one rollout's head rows per call (higher is better)",
            note=f"{int(h['rollouts'])} rollouts x {int(h['rows_per_rollout'])} head rows, {int(h['layers'])} layers",
        )
    )
    if device != "cpu" and "cpu" in results:
        cpu = results["cpu"]
        pairs = [
            # each device's default: one padded batch on the GPU, shared prefixes on the CPU (LlmJudge)
            ("judge scorer, default batch", j["rows"] / j["padded_s"], cpu["judge"]["rows"] / cpu["judge"]["shared_s"]),
            ("learner step, LoRA (steps/s)", 1 / m["learner_lora"]["step_s"], 1 / cpu["learner_lora"]["step_s"]),
            ("learner step, full (steps/s)", 1 / m["learner_full"]["step_s"], 1 / cpu["learner_full"]["step_s"]),
            ("generator tokens/s", m["generator"]["tokens_per_s"], cpu["generator"]["tokens_per_s"]),
            (
                "judge heads encoder, batch (rollouts/s)",
                h["rollouts"] / h["batched_s"],
                cpu["heads_encoder"]["rollouts"] / cpu["heads_encoder"]["batched_s"],
            ),
        ]
        for name, gpu_value, cpu_value in pairs:
            report.add(Row(f"{name}: {device} vs cpu", gpu_value, cpu_value, "per s", ratio_meaning=f"{device} / cpu"))


def run(
    report: Report,
    models: Models,
    constitution: Constitution,
    *,
    quick: bool,
    device: str,
    cpu_threads: int | None = None,
) -> None:
    shape = Shape(judge_rollouts=8 if quick else 16)
    repeats = 1 if quick else 2
    results = {device: measure(models, constitution, shape, device, repeats, cpu_threads)}
    if device != "cpu":
        results["cpu"] = measure(models, constitution, shape, "cpu", repeats, cpu_threads)
    fill_report(report, results, device)
    if device == "cpu" and not models.random_weights and _allocator.applies_here():
        results["allocator"] = _allocator.measure_allocators(models.student_dir, repeats)
        _allocator.add_rows(report, results["allocator"])
    report.details.update(
        {
            "shape": shape.__dict__,
            "random_weights": models.random_weights,
            "student_dir": str(models.student_dir),
            "judge_dir": str(models.judge_dir),
            "results": results,
        }
    )


async def run_compute(report: Report, *, quick: bool, device: str = "cpu") -> None:
    """``rlaif bench compute``: the profile's own models (default; tiny with ``--quick``), from their wheels."""
    from services._data import load_constitution
    from services._models import prepare_model
    from services._settings import Settings

    settings = Settings(profile="tiny" if quick else "default")
    models = Models(
        student_dir=prepare_model(settings.student_model, settings.cache_dir),
        judge_dir=prepare_model(settings.judge_model, settings.cache_dir),
        random_weights=False,
    )
    run(report, models, load_constitution(settings.constitution), quick=quick, device=device)


def main() -> None:
    from services._data import load_constitution
    from services.bench._common import print_report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dir", type=Path, required=True, help="student and judge (config + tokenizer [+ weights])")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--constitution", type=Path, default=Path("services/data/constitution.yaml"))
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report", type=Path, required=True)
    args = ap.parse_args()
    report = Report(suite="compute", quick=args.quick, device=args.device)
    started = time.perf_counter()
    models = Models(args.model_dir, args.model_dir, args.random_weights)
    run(
        report,
        models,
        load_constitution(args.constitution),
        quick=args.quick,
        device=args.device,
        cpu_threads=args.cpu_threads,
    )
    report.wall_seconds = time.perf_counter() - started
    report.write(args.report)
    print_report(report)
    print(json.dumps({"report": str(args.report)}))


if __name__ == "__main__":
    main()
