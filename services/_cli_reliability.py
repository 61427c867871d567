"""``rlaif chaos``: kill services at random during tiny runs and audit the effectively-once accounting."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer


def chaos_command(
    runs: Annotated[int, typer.Option(help="number of chaos runs")] = 3,
    report: Annotated[Path, typer.Option(help="write the JSON summary here")] = Path("chaos-report.json"),
    steps: Annotated[int, typer.Option(help="learner steps per run")] = 6,
    seed: Annotated[int, typer.Option(help="seed of the kill schedule")] = 0,
    kills: Annotated[int, typer.Option(help="most SIGKILLs per run")] = 3,
    min_gap: Annotated[float, typer.Option(help="shortest pause between kills (s)")] = 3.0,
    max_gap: Annotated[float, typer.Option(help="longest pause between kills (s)")] = 12.0,
    budget_minutes: Annotated[float, typer.Option(help="start no new run after M minutes (0 = no limit)")] = 0.0,
    run_root: Annotated[Path | None, typer.Option(help="default: runs/chaos-<seed>")] = None,
) -> None:
    """Run `rlaif up --profile tiny` K times, SIGKILL random services, check nothing is lost or doubled."""
    from services._chaos import chaos
    from services._logging import configure_logging

    configure_logging("chaos")
    summary = chaos(
        runs,
        run_root or Path("runs") / f"chaos-{seed}",
        steps=steps,
        seed=seed,
        max_kills=kills,
        gap_s=(min_gap, max_gap),
        budget_s=budget_minutes * 60 if budget_minutes else None,
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(summary, indent=2))
    short = {k: v for k, v in summary.items() if k != "details"}
    print(json.dumps(short, indent=2))
    if summary["runs_ok"] != summary["runs"]:
        for d in summary["details"]:
            if not d["ok"]:
                print(f"run {d['run']}: {d['violations']}", file=sys.stderr)
        raise typer.Exit(1)


def injection_shift(model_name: str, cache_dir: Path, render_mode: str, split_special: bool) -> dict[str, Any]:
    """Judge every item of services/data/injection_eval.jsonl with and without its injection text; return the
    mean absolute (and signed, towards Yes) shift of P(yes), overall and for the chat-control-token items."""
    import torch

    from schemas import Principle, render_judge_question
    from services._models import prepare_model
    from services.triton._scorers import LlmJudge

    class _LegacyJudge(LlmJudge):
        # the tokenization before the fix: control tokens inside the completion stay control tokens
        def token_rows(self, questions: list[str]) -> list[list[int]]:
            rows: list[list[int]] = self.tokenizer(
                [self.render(q) for q in questions],
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            )["input_ids"]
            return rows

    torch.set_num_threads(2)
    path = prepare_model(model_name, cache_dir)
    cls = LlmJudge if split_special else _LegacyJudge
    judge = cls.from_pretrained(path, render_mode=render_mode)
    items = _injection_items()

    def question(item: dict[str, Any], response: str) -> str:
        return render_judge_question(Principle(id="p", text=item["principle"]), item["prompt"], response)

    with_inj = judge.score([question(i, i["response"]) for i in items]).tolist()
    clean = judge.score([question(i, _without_injection(i)) for i in items]).tolist()
    return {
        "model": model_name,
        "render": render_mode,
        "split_special_tokens": split_special,
        **_shift_stats(items, with_inj, clean),
    }


def heads_injection_shift(cache_dir: Path) -> dict[str, Any]:
    """The same measure for the principle heads of the default constitution (P(consistent) instead of P(yes))."""
    from schemas import render_head_row
    from services._data import load_constitution
    from services.triton._heads import PrincipleHeads

    items = _injection_items()
    by_text = {p.text: p for p in load_constitution().principles}
    heads = PrincipleHeads.from_cache(cache_dir)
    pairs = [(by_text[i["principle"]], i) for i in items]
    with_inj = heads.score([render_head_row(p, i["prompt"], i["response"]) for p, i in pairs])
    clean = heads.score([render_head_row(p, i["prompt"], _without_injection(i)) for p, i in pairs])
    return {"model": "principle_heads", **_shift_stats(items, with_inj.tolist(), clean.tolist())}


def _injection_items() -> list[dict[str, Any]]:
    from importlib import resources

    text = (resources.files("services") / "data" / "injection_eval.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _without_injection(item: dict[str, Any]) -> str:
    return str(item["response"]).replace(item["injection"], "").rstrip()


def _shift_stats(items: list[dict[str, Any]], with_inj: list[float], clean: list[float]) -> dict[str, Any]:
    """Mean |shift| and mean signed shift (towards "consistent"), over all items and the control-token ones."""

    def stats(idx: list[int]) -> dict[str, float]:
        diffs = [with_inj[k] - clean[k] for k in idx]
        n = max(1, len(diffs))
        return {"n": len(diffs), "mean_abs_shift": sum(map(abs, diffs)) / n, "mean_shift_to_yes": sum(diffs) / n}

    control = [k for k, i in enumerate(items) if "<|im_" in i["injection"]]
    return {"all": stats(list(range(len(items)))), "control_token_items": stats(control)}


def injection_command(
    model: Annotated[str, typer.Option(help="judge model (services._models name)")] = "smollm2-135m-instruct",
    report: Annotated[Path | None, typer.Option(help="write the JSON figures here")] = None,
    cache_dir: Annotated[Path, typer.Option()] = Path(".cache/rlaif"),
) -> None:
    """Mean absolute judge-score shift caused by the injections in injection_eval.jsonl (the judge LM before/after
    the split_special_tokens fix, plain and chat rendering; then the principle heads)."""
    rows = [injection_shift(model, cache_dir, render, split) for render in ("plain", "chat") for split in (False, True)]
    rows.append(heads_injection_shift(cache_dir))
    text = json.dumps(rows, indent=2)
    print(text)
    if report is not None:
        report.write_text(text)


def register(app: typer.Typer) -> None:
    app.command("chaos")(chaos_command)
    app.command("injection-shift")(injection_command)
