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


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token rows padded on the left to one width.

    >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention[i, width - len(row) :] = 1
    return input_ids, attention


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
            lora_layers=settings.lora_layers,
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
        # left padding: every row's completion starts at the same column; the attention mask hides the pads and
        # generate() derives position ids from it, so a row's log-probs do not depend on its neighbours
        unique_ids, unique_attention = left_pad(encoded, tok.pad_token_id)  # each prompt once, then one row a sample
        width = unique_ids.shape[1]
        out = self.model.generate(
            input_ids=unique_ids.repeat_interleave(n, dim=0).to(self.device),
            attention_mask=unique_attention.repeat_interleave(n, dim=0).to(self.device),
            past_key_values=self._shared_prompt_cache(unique_ids, unique_attention, n) if n > 1 and width > 1 else None,
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
                        prompt_token_ids=encoded[k],
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

    def _shared_prompt_cache(self, ids: torch.Tensor, attention: torch.Tensor, n: int) -> Any:
        """The key/value cache of each left-padded prompt but its last token, computed once and repeated for
        its n samples.

        generate() would otherwise run every prompt once per sample: with G = 4 and SmolLM2's ~40-token chat
        prompts that prefill was a fifth of a batch's time on a CPU. The rows and their sampled tokens are the
        same either way (``tests/services/test_generator.py``); the last prompt token is left for generate()
        to run, as it needs one uncached token to start from.
        """
        from transformers import DynamicCache

        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # what generate() derives for the left-padded rows
        cache = DynamicCache()
        self.model(
            input_ids=ids[:, :-1].to(self.device),
            attention_mask=attention[:, :-1].to(self.device),
            position_ids=positions[:, :-1].to(self.device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        cache.batch_repeat_interleave(n)
        return cache

    async def _take_batch(self, consumer: Any) -> dict[TopicPartition, list[Any]]:
        """The prompts waiting for this generator, up to ``generate_batch`` prompts' worth of rows.

        A train prompt is ``group_size`` rows and an eval prompt one, so a batch holds up to ``generate_batch``
        train prompts or ``generate_batch x group_size`` eval prompts. Once one prompt is in hand it waits up to
        ``generate_linger_ms`` for more: the feeder publishes one by one, and a step's prompts sampled one at a
        time cost up to 2.5x what they cost together. Never waits longer for a batch to fill.
        """
        s = self.settings
        budget = s.generate_batch * s.group_size
        taken: dict[TopicPartition, list[Any]] = {}
        rows = 0
        batches = await consumer.getmany(timeout_ms=500, max_records=s.generate_batch)
        deadline = asyncio.get_running_loop().time() + s.generate_linger_ms / 1000
        while batches:
            for tp, records in batches.items():
                taken.setdefault(tp, []).extend(records)
                rows += sum(self._rows_of(record) for record in records)
            wait_s = deadline - asyncio.get_running_loop().time()
            if rows >= budget or wait_s <= 0:
                break
            # one record at a time: the next may be a train prompt that fills the budget
            batches = await consumer.getmany(timeout_ms=max(1, int(wait_s * 1000)), max_records=1)
            if not batches:
                break  # nothing more arrived within the linger
        return taken

    def _rows_of(self, record: Any) -> int:
        """Rows a prompt record adds to a batch (an undecodable one none: ``_handle`` dead-letters it)."""
        try:
            task = decode(record.value, PromptTask)
        except SchemaError:
            return 0
        return 1 if task.split == "eval" else self.settings.group_size

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
                batches = await self._take_batch(consumer)
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
