"""Audit commands: ``rlaif consumer``, ``rlaif replay``, ``rlaif policy``, ``rlaif rejudge``, ``rlaif audit``."""

from __future__ import annotations

import asyncio
import json
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from services._settings import Settings

consumer_app = typer.Typer(no_args_is_help=True, help="Analytics consumers (entry points 'rlaif.consumers').")
policy_app = typer.Typer(no_args_is_help=True, help="Policy time-travel: list, export and trace versions.")
audit_app = typer.Typer(no_args_is_help=True, help="Check that recorded judgements reproduce.")

SourceOpt = Annotated[str, typer.Option("--source", help="kafka | archive")]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="default: RLAIF_RUN_DIR")]


def _settings(run_dir: Path | None = None) -> Settings:
    from services._logging import configure_logging

    configure_logging("audit")
    return Settings(run_dir=run_dir) if run_dir else Settings()


def _source(value: str) -> Any:
    if value not in ("kafka", "archive"):
        raise typer.BadParameter("--source is kafka or archive")
    return value


def parse_time_ms(value: str | None) -> int | None:
    """Milliseconds since the epoch, or an ISO-8601 time (UTC when it has no zone).

    >>> parse_time_ms("1700000000000")
    1700000000000
    >>> parse_time_ms("2023-11-14T22:13:20")
    1700000000000
    """
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _emit(data: Any, path: Path | None = None) -> None:
    text = json.dumps(data, indent=2, default=str)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)


# ---- consumers ------------------------------------------------------------------------------------------
@consumer_app.command("list")
def consumer_list() -> None:
    """Consumers found as entry points (plus the built-ins)."""
    from services._consumers import available

    for name, target in sorted(available().items()):
        print(f"{name}\t{target}")


@consumer_app.command("run")
def consumer_run(
    name: str,
    until_end: Annotated[bool, typer.Option(help="stop once every partition is read to its end")] = False,
) -> None:
    """Run one consumer over every project topic until stopped (SIGINT/SIGTERM)."""
    from services._consumers import load, run_consumer

    settings = _settings()
    factory = load(name)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_consumer(factory(settings), settings, stop=stop, stop_at_end=until_end)

    handled = asyncio.run(main())
    print(json.dumps({"consumer": name, "records": handled}))


# ---- replay ---------------------------------------------------------------------------------------------
def replay(
    topic: Annotated[str, typer.Option(help="full topic name, e.g. rlaif.rewards")],
    out: Annotated[Path, typer.Option(help="JSON-lines output")],
    from_offset: Annotated[int | None, typer.Option(help="first offset (every partition)")] = None,
    since: Annotated[str | None, typer.Option(help="records at or after (epoch ms or ISO time)")] = None,
    until: Annotated[str | None, typer.Option(help="records before (epoch ms or ISO time)")] = None,
    policy_version: Annotated[int | None, typer.Option(help="events about this policy version")] = None,
    rollout_id: Annotated[str | None, typer.Option(help="events about this rollout")] = None,
    source: SourceOpt = "kafka",
    run_dir: RunDirOpt = None,
) -> None:
    """Write a byte-exact range of a topic (base64 key/value, headers) as JSON lines."""
    from services._replay import ReplayFilter
    from services._replay import replay as run_replay

    settings = _settings(run_dir)
    flt = ReplayFilter(from_offset, parse_time_ms(since), parse_time_ms(until), policy_version, rollout_id)
    n = asyncio.run(run_replay(settings, topic, flt, out, _source(source)))
    print(json.dumps({"topic": topic, "records": n, "out": str(out)}))


# ---- policy time-travel ---------------------------------------------------------------------------------
@policy_app.command("list")
def policy_list(source: SourceOpt = "kafka", run_dir: RunDirOpt = None) -> None:
    """Versions in <run_dir>/policy and on the policy topic, with whether their sha256 agree."""
    from rich.console import Console
    from rich.table import Table

    from services._audit import list_policies

    rows = asyncio.run(list_policies(_settings(run_dir), _source(source)))
    table = Table("version", "kind", "step", "size", "sha256", "announced", "verified", "file")
    for r in rows:
        table.add_row(
            str(r["version"]),
            str(r["kind"]),
            str(r["learner_step"]),
            str(r["size_bytes"]),
            (r["sha256"] or "")[:12],
            str(r["announced"]),
            str(r["verified"]),
            str(r["file"]),
        )
    Console().print(table)


@policy_app.command("export")
def policy_export(
    version: int,
    out: Annotated[Path, typer.Option(help="directory for save_pretrained")],
    source: SourceOpt = "kafka",
    run_dir: RunDirOpt = None,
) -> None:
    """Verify a version's sha256 and save it as a plain transformers model (LoRA merged into the base)."""
    from services._audit import export_policy

    _emit(asyncio.run(export_policy(_settings(run_dir), version, out, _source(source))))


@policy_app.command("lineage")
def policy_lineage(
    version: int,
    source: SourceOpt = "kafka",
    run_dir: RunDirOpt = None,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
) -> None:
    """Learner steps that produced VERSION, the rollouts and rewards they used, and what VERSION generated."""
    from services._audit import lineage

    _emit(asyncio.run(lineage(_settings(run_dir), version, _source(source))), out)


# ---- re-judging -----------------------------------------------------------------------------------------
def rejudge(
    constitution: Annotated[Path, typer.Option(help="the new constitution YAML")],
    report: Annotated[Path, typer.Option(help="write the diff report (JSON) here")],
    since: Annotated[str | None, typer.Option(help="judged at or after (epoch ms or ISO time)")] = None,
    until: Annotated[str | None, typer.Option(help="judged before (epoch ms or ISO time)")] = None,
    policy_version: Annotated[int | None, typer.Option(help="rollouts sampled with this version")] = None,
    rollout_id: Annotated[str | None, typer.Option(help="one rollout")] = None,
    limit: Annotated[int, typer.Option(help="at most N rollouts (0 = all)")] = 0,
    source: SourceOpt = "kafka",
    run_dir: RunDirOpt = None,
) -> None:
    """Re-judge recorded rollouts under a new constitution (side topic, never the live rewards) and diff."""
    from services._audit import rejudge as run_rejudge
    from services._data import load_constitution
    from services._replay import ReplayFilter

    settings = _settings(run_dir)
    flt = ReplayFilter(None, parse_time_ms(since), parse_time_ms(until), policy_version, rollout_id)
    new = load_constitution(constitution)
    _emit(asyncio.run(run_rejudge(settings, new, flt, _source(source), limit)), report)


@audit_app.command("verify")
def audit_verify(
    sample: Annotated[int, typer.Option(help="how many judged rollouts to re-judge")],
    report: Annotated[Path, typer.Option(help="write the JSON report here")],
    seed: int = 0,
    source: SourceOpt = "kafka",
    run_dir: RunDirOpt = None,
) -> None:
    """Re-judge N recorded judgements with the configured constitution; count those within 1e-4."""
    from services._audit import audit_verify as run_verify
    from services._data import load_constitution

    settings = _settings(run_dir)
    result = asyncio.run(run_verify(settings, load_constitution(settings.constitution), sample, _source(source), seed))
    _emit(result, report)
    if result["not_reproduced"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(consumer_app, name="consumer")
    app.add_typer(policy_app, name="policy")
    app.add_typer(audit_app, name="audit")
    app.command("replay")(replay)
    app.command("rejudge")(rejudge)


__all__ = ["register"]
