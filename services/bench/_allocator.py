"""The compute suite's allocator rows: the learner step and the generator under glibc's default malloc and
under :data:`~services._malloc.TUNED_MALLOC`, each in a fresh child process (glibc reads its settings only at
exec), measured in a worker thread as the learner runs its steps (``asyncio.to_thread``).

``python -m services.bench._allocator STUDENT_DIR [--repeats N]`` is the child: it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from services._malloc import TUNED_MALLOC, tuned_malloc_env
from services.bench._common import Report, Row


def measure_allocators(student_dir: Path, repeats: int, threads: int = 1) -> dict[str, dict[str, Any]]:
    """``{"default": {...}, "tuned": {...}}``: each a child's LoRA step seconds and generator tokens/s."""
    base = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    results: dict[str, dict[str, Any]] = {}
    for name, env in (("default", base), ("tuned", {**base, **TUNED_MALLOC})):
        done = subprocess.run(
            [sys.executable, "-m", __name__, str(student_dir), "--repeats", str(repeats), "--threads", str(threads)],
            env=env,  # the child is not the CLI: it never re-executes, whatever RLAIF_TUNE_MALLOC says
            capture_output=True,
            text=True,
            check=True,
        )
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def add_rows(report: Report, results: dict[str, dict[str, Any]]) -> None:
    default, tuned = results["default"], results["tuned"]
    report.add(
        Row(
            "learner step, lora, tuned malloc (cpu)",
            tuned["learner_lora_step_s"],
            default["learner_lora_step_s"],
            "s/step",
            ratio_meaning="vs glibc's default malloc (lower is better)",
            note="16 rollouts in a worker thread, one process each (MALLOC_ARENA_MAX=1, MALLOC_MMAP_MAX_=0, no trim)",
        )
    )
    report.add(
        Row(
            "generator, tuned malloc (cpu)",
            tuned["generator_tokens_per_s"],
            default["generator_tokens_per_s"],
            "tokens/s",
            ratio_meaning="vs glibc's default malloc (higher is better)",
            note="one group of G samples in a worker thread",
        )
    )


def applies_here() -> bool:
    """Whether the tuning means anything on this machine (glibc)."""
    return tuned_malloc_env({}) is not None


def _child(student_dir: Path, repeats: int, threads: int) -> dict[str, Any]:
    from services.bench._compute import Models, Shape, measure_generator, measure_learner_step

    torch.set_num_threads(threads)
    models = Models(student_dir, student_dir, random_weights=False)
    out: dict[str, Any] = {"malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}  # the env it ran under

    def work() -> None:
        step = measure_learner_step(models, Shape(), "cpu", lora=True, repeats=repeats, share_prompts=True)
        out["learner_lora_step_s"] = step["step_s"]
        out["generator_tokens_per_s"] = measure_generator(models, Shape(), "cpu", repeats)["tokens_per_s"]

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("student_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    print(json.dumps(_child(args.student_dir, args.repeats, args.threads)))


if __name__ == "__main__":
    main()
