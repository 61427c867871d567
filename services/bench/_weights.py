"""Weights suite: a learner publishes new weights; how long until every generator serves them?

The project path is the real one: ``Learner.publish_policy`` after a real AdamW step (weights written once
into the policy store and announced, PolicyUpdate + PolicyChunks on the policy topic or a URI above the inline
limit, once the file is durable; then the checkpoint with the AdamW state, which refers to that file; one
mode of each kind announces first and fsyncs beside the hop) and two generator processes, as
``rlaif up`` runs them (:mod:`services.bench._weights_follower`: a real :class:`~services._generator.Generator`
running ``follow_policy`` (assemble, verify, ``_stage``) and ``_swap_if_staged``). The baseline does the
same work with a shared disk as the transport: serialize, write + fsync, then per generator read +
parse/validate (``load_weights_blob``) + ``apply_weights``. Every round pushes over the bus and then runs the
baseline on the same bytes, so the two are measured side by side; the ratio is bus / disk for the same bytes
and the same number of readers, for full weights and the LoRA adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from services._broker import EmbeddedBroker
from services._learner import Learner, LearnerState, checkpoint_path
from services._policy import apply_weights, build_policy, load_weights_blob, read_weights_file, serialize_weights
from services._settings import Settings
from services.bench._common import Report, Row
from services.bench._weights_follower import MARK
from streams import KafkaConfig, Publisher, ensure_topics

N_GENERATORS = 2


def _publisher_shell(settings: Settings, model: Any) -> Learner:
    """A Learner with only what ``publish_policy`` touches (it checkpoints after it announces a version, so
    the optimizer and the checkpoint path too), without the reference model or the consumer."""
    shell = Learner.__new__(Learner)
    shell.s = settings
    shell.state = LearnerState()
    shell.model = model
    shell.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    shell.ckpt_path = checkpoint_path(settings.run_dir)
    shell.topics = settings.topics
    shell.policy_store = (settings.run_dir / "policy").resolve()
    shell.publisher = Publisher(settings.kafka, linger_ms=0)  # as Learner.__init__
    return shell


def _optimizer_step(model: Any, optimizer: torch.optim.Optimizer, scale: float = 1e-3) -> None:
    """A real AdamW step on random gradients: every trainable tensor changes (every version is new bytes) and
    the optimizer holds its moments, which the checkpoint after each push writes like in a real run."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p) * scale
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


async def _start_followers(settings: Settings) -> list[asyncio.subprocess.Process]:
    """The generator processes, each ready (model loaded, following the policy topic)."""
    procs = []
    for i in range(N_GENERATORS):
        env = {**os.environ, **settings.model_copy(update={"service_id": f"bench-gen-{i}"}).env()}
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.bench._weights_follower", env=env, stdout=asyncio.subprocess.PIPE
            )
        )
    try:
        for proc in procs:
            while "ready" not in await _next_said(proc):
                continue
    except BaseException:
        await _stop(procs)
        raise
    return procs


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _next_said(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """The follower's next line of its own (log lines are skipped); EOF means it died."""
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"weights follower exited with {await proc.wait()}")
        with contextlib.suppress(ValueError):
            said = json.loads(line)
            if isinstance(said, dict) and said.get(MARK):
                return said


async def _rounds(settings: Settings, model: Any, readers: list[Any], rounds: int, root: Path) -> dict[str, Any]:
    """Round by round, side by side: a push over the bus, then the disk transport with the same bytes."""
    shell = _publisher_shell(settings, model)
    await ensure_topics(settings.kafka, settings.topics.specs())
    await shell.publisher.start()
    procs = await _start_followers(settings)
    swapped_at: dict[tuple[int, int], float] = {}

    async def listen(i: int, proc: asyncio.subprocess.Process) -> None:
        while True:
            said = await _next_said(proc)
            swapped_at[(i, said["version"])] = said["at"]

    listeners = [asyncio.create_task(listen(i, p)) for i, p in enumerate(procs)]
    out: dict[str, Any] = {k: [] for k in ("bus_all_swapped_s", "bus_first_swapped_s", "disk_all_applied_s")}
    out["disk_io_only_s"] = []
    try:
        # version 1 warms the followers' fetch sessions and is not measured
        for version in range(1, rounds + 2):
            _optimizer_step(model, shell.optimizer)
            started = time.monotonic()  # the followers' clock
            await shell.publish_policy({"bench": 1.0})
            deadline = started + 300
            while not all((i, version) in swapped_at for i in range(N_GENERATORS)):
                for t in listeners:
                    if t.done():
                        t.result()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"generators did not swap to v{version} within 300 s")
                await asyncio.sleep(0.001)
            if version == 1:
                continue
            times = [swapped_at[(i, version)] - started for i in range(N_GENERATORS)]
            out["bus_all_swapped_s"].append(max(times))
            out["bus_first_swapped_s"].append(min(times))
            disk_all, disk_io = await asyncio.to_thread(_disk_round, settings, model, readers, version, root)
            out["disk_all_applied_s"].append(disk_all)
            out["disk_io_only_s"].append(disk_io)
    finally:
        for t in listeners:
            t.cancel()
        await _stop(procs)
        await shell.publisher.stop()
    size = len(serialize_weights(model, settings.lora))
    out["transport"] = "chunks" if size <= settings.weights_inline_max_bytes else "uri"
    return out


