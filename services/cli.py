"""The ``rlaif`` command line: one sub-command per service, plus ``up`` which runs them all."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from services._logging import configure_logging
from services._settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)


def _settings(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@app.command()
def up(
    profile: Annotated[str, typer.Option(help="tiny | default")] = "default",
    steps: Annotated[int, typer.Option(help="stop after N learner steps (0 = run until Ctrl-C)")] = 0,
    minutes: Annotated[float, typer.Option(help="stop after M minutes (0 = no limit)")] = 0.0,
    report: Annotated[Path | None, typer.Option(help="write the JSON run report here")] = None,
    generators: int = 1,
    judges: int = 1,
    run_dir: Annotated[Path | None, typer.Option(help="default: runs/<timestamp>")] = None,
    external_broker: Annotated[bool, typer.Option(help="use RLAIF_KAFKA_BOOTSTRAP_SERVERS")] = False,
) -> None:
    """Start broker, Triton, learner, judges, generators and feeder; show progress; write a report."""
    from services._supervisor import up as run_up

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    settings = _settings(profile=profile, run_dir=run_dir or Path("runs") / stamp)
    configure_logging("supervisor")
    result = asyncio.run(
        run_up(
            settings,
            steps=steps,
            report_path=report,
            generators=generators,
            judges=judges,
            embedded_broker=not external_broker,
            minutes=minutes,
        )
    )
    summary = {
        k: result[k]
        for k in (
            "learner_steps",
            "policy_versions_published",
            "generator_versions_served",
            "rollouts_published",
            "rewards_published",
            "rewards_consumed_by_learner",
            "wall_seconds",
            "loop_closed",
        )
    }
    print(json.dumps(summary, indent=2))
    if steps and not result["loop_closed"]:
        print("the loop did not close: no generator served a pushed policy version", file=sys.stderr)
        raise typer.Exit(1)


@app.command()
def broker(port: int = 9092, host: str = "127.0.0.1") -> None:
    """Run the embedded Tansu broker in the foreground."""
    from services._broker import EmbeddedBroker
    from services._proc import StopRequest

    configure_logging("broker")
    stop = StopRequest()
    with EmbeddedBroker(host=host, port=port) as b:
        print(f"bootstrap: {b.bootstrap}", flush=True)
        while not stop.wait(0.5):
            if b._proc is not None and b._proc.poll() is not None:
                raise typer.Exit(1)


@app.command()
def triton() -> None:
    """Serve the judge models with the embedded Triton server."""
    from services._supervisor import triton_models
    from services.triton import serve

    settings = _settings()
    configure_logging("triton")
    serve(settings, models=triton_models(settings))


@app.command()
def generator() -> None:
    """Sample rollouts from the student; hot-swap weights from the policy topic."""
    from services._generator import run

    settings = _settings()
    configure_logging("generator", service_id=settings.service_id)
    run(settings)


@app.command()
def judge() -> None:
    """Score rollouts through Triton (faust agents) and publish rewards."""
    from services._judge import run

    settings = _settings()
    configure_logging("judge", service_id=settings.service_id)
    run(settings)


@app.command()
def learner() -> None:
    """Train on rewards; push weights to the policy topic; checkpoint with offsets."""
    from services._learner import run

    settings = _settings()
    configure_logging("learner")
    run(settings)


@app.command()
def feeder() -> None:
    """Publish prompts with backpressure, and eval prompts every eval_every learner steps."""
    from services._feeder import run

    settings = _settings()
    configure_logging("feeder")
    run(settings)


@app.command("judge-eval")
def judge_eval_cmd(
    data: Annotated[Path, typer.Option(help="JSONL: prompt, response, principle (text), label (1/0)")],
    report: Annotated[Path, typer.Option(help="write the JSON report here")],
    profile: str = "default",
    triton_url: Annotated[str | None, typer.Option(help="a running Triton (gRPC); default: start one")] = None,
) -> None:
    """Score a labelled set through the Triton-served judge; report AUC and accuracy per principle."""
    from services._judge_eval import judge_eval

    configure_logging("judge-eval")
    settings = _settings(profile=profile, run_dir=Path(tempfile.mkdtemp(prefix="rlaif-judge-eval-")))
    result = asyncio.run(judge_eval(settings, data, triton_url))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {k: result[k] for k in ("auc", "accuracy", "n", "reward_gap")} | {"by_principle": result["by_principle"]},
            indent=2,
        )
    )


@app.command("judge-train")
def judge_train_cmd(
    data: Annotated[Path | None, typer.Option(help="JSONL: principle_id, prompt, response, label (1/0)")] = None,
) -> None:
    """Train the principle heads (``scorer: head``) on a labelled set; print each head's cross-validated AUC.
    Triton trains them on first start too; this is for a new training set, ahead of time."""
    from services.triton._heads import default_training_data, ensure_heads, load_heads, make_encoder

    configure_logging("judge-train")
    settings = _settings(heads_data=data)
    path = ensure_heads(settings.cache_dir, settings.heads_data or default_training_data(), make_encoder(settings))
    heads = load_heads(path)
    print(json.dumps({"heads": str(path)} | {n: {"cv_auc": round(h.cv_auc, 3), "n": h.n} for n, h in heads.items()}))


def _register_extensions() -> None:
    """Command groups that live in their own modules (each exposes ``register(app)``)."""
    import importlib

    for module in ("services._cli_audit", "services._cli_bench", "services._cli_reliability", "services._cli_ops"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_extensions()


def main() -> None:
    from schemas import RlaifError
    from services._malloc import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()  # for `python -m services.cli`; under `rlaif` services._entry already did

    try:
        app()
    except RlaifError as exc:
        # a known failure (bad config, broken input): one clear line, no traceback
        typer.echo(f"rlaif: {type(exc).__name__}: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
