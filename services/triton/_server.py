"""The embedded Triton Inference Server: the real tritonserver from the ``nvidia-pytriton`` wheel, on CPU.

Serves ``judge_llm`` (P(yes) per judge question) and, when the constitution uses them, ``toxicity``
(P(toxic) per text) and ``principle_heads`` (P(consistent) per head row), all with dynamic batching.
Production runs NGC Triton on GPUs with the model repository under ``infra/triton``; clients cannot tell the
difference.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from numpy.typing import NDArray

from schemas import ServiceError
from services._models import prepare_model
from services._proc import StopRequest
from services._settings import Settings
from services.triton._scorers import LlmJudge

log = structlog.get_logger(__name__)

JUDGE_MODEL = "judge_llm"
TOXICITY_MODEL = "toxicity"
HEADS_MODEL = "principle_heads"
MAX_BATCH = 64


def _fix_library_path() -> None:
    # The Python-backend stub must load *this* interpreter's libpython, not Debian's.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and not current.startswith(libdir):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def _text_model(fn: Callable[[list[str]], NDArray[np.float32]], output: str) -> Callable[..., Any]:
    from pytriton.decorators import batch

    def infer(text: NDArray[np.object_]) -> dict[str, NDArray[np.float32]]:
        strings = [row[0].decode("utf-8", errors="replace") for row in text]
        return {output: fn(strings).reshape(-1, 1).astype(np.float32)}

    batched: Callable[..., Any] = batch(infer)
    return batched


WORKSPACE_PREFIX = "rlaif-triton-"
OWNER_FILE = "owner.pid"


def sweep_dead_workspaces(tmp: Path) -> list[Path]:
    """Remove the scratch dirs of ``rlaif triton`` processes that are gone; returns what was removed.

    A service that exits cleanly removes its own (a copy of tritonserver's backends, ~22 MB), but a killed one
    cannot: after a day of chaos runs /tmp held 83 of them. A dir counts as dead when the pid in its owner file
    no longer runs; dirs without an owner file (or someone else's) are left alone.
    """
    import psutil

    removed = []
    for scratch in tmp.glob(f"{WORKSPACE_PREFIX}*"):
        try:
            pid = int((scratch / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(pid):
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch)
    if removed:
        log.info("triton_workspaces_swept", count=len(removed))
    return removed


def find_tritonserver(service: Any) -> Any:
    """The tritonserver process below ``service`` (a ``psutil.Process``), or None while it is not started."""
    import psutil

    with contextlib.suppress(psutil.Error):  # a child vanished between listing and naming it
        return next((p for p in service.children(recursive=True) if p.name() == "tritonserver"), None)
    return None


def build_scorers(settings: Settings, models: Collection[str]) -> dict[str, tuple[Callable[..., Any], str]]:
    """The served functions by model name: ``judge_llm`` always, plus whichever of ``toxicity`` and
    ``principle_heads`` are in ``models``."""
    torch.set_num_threads(settings.triton_threads)
    judge = LlmJudge.from_pretrained(
        prepare_model(settings.judge_model, settings.cache_dir),
        render_mode=settings.judge_render,
        device=settings.device,
        share_prefixes=settings.judge_share_prefixes,
    )
    scorers: dict[str, tuple[Callable[..., Any], str]] = {JUDGE_MODEL: (_text_model(judge.score, "p_yes"), "p_yes")}
    if TOXICITY_MODEL in models:
        from services.triton._toxicity import ToxicityClassifier

        clf = ToxicityClassifier()
        scorers[TOXICITY_MODEL] = (_text_model(clf.p_toxic, "p_toxic"), "p_toxic")
    if HEADS_MODEL in models:
        from services.triton._heads import OUTPUT, PrincipleHeads

        heads = PrincipleHeads.from_cache(
            settings.cache_dir, device=settings.device, data=settings.heads_data, settings=settings
        )
        scorers[HEADS_MODEL] = (_text_model(heads.score, OUTPUT), OUTPUT)
    return scorers


def serve(settings: Settings, *, models: Collection[str], ready: threading.Event | None = None) -> None:
    """Run Triton until SIGTERM/SIGINT."""
    _fix_library_path()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    scorers = build_scorers(settings, models)
    # PyTriton puts zmq IPC sockets in the workspace; their paths must stay under 107 bytes, so the
    # workspace lives in a short temporary directory rather than under a possibly deep run dir.
    sweep_dead_workspaces(Path(tempfile.gettempdir()))
    scratch = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX))
    (scratch / OWNER_FILE).write_text(str(os.getpid()))
    workspace = scratch / "ws"  # PyTriton creates the workspace itself
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=settings.triton_http_port,
        grpc_address="127.0.0.1",
        grpc_port=settings.triton_grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=settings.triton_metrics_port,
        log_verbose=0,
        exit_on_error=True,
    )
    stop = StopRequest()
    started = threading.Event()

    class _Triton(Triton):  # type: ignore[misc]
        def _on_tritonserver_exit(self, *args: Any) -> None:
            """PyTriton calls this from its launcher thread whenever tritonserver exits. Before the server is up,
            PyTriton alone would then wait up to 120 s for a server that is already dead (a chaos run killed
            tritonserver during start-up and ``rlaif triton`` sat in that wait while the judges ran out of
            retries). Exiting non-zero hands the problem to the supervisor, which restarts the service. A
            psutil poll of the child did this before and missed a server killed within its first 0.1 s."""
            if not started.is_set() and not stop.requested:
                log.error("tritonserver_died_during_startup")
                os._exit(1)  # the main thread is blocked inside PyTriton's wait; nothing else can stop it
            super()._on_tritonserver_exit(*args)

    with _Triton(config=config, workspace=str(workspace)) as triton:
        for name, (fn, output) in scorers.items():
            triton.bind(
                model_name=name,
                infer_func=fn,
                inputs=[Tensor(name="text", dtype=np.bytes_, shape=(1,))],
                outputs=[Tensor(name=output, dtype=np.float32, shape=(1,))],
                config=ModelConfig(
                    max_batch_size=MAX_BATCH,
                    batcher=DynamicBatcher(max_queue_delay_microseconds=2_000),
                ),
                strict=False,
            )
        triton.run()
        started.set()
        log.info(
            "triton_serving",
            grpc=settings.triton_grpc_port,
            http=settings.triton_http_port,
            models=sorted(scorers),
        )
        if ready is not None:
            ready.set()
        while not stop.wait(0.5):
            if not triton.is_alive():
                # tritonserver (or a model's proxy) died under us: exit non-zero so the supervisor restarts the
                # service, instead of staying up while nothing answers on the ports
                log.error("tritonserver_died")
                raise ServiceError("tritonserver exited unexpectedly")
        log.info("triton_stopping")
    shutil.rmtree(scratch, ignore_errors=True)
