"""The frozen reference's log-probs, computed while the step before the one that needs them trains.

The KL term needs each trained completion's log-probs under the frozen reference: one forward pass without
gradients, a sixth of a default-profile CPU step on one thread (measured 4.2 s of 25.2: the reference, then
two updates). They depend on nothing the learner changes, so they can be computed as soon as a group is judged,
in a thread of their own, while the training thread runs the step before. On a 2-core CPU the learner trains
on one thread (``torch_threads=1``) and the generator and the judge leave part of the other core idle; that
is where this work goes, off the step's critical path.

A LoRA policy's reference is its base with the adapter disabled, a switch on the shared model that the
training thread flips too, so this thread needs a frozen copy of the base of its own (one more copy of the
weights: ~540 MB for SmolLM2-135M in float32). Full-weight mode already keeps one and shares it: a module in
``eval`` mode under ``no_grad`` is only read.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from schemas import Rollout
from services._learner_algo import reference_logprobs


def _at_idle_priority() -> None:
    """Lower this thread's priority to the lowest (Linux schedules threads one by one; elsewhere the call
    would renice the whole process, so it is skipped).

    The work here is ahead of need: it should take a core only when the generator, the judge and the training
    thread leave it idle. At normal priority it took its fair share from them: measured with a generator
    sampling on the other core, a step was 1.06x slower than with the reference computed on the training
    thread. When the training thread does wait for it, that thread's core is free and the work gets it.
    """
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def reference_ahead_by_default(device: str) -> bool:
    """Whether the learner should compute reference log-probs ahead: on a CPU, where a step leaves the other
    core's spare time unused; on a GPU the reference pass would queue behind the step's kernels anyway.

    >>> reference_ahead_by_default("cpu"), reference_ahead_by_default("cuda")
    (True, False)
    """
    return device == "cpu"


class ReferenceAhead:
    """Groups of train rollouts in, their reference log-probs out: computed in one worker thread, group after
    group, as each group completes.

    ``offer`` every judged train rollout; ``take`` a micro-batch's log-probs (waiting for a group being
    computed, computing one not started yet on the caller's thread) or None when a row's group never
    completed (a member was dead-lettered: the learner computes those itself); ``retain`` the groups still
    buffered, so nothing outlives its group.
    """

    def __init__(self, reference: torch.nn.Module, pad_id: int, share_prompts: bool) -> None:
        self.reference = reference.eval()
        self.pad_id = pad_id
        self.share_prompts = share_prompts
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="rlaif-reference", initializer=_at_idle_priority
        )
        self._partial: dict[str, dict[str, Rollout]] = {}  # group id -> rollout id -> rollout, until complete
        self._done: dict[str, Future[dict[str, torch.Tensor]]] = {}  # group id -> rollout id -> 1-D log-probs
        self._members: dict[str, list[Rollout]] = {}  # group id -> the rollouts submitted for it
        self._closed = False

    def offer(self, rollout: Rollout) -> None:
        if self._closed or rollout.split != "train" or rollout.group_id in self._done:
            return
        members = self._partial.setdefault(rollout.group_id, {})
        members[rollout.rollout_id] = rollout
        if len(members) >= rollout.group_size:
            del self._partial[rollout.group_id]
            group = list(members.values())
            self._members[rollout.group_id] = group
            self._done[rollout.group_id] = self._pool.submit(self._compute, group)

    def _compute(self, rollouts: list[Rollout]) -> dict[str, torch.Tensor]:
        sequences = [(r.prompt_token_ids, r.completion_token_ids) for r in rollouts]
        temperature = rollouts[0].sampling.temperature
        logp = reference_logprobs(
            self.reference, self.reference, sequences, self.pad_id, temperature, self.share_prompts
        )
        return {r.rollout_id: logp[i, : len(r.completion_token_ids)] for i, r in enumerate(rollouts)}

    def take(self, rollouts: Sequence[Rollout]) -> torch.Tensor | None:
        """(rows, longest completion) reference log-probs, right-padded with zeros like ``reference_logprobs``."""
        rows: list[torch.Tensor] = []
        for r in rollouts:
            future = self._done.get(r.group_id)
            if future is None:
                return None
            if future.cancel():
                # not started (the idle-priority worker got no core): on the caller's thread, at its priority
                future = Future()
                future.set_result(self._compute(self._members[r.group_id]))
                self._done[r.group_id] = future
            got = future.result().get(r.rollout_id)
            if got is None:
                return None
            rows.append(got)
        out = torch.zeros((len(rows), max((len(r) for r in rows), default=0)), device=rows[0].device if rows else None)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def retain(self, group_ids: Iterable[str]) -> None:
        """Forget every group not in ``group_ids`` (trained, dropped, or never to complete)."""
        keep = set(group_ids)
        for gid in [g for g in self._partial if g not in keep]:
            del self._partial[gid]
        for gid in [g for g in self._done if g not in keep]:
            self._done.pop(gid).cancel()  # not started yet: never computed; running: finishes and is dropped
            del self._members[gid]

    @property
    def groups(self) -> int:
        """Groups held (partial or computed): what ``retain`` bounds."""
        return len(self._partial) + len(self._done)

    def close(self) -> None:
        """Stop the worker (after the group it is computing); later offers are ignored, later takes inline."""
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._partial.clear()
        self._done.clear()
        self._members.clear()
