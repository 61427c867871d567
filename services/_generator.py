"""The generator: samples completions from the student and publishes rollouts.

Two loops share one process. The *prompt loop* takes PromptTasks (consumer group ``generators``), samples
``group_size`` completions per prompt (the prompts waiting for it, up to ``generate_batch``, in one batched
``generate`` call), and publishes them as Rollouts with their token ids and behaviour log-probs. The *policy
loop* reads every PolicyUpdate (no group: each generator sees every update), verifies the weights and stages
them; the prompt loop swaps them in between two generations, so the process never restarts and never
generates with half-loaded weights.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog
import torch
from aiokafka import TopicPartition

from schemas import (
    IntegrityError,
    PolicyChunk,
    PolicyUpdate,
    PromptTask,
    Rollout,
    SamplingParams,
    SchemaError,
    new_id,
)
from services import _metrics as metrics
from services._policy import apply_weights, build_policy, load_weights_blob, read_weights_file, render_prompt
from services._proc import default_service_id, run_until_signalled
from services._settings import Settings
from streams import (
    ChunkAssembler,
    DeadLetterSink,
    Publisher,
    decode,
    decode_any,
    ensure_topics,
    make_consumer,
    read_from_start,
    stop_consumer,
    verify_blob,
)

log = structlog.get_logger(__name__)


def resolve_weights_uri(uri: str, root: Path) -> Path:
    """A weights location must be a file under the weights store; anything else is refused.

    >>> resolve_weights_uri("file:///etc/passwd", Path("/tmp/store"))
    Traceback (most recent call last):
    ...
    schemas._errors.IntegrityError: weights location file:///etc/passwd is outside the weights store
    """
    if not uri.startswith("file://"):
        raise IntegrityError(f"unsupported weights location {uri!r}")
    path = Path(uri.removeprefix("file://")).resolve()
    if not path.is_relative_to(root.resolve()):
        raise IntegrityError(f"weights location {uri} is outside the weights store")
    return path


class Generator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.generator_id = settings.service_id or default_service_id("generator")
        torch.set_num_threads(settings.torch_threads)
        self.model, self.tokenizer = build_policy(
            settings.student_model,
            settings.cache_dir,
            lora=settings.lora,
            lora_rank=settings.lora_rank,
            lora_targets=settings.lora_targets,
            seed=settings.seed,
            device=settings.device,
        )
        self.device = torch.device(settings.device)
        self.model.eval()
        self.version = 0
        self._staged: tuple[int, Mapping[str, torch.Tensor]] | None = None
        self._staged_lock = threading.Lock()
        self._counter = 0
        self.topics = settings.topics
        self.publisher = Publisher(settings.kafka)
        self.dlq = DeadLetterSink(
            self.publisher,
            self.topics.dead_letters,
            service=self.generator_id,
            on_dead_letter=metrics.count_dead_letter,
        )
        self._stop = asyncio.Event()

    # ---- policy loop -------------------------------------------------------------------------------
    async def follow_policy(self) -> None:
        assembler: ChunkAssembler | None = None
        store = (self.settings.run_dir / "policy").resolve()
        policy = [self.topics.policy]
        async for record in read_from_start(
            self.settings.kafka, policy, fetch_max_wait_ms=self.settings.policy_fetch_wait_ms
        ):
            try:
                event = decode_any(record.value)
                if isinstance(event, PolicyUpdate):
                    if event.policy_version <= self.version:
                        assembler = None
                        continue
                    if event.uri:
                        # hundreds of MB to read, hash and parse: off the event loop, so consuming goes on
                        await asyncio.to_thread(self._stage_file, event, resolve_weights_uri(event.uri, store))
                        assembler = None
                    else:
                        assembler = ChunkAssembler(event)
                elif isinstance(event, PolicyChunk) and assembler is not None:
                    blob_or_none = assembler.feed(event)
                    if blob_or_none is not None:
                        await asyncio.to_thread(self._stage, event.policy_version, blob_or_none)
                        assembler = None
            except (SchemaError, IntegrityError, OSError) as exc:
                assembler = None
                log.error("policy_update_rejected", error=str(exc), offset=record.offset, serving=self.version)
                await self.dlq.send(record, exc)

    def _stage_file(self, update: PolicyUpdate, path: Path) -> None:
        blob = read_weights_file(path)
        # hash and parse side by side (both mostly outside the GIL); nothing is staged unless the hash matches
        with ThreadPoolExecutor(max_workers=1) as pool:
            verified = pool.submit(verify_blob, blob, update)
            tensors = load_weights_blob(blob, self.model, self.settings.lora)
            verified.result()
        self._stage_tensors(update.policy_version, tensors, len(blob))

    def _stage(self, version: int, blob: bytes) -> None:
        self._stage_tensors(version, load_weights_blob(blob, self.model, self.settings.lora), len(blob))

    def _stage_tensors(self, version: int, tensors: Mapping[str, torch.Tensor], size: int) -> None:
        with self._staged_lock:
            if self._staged is None or self._staged[0] < version:
                self._staged = (version, tensors)
        log.info("policy_staged", policy_version=version, bytes=size)

    def _swap_if_staged(self) -> None:
        with self._staged_lock:
            staged, self._staged = self._staged, None
        if staged is not None and staged[0] > self.version:
            apply_weights(self.model, staged[1], self.settings.lora)
            log.info("policy_swapped", old=self.version, new=staged[0], generator_id=self.generator_id)
            self.version = staged[0]
            metrics.POLICY_VERSION.labels(self.generator_id).set(self.version)

    # ---- prompt loop -------------------------------------------------------------------------------
    def generate(self, task: PromptTask) -> list[Rollout]:
        """Sample a group of completions (greedy, one completion, for eval prompts)."""
        return self.generate_batch([task])[0]

    def generate_batch(self, tasks: list[PromptTask]) -> list[list[Rollout]]:
        """Sample the groups of several prompts, one list of rollouts per task, in the order given.

        A decoding step reads every weight once whatever the batch, so on a CPU it costs about the same for
        8 rows as for 4 (SmolLM2-135M, one thread: 113 ms for 4, 125 ms for 8, 192 ms for 16): the prompts
        waiting for this generator are sampled together. Eval prompts (greedy) and train prompts (sampled)
        cannot share one call; each kind is one call.
        """
        self._swap_if_staged()
        out: dict[int, list[Rollout]] = {}
        for greedy in (True, False):
            picked = [(i, t) for i, t in enumerate(tasks) if (t.split == "eval") == greedy]
            if picked:
                groups = self._sample([t for _, t in picked], greedy)
                out.update((i, g) for (i, _), g in zip(picked, groups, strict=True))
        return [out[i] for i in range(len(tasks))]

    @torch.inference_mode()
    def _sample(self, tasks: list[PromptTask], greedy: bool) -> list[list[Rollout]]:
        s, tok = self.settings, self.tokenizer
        n = 1 if greedy else s.group_size
        self._counter += 1
        key = f"{self.generator_id}:{','.join(t.prompt_id for t in tasks)}:{self._counter}"
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
        torch.manual_seed(seed)
        encoded = [tok(render_prompt(tok, t.text), add_special_tokens=False)["input_ids"] for t in tasks]
        prompts = [ids for ids in encoded for _ in range(n)]  # each prompt tokenized once, one row per sample
        # left padding: every row's completion starts at the same column; the attention mask hides the pads and
        # generate() derives position ids from it, so a row's log-probs do not depend on its neighbours
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            do_sample=not greedy,
            temperature=s.temperature if not greedy else None,
            top_p=s.top_p if not greedy else None,
            top_k=0 if not greedy else None,
            max_new_tokens=s.max_new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        new_tokens = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float()  # raw logits: (rows, steps, vocab)
        temperature = 1.0 if greedy else s.temperature
        logprobs = (
            torch.log_softmax(logits / temperature, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1).cpu()
        )
        sampling = SamplingParams(
            temperature=temperature,
            top_p=1.0 if greedy else s.top_p,
            max_new_tokens=s.max_new_tokens,
            seed=seed,
            greedy=greedy,
        )
        groups: list[list[Rollout]] = []
        for k, task in enumerate(tasks):
            group_id = new_id()
            rollouts = []
            for row in range(k * n, (k + 1) * n):
                ids = new_tokens[row].tolist()
                if tok.eos_token_id in ids:
                    ids = ids[: ids.index(tok.eos_token_id) + 1]  # keep EOS: stopping is learned too
                rollouts.append(
                    Rollout(
                        rollout_id=new_id(),
                        group_id=group_id,
                        group_size=n,
                        prompt_id=task.prompt_id,
                        prompt=task.text,
                        completion=tok.decode(ids, skip_special_tokens=True).strip(),
                        prompt_token_ids=prompts[row],
                        completion_token_ids=ids,
                        behaviour_logprobs=[min(0.0, float(x)) for x in logprobs[row, : len(ids)]],
                        policy_version=self.version,
                        generator_id=self.generator_id,
                        sampling=sampling,
                        split=task.split,
                        eval_round=task.eval_round,
                    )
                )
            groups.append(rollouts)
        return groups

    async def run(self) -> None:
        metrics.serve_metrics(self.settings.metrics_port, self.settings.metrics_host)
        metrics.POLICY_VERSION.labels(self.generator_id).set(self.version)
        await ensure_topics(self.settings.kafka, self.topics.specs())
        await self.publisher.start()
        policy_task = asyncio.create_task(self.follow_policy())
        consumer = make_consumer(
            self.settings.kafka, self.topics.prompts, group_id="generators", max_poll_interval_ms=600_000
        )
        await consumer.start()
        log.info("generator_started", generator_id=self.generator_id, model=self.settings.student_model)
        try:
            while not self._stop.is_set():
                # what is waiting, up to a batch: never wait for a batch to fill (a lone prompt goes alone)
                batches = await consumer.getmany(timeout_ms=500, max_records=self.settings.generate_batch)
                records = [record for tp_records in batches.values() for record in tp_records]
                if records:
                    await self._handle(records)
                    # after publishing: a generator killed mid-batch leaves its prompts to the next one
                    await consumer.commit(
                        {TopicPartition(tp.topic, tp.partition): rs[-1].offset + 1 for tp, rs in batches.items() if rs}
                    )
                if policy_task.done():
                    policy_task.result()  # re-raise a crash of the policy loop
        finally:
            policy_task.cancel()
            await stop_consumer(consumer)
            await self.publisher.stop()

    async def _handle(self, records: list[Any]) -> None:
        tasks, taken = [], []
        for record in records:
            try:
                tasks.append(decode(record.value, PromptTask))
                taken.append(record)
            except SchemaError as exc:
                await self.dlq.send(record, exc)
        if not tasks:
            return
        metrics.EVENTS_IN.labels("generator", self.topics.prompts).inc(len(tasks))
        with metrics.GENERATION_SECONDS.labels(self.generator_id).time():
            groups = await asyncio.to_thread(self.generate_batch, tasks)
        rollouts = [r for group in groups for r in group]
        await self.publisher.send_many(self.topics.rollouts, [(r.group_id, r) for r in rollouts])
        metrics.ROLLOUTS.labels(self.generator_id).inc(len(rollouts))
        metrics.EVENTS_OUT.labels("generator", self.topics.rollouts).inc(len(rollouts))
        for task, record, group in zip(tasks, taken, groups, strict=True):
            log.info(
                "rollouts_published",
                prompt_id=task.prompt_id,
                n=len(group),
                policy_version=self.version,
                offset=record.offset,
                partition=record.partition,
            )

    def stop(self) -> None:
        self._stop.set()


def run(settings: Settings) -> None:
    run_until_signalled(lambda: Generator(settings))