def _disk_round(settings: Settings, model: Any, readers: list[Any], version: int, root: Path) -> tuple[float, float]:
    """The baseline for the version just pushed (same bytes): serialize, write + fsync, then per reader read +
    validate + apply. Returns (all of it, only the write + fsync + reads)."""
    started = time.perf_counter()
    blob = serialize_weights(model, settings.lora, metadata={"policy_version": str(version)})
    path = root / f"disk-v{version}.safetensors"
    io_started = time.perf_counter()
    with open(path, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    io_s = time.perf_counter() - io_started
    for reader in readers:
        read_started = time.perf_counter()
        data = read_weights_file(path)  # as the generators read it
        io_s += time.perf_counter() - read_started
        apply_weights(reader, load_weights_blob(data, reader, settings.lora), settings.lora)
    full = time.perf_counter() - started
    path.unlink()
    return full, io_s


async def _one_mode(
    report: Report, base: Settings, label: str, *, lora: bool, rounds: int, broker: EmbeddedBroker, **overrides: Any
) -> int:
    with tempfile.TemporaryDirectory(prefix="rlaif-bench-w-") as tmp:
        cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, topic_prefix=f"bench{uuid.uuid4().hex[:8]}.")
        update: dict[str, Any] = {"lora": lora, "kafka": cfg, "run_dir": Path(tmp) / "run", **overrides}
        settings = base.model_copy(update=update)
        build = functools.partial(
            build_policy,
            lora=lora,
            lora_rank=settings.lora_rank,
            lora_targets=settings.lora_targets,
            lora_layers=settings.lora_layers,
        )
        model, _ = build(settings.student_model, settings.cache_dir)
        readers = [build(settings.student_model, settings.cache_dir)[0] for _ in range(N_GENERATORS)]
        timings = await _rounds(settings, model, readers, rounds, Path(tmp))
        size = len(serialize_weights(model, lora))
    transport = timings.pop("transport")
    bus_med = statistics.median(timings["bus_all_swapped_s"])
    disk_med = statistics.median(timings["disk_all_applied_s"])
    report.add(
        Row(
            f"{label}: publish -> all {N_GENERATORS} generators swapped",
            bus_med * 1000,
            disk_med * 1000,
            "ms",
            ratio_meaning="bus / disk (same serialize+verify+apply; lower is better)",
            note=f"{size / 1e6:.2f} MB via {transport}, median of {rounds}",
        )
    )
    report.add(
        Row(
            f"{label}: bus vs raw disk I/O only",
            bus_med * 1000,
            statistics.median(timings["disk_io_only_s"]) * 1000,
            "ms",
            ratio_meaning="bus end-to-end / (write+fsync+2 reads)",
            note="how much of the push is transport+parsing vs bare bytes on disk",
        )
    )
    report.details[label] = {
        "payload_bytes": size,
        "transport": transport,
        **timings,
        "bus_over_io_by_round": [
            b / d for b, d in zip(timings["bus_all_swapped_s"], timings["disk_io_only_s"], strict=True)
        ],
        "model": settings.student_model,
        "lora_rank": settings.lora_rank if lora else None,
    }
    return size


async def run_weights(report: Report, *, quick: bool, device: str = "cpu") -> None:
    del device  # the policy moves between processes on the CPU side; serving devices do not change the path
    base = Settings(profile="tiny" if quick else "default", lora_rank=8, partitions=1)
    rounds = 3 if quick else 5
    with EmbeddedBroker() as broker:
        full_bytes = await _one_mode(report, base, "full", lora=False, rounds=rounds, broker=broker)
        # announced before its fsync, which then runs beside the hop (weights_durable_before_announce=False)
        fsync_beside = {"weights_durable_before_announce": False}
        label = "full, fsync beside the announcement"
        await _one_mode(report, base, label, lora=False, rounds=rounds, broker=broker, **fsync_beside)
        lora_bytes = await _one_mode(report, base, "lora", lora=True, rounds=rounds, broker=broker)
        # the same adapter announced by URI: what the push costs where generators share the learner's disk
        by_uri = {"weights_inline_max_bytes": 0}
        await _one_mode(report, base, "lora via policy store", lora=True, rounds=rounds, broker=broker, **by_uri)
        label = "lora via store, fsync beside the announcement"
        await _one_mode(report, base, label, lora=True, rounds=rounds, broker=broker, **by_uri, **fsync_beside)
        # and with generators polling the policy topic every 5 ms instead of 50 (Tansu answers a waiting
        # fetch late; the price is idle polling, see Settings.policy_fetch_wait_ms)
        fast = {**by_uri, "policy_fetch_wait_ms": 5}
        label = "lora via store, 5 ms fetch wait"
        await _one_mode(report, base, label, lora=True, rounds=rounds, broker=broker, **fast)
    report.add(
        Row(
            "LoRA payload is smaller by",
            full_bytes / lora_bytes,
            10.0,
            "x",
            ratio=full_bytes / lora_bytes / 10.0,
            ratio_meaning="(full / LoRA bytes) / target 10x; >= 1 meets the target",
            note=(
                f"full {full_bytes / 1e6:.2f} MB, "
                f"LoRA r{base.lora_rank} on {base.lora_targets} {lora_bytes / 1e6:.3f} MB"
            ),
        )
    )
    report.details["model"] = base.student_model
    report.details["generators"] = N_GENERATORS
