"""``rlaif bench SUITE --report PATH``: the benchmark suites (see ``services.bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bench(
    suite: Annotated[str, typer.Argument(help="bus | judge | weights | pipeline | e2e | compute | learning")],
    report: Annotated[Path, typer.Option(help="write the JSON report here")] = Path("runs/bench/report.json"),
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    quick: Annotated[bool, typer.Option(help="tiny models and short runs")] = False,
    plain: Annotated[bool, typer.Option(help="markdown table instead of a rich one")] = False,
    minutes: Annotated[float, typer.Option(help="learning: wall-clock budget of each run (async, then sync)")] = 30.0,
) -> None:
    """Measure one part of the system against a baseline in the same run; print ratios, write JSON."""
    from services._logging import configure_logging
    from services.bench import SUITES, print_report, run_suite

    if suite == "learning":
        _learning(report, minutes, quick, device)
        return
    if suite not in SUITES:
        raise typer.BadParameter(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
    if device not in ("cpu", "cuda"):
        raise typer.BadParameter("device must be cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("--device cuda but torch sees no CUDA device")
    configure_logging("bench", level="WARNING")
    result = run_suite(suite, quick=quick, device=device)
    result.write(report)
    print_report(result, plain=plain)
    print(f"report: {report}")


def _learning(report: Path, minutes: float, quick: bool, device: str) -> None:
    import asyncio

    from services._bench_learning import bench_learning
    from services._logging import configure_logging
    from services._settings import Settings

    configure_logging("bench", level="WARNING")
    settings = Settings(profile="tiny" if quick else "default", device=device)
    result = asyncio.run(bench_learning(settings, minutes, report))
    keys = ("eval_reward_first", "eval_reward_last", "sync_eval_reward_first", "sync_eval_reward_last", "kl_last")
    print("| figure | value |\n|---|---|")
    for key in keys:
        print(f"| {key} | {result[key]} |")
    for arm, key in (("async", "eval_gain_paired"), ("sync", "sync_eval_gain_paired")):
        if (g := result.get(key)) and g["stderr"] is not None:
            print(f"| {arm} gain, paired over {g['n']} eval prompts | {g['gain']:+.3f} ± {g['stderr']:.3f} (s.e.) |")
    print(f"| async steps / sync steps | {result['async']['steps']} / {result['sync']['steps']} |")
    print(f"plot: {result['plot']}\nreport: {report}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
