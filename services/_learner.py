"""The online learner. Read top to bottom: consume rewards → group → step → publish weights → checkpoint.

It reads the rewards topic by manual assignment (no consumer group) from the offsets saved in its
checkpoint. The checkpoint is one safetensors file holding the trainable weights, the AdamW state, the next
offset of every partition, the ledger of trained rollout ids and the rollouts buffered but not yet trained, so a
restart resumes exactly where the weights are: nothing trained twice, nothing skipped. Weights are written once
per push, into the policy store; the checkpoint taken right after refers to that file. Versions are numbered
after the newest file in the store, so a learner that restarts from a checkpoint older than its last push never
reuses a version number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from aiokafka import TopicPartition
from safetensors.torch import load_file

from schemas import (
    EvalResult,
    IntegrityError,
    JudgedRollout,
    LearnerStep,
    PolicyChunk,
    PolicyUpdate,
    SchemaError,
)
from services import _metrics as metrics
from services import _optim_state
from services._data import load_prompts
from services._frozen_prefix import FrozenPrefix
from services._learner_algo import (
    LossConfig,
    learning_rate_at,
    micro_batch_loss,
    minibatch_spans,
    reference_logprobs,
    share_prompts_by_default,
    step_advantages,
)
from services._models import load_causal_lm
from services._policy import (
    SMALL_PAYLOAD_BYTES,
    VisibleFile,
    apply_weights,
    build_policy,
    load_weights_blob,
    place_blob,
    place_safetensors,
    serialize_weights,
    travelling_bytes,
    weights_on_cpu,
    write_safetensors,
)
from services._proc import run_until_signalled
from services._settings import Settings
from streams import (
    DeadLetterSink,
    Publisher,
    decode,
    encode,
    ensure_topics,
    make_consumer,
    sha256_hex,
    split_chunks,
    stop_consumer,
)

log = structlog.get_logger(__name__)


@dataclass
class LearnerState:
    step: int = 0
    version: int = 0
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset to read
    trained: set[str] = field(default_factory=set)  # the ledger: rollout ids trained on ...
    dropped: set[str] = field(default_factory=set)  # ... and ids deliberately not trained on (stale, incomplete)
    pending: dict[str, dict[str, JudgedRollout]] = field(default_factory=dict)  # group -> rollout -> event
    # held-out eval rounds: answers of a round not complete yet, and rounds already reported (a restart re-reads
    # rewards from the checkpoint's offsets; without these a round is reported twice, or never)
    eval_answers: dict[int, dict[str, JudgedRollout]] = field(default_factory=dict)  # round -> prompt -> event
    eval_reported: set[int] = field(default_factory=set)
    group_seen_at: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(
        default_factory=lambda: {
            "consumed": 0,
            "duplicates": 0,
            "dropped_stale": 0,
            "dropped_incomplete": 0,
            "eval_consumed": 0,
            "eval_duplicates": 0,
            "trained_rows": 0,
            "dead_lettered": 0,
        }
    )


class Learner:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        torch.set_num_threads(settings.torch_threads)
        torch.manual_seed(settings.seed)
        self.topics = settings.topics
        self.model, self.tokenizer = build_policy(
            settings.student_model,
            settings.cache_dir,
            lora=settings.lora,
            lora_rank=settings.lora_rank,
            lora_targets=settings.lora_targets,
            lora_layers=settings.lora_layers,
            seed=settings.seed,
            device=settings.device,
        )
        self.device = torch.device(settings.device)
        self.model.train()
        # LoRA: the reference is the same network with adapters disabled; full mode keeps a frozen copy.
        self.reference = None
        if not settings.lora:
            self.reference = load_causal_lm(settings.student_model, settings.cache_dir)[0].to(self.device).eval()
        # LoRA in the top layers only: the layers below run once a step, in the reference pass, and are replayed
        self.frozen_prefix = FrozenPrefix.below_adapter(self.model) if settings.lora else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
        self.loss_cfg = LossConfig(
            settings.clip_eps,
            settings.max_importance_ratio,
            settings.kl_coef,
            decoupled=settings.ppo_clip_against == "proximal",
        )
        share = settings.learner_share_prompts
        self.share_prompts = (
            share_prompts_by_default(settings.device, settings.torch_threads) if share is None else share
        )
        self.state = LearnerState()
        self.ckpt_path = checkpoint_path(settings.run_dir)
        self.policy_store = (settings.run_dir / "policy").resolve()
        # its sends are awaited one at a time (a step, then a push), so a linger could only delay each of them
        self.publisher = Publisher(settings.kafka, linger_ms=0)
        self.dlq = DeadLetterSink(
            self.publisher, self.topics.dead_letters, service="learner", on_dead_letter=metrics.count_dead_letter
        )
        self._stop = asyncio.Event()
        self.last_trained_ids: list[str] = []
        self.last_trained_versions: list[int] = []
        self._exported: dict[str, int] = {}
        n_eval_prompts = sum(1 for p in load_prompts(settings.prompts) if p.split == "eval")
        self._eval_size = max(1, min(settings.eval_prompts, n_eval_prompts))
        self.load_checkpoint()
        newest = newest_policy_version(self.policy_store)
        if newest > self.state.version:
            log.warning("version_floor_from_policy_store", checkpoint_version=self.state.version, newest=newest)
            self.state.version = newest

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, weights_file: Path | None = None, weights_sha256: str = "") -> None:
        """Weights, AdamW state, offsets and ledger in one atomic file. Right after a push the weights are
        already durable in the policy store, so the checkpoint refers to that file instead of writing them twice.
        """
        tensors: dict[str, torch.Tensor] = {}
        st_ = self.state
        meta = {
            "step": str(st_.step),
            "version": str(st_.version),
            "offsets": json.dumps(st_.offsets),
            "trained": json.dumps(sorted(st_.trained)),
            "dropped": json.dumps(sorted(st_.dropped)),
            "counters": json.dumps(st_.counters),
            "pending": json.dumps([encode(e).decode() for group in st_.pending.values() for e in group.values()]),
            "eval_answers": json.dumps([encode(e).decode() for r in st_.eval_answers.values() for e in r.values()]),
            "eval_reported": json.dumps(sorted(st_.eval_reported)),
        }
        if weights_file is None:
            tensors = {f"model.{k}": v for k, v in weights_on_cpu(self.model, self.s.lora).items()}
        else:
            meta |= {"weights_file": weights_file.name, "weights_sha256": weights_sha256}
        optim_tensors, optim_meta = _optim_state.to_checkpoint(self.optimizer.state_dict()["state"])
        tensors |= optim_tensors  # a LoRA adapter's AdamW state: 3 packed tensors, not 720
        meta |= optim_meta
        write_safetensors(tensors, self.ckpt_path, meta)  # weights, offsets and ledger move together
        log.info("checkpoint_saved", step=st_.step, version=st_.version, offsets=st_.offsets)

    def load_checkpoint(self) -> None:
        if not self.ckpt_path.exists():
            return
        from safetensors import safe_open

        with safe_open(str(self.ckpt_path), framework="pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(self.ckpt_path))
        if "weights_file" in meta:
            blob = (self.policy_store / meta["weights_file"]).read_bytes()
            if sha256_hex(blob) != meta["weights_sha256"]:
                raise IntegrityError(f"checkpoint weights {meta['weights_file']} do not match their sha256")
            model_state = load_weights_blob(blob, self.model, self.s.lora)
        else:
            model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        apply_weights(self.model, model_state, self.s.lora)
        opt = self.optimizer.state_dict()
        opt["state"] = _optim_state.from_checkpoint(tensors, meta)
        self.optimizer.load_state_dict(opt)
        st_ = self.state
        st_.step, st_.version = int(meta["step"]), int(meta["version"])
        st_.offsets = json.loads(meta["offsets"])
        st_.trained = set(json.loads(meta["trained"]))
        st_.dropped = set(json.loads(meta.get("dropped", "[]")))
        st_.counters.update(json.loads(meta["counters"]))
        for raw in json.loads(meta["pending"]):
            event = decode(raw.encode(), JudgedRollout)
            st_.pending.setdefault(event.rollout.group_id, {})[event.rollout.rollout_id] = event
            st_.group_seen_at[event.rollout.group_id] = time.monotonic()
        for raw in json.loads(meta.get("eval_answers", "[]")):
            event = decode(raw.encode(), JudgedRollout)
            st_.eval_answers.setdefault(event.rollout.eval_round or 0, {})[event.rollout.prompt_id] = event
        st_.eval_reported = set(json.loads(meta.get("eval_reported", "[]")))
        log.info("checkpoint_resumed", step=st_.step, version=st_.version, offsets=st_.offsets)

    # ---- intake ------------------------------------------------------------------------------------
    async def intake(self, record: Any) -> None:
        st_ = self.state
        st_.offsets[f"{record.topic}:{record.partition}"] = record.offset + 1
        try:
            event = decode(record.value, JudgedRollout)
        except SchemaError as exc:
            st_.counters["dead_lettered"] += 1
            await self.dlq.send(record, exc)
            return
        rollout = event.rollout
        if rollout.split == "eval":
            st_.counters["eval_consumed"] += 1
            await self._collect_eval(event)
            return
        group = st_.pending.setdefault(rollout.group_id, {})
        if rollout.rollout_id in st_.trained or rollout.rollout_id in st_.dropped or rollout.rollout_id in group:
            st_.counters["duplicates"] += 1  # at-least-once delivery: the ledger makes it effectively-once
            return
        st_.counters["consumed"] += 1
        group[rollout.rollout_id] = event
        st_.group_seen_at.setdefault(rollout.group_id, time.monotonic())

    async def _collect_eval(self, event: JudgedRollout) -> None:
        """Held-out evaluation: once every eval prompt of a round is judged, publish one EvalResult."""
        eval_round = event.rollout.eval_round or 0
        st_ = self.state
        if eval_round in st_.eval_reported:
            st_.counters["eval_duplicates"] += 1
            return
        answers = st_.eval_answers.setdefault(eval_round, {})
        answers[event.rollout.prompt_id] = event
        if len(answers) < self._eval_size:
            return
        del st_.eval_answers[eval_round]
        st_.eval_reported.add(eval_round)
        events = list(answers.values())
        versions = [e.rollout.policy_version for e in events]
        summary = eval_summary(events)
        result = EvalResult(
            policy_version=max(set(versions), key=versions.count),
            eval_round=eval_round,
            n=len(events),
            reward_mean=summary["reward"],
            by_principle=summary["by_principle"],
            constitution_id=events[0].constitution_id,
            reward_by_prompt=summary["reward_by_prompt"],
        )
        await self.publisher.send(self.topics.eval, result, key=str(eval_round))
        log.info(
            "eval_result",
            eval_round=eval_round,
            policy_version=result.policy_version,
            reward=round(result.reward_mean, 4),
        )

    def ready_groups(self) -> list[list[JudgedRollout]]:
        """Complete groups (and groups that waited too long with at least two members), oldest first."""
        st_, now, ready = self.state, time.monotonic(), []
        for gid in list(st_.pending):
            members = list(st_.pending[gid].values())
            size = members[0].rollout.group_size if members else 0
            timed_out = now - st_.group_seen_at.get(gid, now) > self.s.group_timeout_s
            if members and (len(members) >= size or (timed_out and len(members) >= 2)):
                ready.append(members)
            elif timed_out:
                st_.counters["dropped_incomplete"] += len(members)
                st_.dropped.update(m.rollout.rollout_id for m in members)
                del st_.pending[gid]
        return ready

    # ---- one optimizer step ------------------------------------------------------------------------
    def train_step(self, groups: list[list[JudgedRollout]]) -> dict[str, float]:
        st_, rows, advantages = self.state, [], []
        staleness: list[int] = []
        kept: list[list[JudgedRollout]] = []
        for members in groups:
            fresh = [m for m in members if st_.version - m.rollout.policy_version <= self.s.max_staleness]
            if len(fresh) < 2:  # one completion has no group to be compared with
                fresh = []
            stale = [m.rollout.rollout_id for m in members if m not in fresh]
            st_.counters["dropped_stale"] += len(stale)
            st_.dropped.update(stale)
            if not fresh:  # a wholly stale group teaches nothing (and has no mean to normalise by)
                continue
            kept.append(fresh)
            staleness.extend(st_.version - m.rollout.policy_version for m in fresh)
        scaled = step_advantages(
            [[m.reward for m in g] for g in kept], self.s.advantage_scale, std_floor=self.s.advantage_std_floor
        )
        for fresh, group_adv in zip(kept, scaled, strict=True):
            rows.extend(fresh)
            advantages.extend(group_adv)
        out: dict[str, float] = {}
        if rows:
            lr = learning_rate_at(st_.step, self.s.learning_rate, self.s.lr_decay_steps, self.s.lr_min_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            # Each epoch is ppo_minibatches AdamW updates, on disjoint whole groups, of the same rollouts; the
            # clip (against the behaviour log-probs, or the proximal ones: ppo_clip_against) bounds how far the
            # later ones move. Metrics are the first epoch's (what the rollouts saw), averaged over its minibatches.
            ref_cache: dict[int, torch.Tensor] = {}  # micro-batch start -> reference log-probs, kept across epochs
            prox_cache: dict[int, torch.Tensor] = {}  # the same for the proximal policy's (ppo_clip_against)
            spans = minibatch_spans([len(g) for g in kept], self.s.ppo_minibatches)
            for epoch in range(self.s.ppo_epochs):
                epoch_sums: dict[str, float] = {}
                for lo, hi in spans:
                    sums, grad_norm = self._update(
                        rows, advantages, lo, hi, ref_cache, prox_cache, with_entropy=epoch == 0
                    )
                    for k, v in {**sums, "grad_norm": grad_norm}.items():
                        epoch_sums[k] = epoch_sums.get(k, 0.0) + v * (hi - lo) / len(rows)
                if epoch == 0:
                    out = {**epoch_sums, "lr": lr}
            if self.s.ppo_epochs > 1:
                out["clip_frac_last_epoch"] = epoch_sums["clip_frac"]
            if self.frozen_prefix is not None:
                self.frozen_prefix.forget()
        out.update(
            {
                "reward_mean": sum(m.reward for g in groups for m in g) / max(1, sum(len(g) for g in groups)),
                "trained_rollouts": float(len(rows)),
                # how far a group's completions spread in reward: near the judge's noise, std scaling amplifies it
                "reward_std_mean": statistics.fmean(statistics.pstdev(m.reward for m in g) for g in kept)
                if kept
                else 0.0,
                "staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
                "staleness_max": float(max(staleness, default=0)),
            }
        )
        self.record_step(groups, rows)
        return out

    def _update(
        self,
        rows: list[JudgedRollout],
        advantages: list[float],
        lo: int,
        hi: int,
        ref_cache: dict[int, torch.Tensor],
        prox_cache: dict[int, torch.Tensor],
        with_entropy: bool,
    ) -> tuple[dict[str, float], float]:
        """One optimizer update over ``rows[lo:hi]`` in ``grad_accum`` micro-batches; its metrics and gradient norm.

        ``ref_cache`` holds each micro-batch's reference log-probs, by its start in ``rows``: filled by the first
        epoch, reused by the rest; ``prox_cache`` the proximal policy's, taken from the first epoch's own forward
        (no extra pass). ``with_entropy``: whether the metrics include the policy's entropy (only the first
        epoch's are reported).
        """
        self.optimizer.zero_grad(set_to_none=True)
        micro = max(1, (hi - lo) // self.s.grad_accum)
        sums: dict[str, float] = {}
        for start in range(lo, hi, micro):
            chunk = rows[start : min(hi, start + micro)]
            sequences = [(m.rollout.prompt_token_ids, m.rollout.completion_token_ids) for m in chunk]
            temperature = chunk[0].rollout.sampling.temperature
            prefix = self.frozen_prefix
            if start not in ref_cache:
                with prefix.recording(start) if prefix else contextlib.nullcontext():
                    ref_cache[start] = reference_logprobs(
                        self.model,
                        self.reference,
                        sequences,
                        self.tokenizer.pad_token_id,
                        temperature,
                        self.share_prompts,
                    )
            with prefix.replaying(start) if prefix else contextlib.nullcontext():
                loss, part = micro_batch_loss(
                    self.model,
                    self.reference,
                    sequences,
                    [m.rollout.behaviour_logprobs for m in chunk],
                    advantages[start : start + len(chunk)],
                    self.tokenizer.pad_token_id,
                    temperature,
                    self.loss_cfg,
                    self.share_prompts,
                    ref_logp=ref_cache[start],
                    with_entropy=with_entropy,
                    proximal=prox_cache,
                    at=start,
                )
            (loss * len(chunk) / (hi - lo)).backward()
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v * len(chunk) / (hi - lo)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.requires_grad], self.s.max_grad_norm
        )
        self.optimizer.step()
        return sums, float(grad_norm)

    def record_step(self, groups: list[list[JudgedRollout]], rows: list[JudgedRollout]) -> None:
        """Ledger bookkeeping of one step: ``rows`` were trained on; ``groups`` leave the buffer."""
        st_ = self.state
        st_.trained.update(m.rollout.rollout_id for m in rows)
        st_.counters["trained_rows"] += len(rows)
        for members in groups:
            st_.pending.pop(members[0].rollout.group_id, None)
            st_.group_seen_at.pop(members[0].rollout.group_id, None)
        st_.step += 1
        self.last_trained_ids = [m.rollout.rollout_id for m in rows]
        self.last_trained_versions = [m.rollout.policy_version for m in rows]

    def _export_metrics(self, step_metrics: dict[str, float]) -> None:
        metrics.LEARNER_STEP.set(self.state.step)
        for name, value in step_metrics.items():
            metrics.LEARNER_METRIC.labels(name).set(value)
        for version in self.last_trained_versions:
            metrics.STALENESS.observe(self.state.version - version)
        for reason in ("dropped_stale", "dropped_incomplete", "duplicates"):
            new = self.state.counters[reason] - self._exported.get(reason, 0)
            metrics.LEARNER_DROPPED.labels(reason).inc(max(0, new))
            self._exported[reason] = self.state.counters[reason]

    # ---- publishing weights ------------------------------------------------------------------------
    async def publish_policy(self, step_metrics: dict[str, float]) -> None:
        st_ = self.state
        st_.version += 1
        path = self.policy_store / f"v{st_.version:06d}.safetensors"
        # seconds of disk work for full weights: in threads, so the event loop (and the producer) keeps going
        chunks, placed = await asyncio.to_thread(self._write_policy_file, path, st_.version)
        update = PolicyUpdate(
            policy_version=st_.version,
            learner_step=st_.step,
            base_model=self.s.student_model,
            kind="lora" if self.s.lora else "full",
            sha256=placed.sha256,
            size_bytes=placed.size,
            n_chunks=len(chunks),
            uri=None if chunks else f"file://{path}",
            metrics=step_metrics,
        )
        # one batch: the announcement and its chunks reach the broker together
        batch = [(str(st_.version), e) for e in (update, *chunks)]
        if self.s.weights_durable_before_announce:
            await asyncio.to_thread(placed.make_durable)
            await self.publisher.send_many(self.topics.policy, batch)
        else:  # the fsync runs while the announcement travels and the generators read the page cache
            await asyncio.gather(
                asyncio.to_thread(placed.make_durable), self.publisher.send_many(self.topics.policy, batch)
            )
        # After the announcement, off the generators' path, and once the file it refers to is durable: a learner
        # killed before this checkpoint comes back from an older one, but numbers its next version after the
        # newest file in the policy store, so it can never announce a *different* version N (generators ignore
        # versions they have seen; for a power cut, see VisibleFile).
        await asyncio.to_thread(self.save_checkpoint, path, placed.sha256)
        log.info("policy_published", policy_version=st_.version, bytes=placed.size, chunks=len(chunks))

    def _write_policy_file(self, path: Path, version: int) -> tuple[list[PolicyChunk], VisibleFile]:
        """Write the weights once, atomically but not yet durably; up to ``weights_inline_max_bytes`` they also
        travel inline as chunks."""
        metadata = {"policy_version": str(version)}
        # decided on the model's own tensors: the adapter is copied off a GPU once, by serialize_weights
        if travelling_bytes(self.model, self.s.lora) > SMALL_PAYLOAD_BYTES:
            # streamed: full weights need not fit in memory twice
            tensors = weights_on_cpu(self.model, self.s.lora)
            # durable first: the data's fsync overlaps the hash, as the announcement waits for both anyway
            sync_data = self.s.weights_durable_before_announce
            placed, blob = place_safetensors(tensors, path, metadata, sync_data=sync_data), None
        else:  # an adapter: serialized once, the same bytes hashed (while they are written), written and chunked
            blob = serialize_weights(self.model, self.s.lora, metadata)
            placed = place_blob(blob, path)
        if placed.size > self.s.weights_inline_max_bytes:
            return [], placed
        inline = blob if blob is not None else path.read_bytes()
        return split_chunks(inline, version, digest=placed.sha256), placed

    # ---- the loop ----------------------------------------------------------------------------------
    async def run(self) -> None:
        s, st_ = self.s, self.state
        metrics.serve_metrics(s.metrics_port, s.metrics_host)
        await ensure_topics(s.kafka, self.topics.specs())
        await self.publisher.start()
        consumer = make_consumer(s.kafka, group_id=None)
        await consumer.start()
        try:
            parts = sorted(consumer.partitions_for_topic(self.topics.rewards) or [])
            tps = [TopicPartition(self.topics.rewards, p) for p in parts]
            consumer.assign(tps)
            for tp in tps:
                offset = st_.offsets.get(f"{tp.topic}:{tp.partition}")
                if offset is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, offset)
            log.info("learner_started", step=st_.step, version=st_.version, lora=s.lora, model=s.student_model)
            while not self._stop.is_set() and not (s.max_steps and st_.step >= s.max_steps):
                batches = await consumer.getmany(timeout_ms=200, max_records=500)
                for records in batches.values():
                    for record in records:
                        await self.intake(record)
                ready = self.ready_groups()
                while len(ready) >= s.groups_per_step and not (s.max_steps and st_.step >= s.max_steps):
                    groups, ready = ready[: s.groups_per_step], ready[s.groups_per_step :]
                    started = time.perf_counter()
                    step_metrics = await asyncio.to_thread(self.train_step, groups)
                    step_metrics["step_seconds"] = time.perf_counter() - started
                    await self.publisher.send(
                        self.topics.learner,
                        LearnerStep(
                            step=st_.step,
                            policy_version=st_.version,
                            rollout_ids=self.last_trained_ids,
                            rollout_versions=self.last_trained_versions,
                            reward_mean=step_metrics["reward_mean"],
                            metrics=step_metrics,
                        ),
                    )
                    log.info("learner_step", step=st_.step, **{k: round(v, 4) for k, v in step_metrics.items()})
                    self._export_metrics(step_metrics)
                    if st_.step % s.push_every == 0:
                        await self.publish_policy(step_metrics)  # checkpoints too
                    elif st_.step % s.checkpoint_every == 0:
                        self.save_checkpoint()
            self.save_checkpoint()
            log.info(
                "learner_finished",
                step=st_.step,
                version=st_.version,
                counters=st_.counters,
                pending=sum(len(g) for g in st_.pending.values()),
            )
        finally:
            await stop_consumer(consumer)
            await self.publisher.stop()

    def stop(self) -> None:
        self._stop.set()


def run(settings: Settings) -> None:
    run_until_signalled(lambda: Learner(settings))


def eval_summary(answers: list[JudgedRollout]) -> dict[str, Any]:
    """A held-out round's figures from its judged answers (one per eval prompt): the mean reward over prompts,
    each principle's mean score and the reward by prompt. The EvalResult and ``rlaif bench learning``'s
    rounds both come from here."""
    by_prompt = {e.rollout.prompt_id: e.reward for e in answers}
    return {
        "reward": sum(by_prompt.values()) / len(by_prompt),
        "by_principle": {k: sum(e.scores[k] for e in answers) / len(answers) for k in sorted(answers[0].scores)},
        "reward_by_prompt": by_prompt,
    }


def newest_policy_version(store: Path) -> int:
    """The highest version with a weights file in the policy store (0 if none).

    >>> newest_policy_version(Path("/nonexistent"))
    0
    """
    names = (p.stem for p in store.glob("v*.safetensors"))
    return max((int(n[1:]) for n in names if n[1:].isdigit()), default=0)


def checkpoint_path(run_dir: Path) -> Path:
    return (run_dir / "learner" / "checkpoint.safetensors").resolve()


def read_checkpoint_accounting(run_dir: Path) -> dict[str, Any] | None:
    """The learner's ledger as saved atomically with its weights: trained / dropped / pending ids, offsets."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    pending = [decode(raw.encode(), JudgedRollout).rollout.rollout_id for raw in json.loads(meta["pending"])]
    return {
        "step": int(meta["step"]),
        "trained": set(json.loads(meta["trained"])),
        "dropped": set(json.loads(meta.get("dropped", "[]"))),
        "pending": set(pending),
        "offsets": json.loads(meta["offsets"]),
        "counters": json.loads(meta["counters"]),
    }
