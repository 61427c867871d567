"""The bus and pipeline benchmarks run end to end in quick mode and produce well-formed reports.

No timing thresholds here: performance claims live in the printed ratios (docs/benchmarks.md), not in tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.bench import run_suite
from services.cli import app


def _check_rows(report: dict[str, object], expected_metrics: set[str]) -> None:
    rows = report["rows"]
    assert isinstance(rows, list) and rows
    metrics = {row["metric"] for row in rows}
    assert expected_metrics <= metrics, metrics
    for row in rows:
        assert set(row) >= {"metric", "project", "baseline", "unit", "ratio", "ratio_meaning", "note"}
        for key in ("project", "baseline", "ratio"):
            value = row[key]
            if value is not None:
                assert math.isfinite(value) and value > 0, (row["metric"], key, value)
        if row["baseline"] is not None:
            assert row["ratio"] is not None


@pytest.mark.slow
def test_bus_quick_via_cli(tmp_path: Path) -> None:
    path = tmp_path / "bus.json"
    result = CliRunner().invoke(app, ["bench", "bus", "--quick", "--plain", "--report", str(path)])
    assert result.exit_code == 0, result.output
    assert "| hop latency p50 |" in result.output
    report = json.loads(path.read_text())
    assert report["suite"] == "bus" and report["quick"] is True and report["device"] == "cpu"
    assert report["machine"]["cpus"] >= 1
    _check_rows(
        report,
        {"hop latency p50", "hop latency p99", "max produce throughput", "max consume throughput"},
    )
    assert report["details"]["event_bytes"] > 1000  # rollout-sized, not a toy payload


@pytest.mark.slow
def test_pipeline_quick() -> None:
    report = run_suite("pipeline", quick=True).to_dict()
    assert report["suite"] == "pipeline"
    _check_rows(report, {"async throughput vs ideal", "async throughput vs synchronous loop", "learner steps"})
    details = report["details"]
    assert details["steps_measured"] >= 1
    assert set(details["stand_ins"]) == {"FakeGenerator", "SimulatedJudge", "FakeLearner"}
    assert details["policy_versions_served"] >= 1  # the real hot-swap path ran under the fake generator


def test_allocator_rows_run_each_malloc_in_its_own_child() -> None:
    from services._models import prepare_model
    from services._settings import Settings
    from services.bench._allocator import add_rows, measure_allocators
    from services.bench._common import Report

    results = measure_allocators(prepare_model("tiny-llama", Settings().cache_dir), repeats=1)
    assert results["default"]["malloc_arena_max"] is None and results["tuned"]["malloc_arena_max"] == "1"
    report = Report(suite="compute", quick=True, device="cpu")
    add_rows(report, results)
    _check_rows(report.to_dict(), {"learner step, lora, tuned malloc (cpu)", "generator, tuned malloc (cpu)"})
    assert all(r["project"] > 0 and r["baseline"] > 0 for r in report.to_dict()["rows"])


def test_compute_standalone_with_random_weights(tmp_path: Path) -> None:
    """The form that runs on an accelerator box: ``python -m services.bench._compute`` (tiny architecture here)."""
    import subprocess
    import sys

    from services._models import prepare_model
    from services._settings import Settings

    model_dir = prepare_model("tiny-llama", Settings().cache_dir)
    out = tmp_path / "compute.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "services.bench._compute", "--device", "cpu", "--random-weights", "--quick"),
            *("--model-dir", str(model_dir), "--cpu-threads", "2", "--report", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    _check_rows(
        report,
        {
            "judge scorer, shared-prefix batch (cpu)",
            "judge scorer, padded batch (cpu)",
            "learner step, lora (cpu)",
            "learner step, full (cpu)",
            "generator (cpu)",
            "judge heads encoder, batch (cpu)",
        },
    )
    results = report["details"]["results"]["cpu"]
    assert results["heads_encoder"]["rows_per_rollout"] == 4  # one row per head principle, as the client sends
    judge = results["judge"]
    assert judge["rows"] == 8 * 4  # quick: 8 rollouts x the 4 llm principles
    assert judge["max_abs_diff_shared_vs_padded"] < 1e-4
    assert report["details"]["random_weights"] is True
    # an accelerator box has torch and transformers but not the Kafka stack: the suite must not import it
    probe = "import sys, services.bench._compute; print(sorted({'streams', 'aiokafka', 'faust'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert imported.stdout.strip() == "[]"


@pytest.mark.slow
def test_weights_quick() -> None:
    """The real publish path (checkpoint, policy store, PolicyUpdate + chunks) into two real generators."""
    report = run_suite("weights", quick=True).to_dict()
    _check_rows(
        report,
        {
            "full: publish -> all 2 generators swapped",
            "full, fsync beside the announcement: publish -> all 2 generators swapped",
            "lora: publish -> all 2 generators swapped",
            "lora via policy store: publish -> all 2 generators swapped",
            "lora via store, fsync beside the announcement: publish -> all 2 generators swapped",
            "lora via store, 5 ms fetch wait: publish -> all 2 generators swapped",
            "LoRA payload is smaller by",
        },
    )
    details = report["details"]
    assert details["full"]["payload_bytes"] > details["lora"]["payload_bytes"]
    assert details["lora"]["transport"] == "chunks" and details["lora via policy store"]["transport"] == "uri"
