"""The compute suite's reference-ahead row: a LoRA learner step of the default profile (the reference pass, then
``ppo_epochs`` updates) with the frozen reference's log-probs computed on the training thread, against computed
ahead in a thread of their own while the step before trains (``services/_reference.py``).

Both run on one torch thread, as ``rlaif up`` runs the learner, while a stand-in generator samples on a thread
of its own: on two cores the reference thread gets only what the generator leaves, as it does in a run.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import TYPE_CHECKING

import msgspec
import torch

from schemas import Rollout
from services._learner_algo import LossConfig, group_advantages, micro_batch_loss, reference_logprobs
from services._models import with_lora
from services._reference import ReferenceAhead
from services.bench._common import Report, Row, realistic_rollout

if TYPE_CHECKING:
    from services.bench._compute import Models, Shape


def measure_reference_ahead(models: Models, shape: Shape, repeats: int, epochs: int = 2) -> dict[str, float]:
    """Seconds per step, best of ``repeats`` after a warm-up: ``{"inline_s", "ahead_s", "waited_s"}``."""
    from services.bench._compute import _best_seconds, _threads

    with _threads("cpu", 1):
        policy, tok = models.load("student", "cpu")
        policy = with_lora(policy, shape.lora_rank, targets="all")
        policy.train()
        frozen, _ = models.load("student", "cpu")
        sampler, _ = models.load("student", "cpu")
        sampler.eval()
        ahead = ReferenceAhead(frozen, tok.pad_token_id, share_prompts=True)
        vocab = int(policy.get_input_embeddings().num_embeddings)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        n, g = shape.groups_per_step * shape.group_size, shape.group_size
        rewards = [((i * 37) % 11) / 10 for i in range(n)]
        advantages = [a for k in range(0, n, g) for a in group_advantages(rewards[k : k + g])]
        batches = iter(range(1_000_000))

        def batch(k: int) -> list[Rollout]:
            out = []
            for i in range(n):
                r = realistic_rollout(shape.prompt_tokens, shape.completion_tokens, seq=i, group_size=g)
                out.append(
                    msgspec.structs.replace(
                        r,
                        rollout_id=f"b{k}-r{i}",
                        group_id=f"b{k}-g{i // g}",
                        group_size=g,
                        prompt_token_ids=[t % vocab for t in r.prompt_token_ids],
                        completion_token_ids=[t % vocab for t in r.completion_token_ids],
                    )
                )
            return out

        def train(rows: list[Rollout], ref: torch.Tensor) -> None:
            seqs = [(r.prompt_token_ids, r.completion_token_ids) for r in rows]
            behaviour = [r.behaviour_logprobs for r in rows]
            for _ in range(epochs):
                optimizer.zero_grad(set_to_none=True)
                loss, _ = micro_batch_loss(
                    policy, None, seqs, behaviour, advantages, tok.pad_token_id, 1.0, LossConfig(), True, ref_logp=ref
                )
                loss.backward()
                optimizer.step()

        def inline_step() -> None:
            rows = batch(next(batches))
            seqs = [(r.prompt_token_ids, r.completion_token_ids) for r in rows]
            train(rows, reference_logprobs(policy, None, seqs, tok.pad_token_id, 1.0, True))

        waited: list[float] = []
        queued = batch(next(batches))
        for r in queued:
            ahead.offer(r)

        def ahead_step() -> None:
            nonlocal queued
            rows, queued = queued, batch(next(batches))
            for r in queued:  # the next step's groups, judged while this one trains
                ahead.offer(r)
            t0 = time.perf_counter()
            ref = ahead.take(rows)
            waited.append(time.perf_counter() - t0)
            assert ref is not None
            train(rows, ref)
            ahead.retain({r.group_id for r in queued})

        stop = threading.Event()
        ids = torch.tensor([batch(0)[0].prompt_token_ids[: shape.prompt_tokens]]).repeat(shape.group_size, 1)

        @torch.inference_mode()
        def generate() -> None:
            while not stop.is_set():
                sampler.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    max_new_tokens=8,
                    min_new_tokens=8,
                    pad_token_id=tok.pad_token_id,
                )

        generator = threading.Thread(target=generate, name="bench-generator", daemon=True)
        generator.start()
        try:
            inline_s = _best_seconds(inline_step, "cpu", repeats)
            ahead_s = _best_seconds(ahead_step, "cpu", repeats)
        finally:
            stop.set()
            generator.join()
            ahead.close()
    waited_s = statistics.fmean(waited[1:] or waited)  # the timed steps' (the first is the warm-up)
    return {"inline_s": inline_s, "ahead_s": ahead_s, "waited_s": waited_s, "epochs": float(epochs)}


def add_rows(report: Report, result: dict[str, float]) -> None:
    report.add(
        Row(
            "learner step, lora, reference ahead (cpu)",
            result["ahead_s"],
            result["inline_s"],
            "s/step",
            ratio_meaning="vs the reference pass on the training thread (lower is better)",
            note=(
                f"{int(result['epochs'])} updates a step on 1 thread, a generator sampling beside it; "
                f"a timed step waited {result['waited_s']:.2f} s on average for the reference"
            ),
        )
    )
