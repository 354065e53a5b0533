"""The benchmark scripts run end to end on a tiny model: one test per script, each in a subprocess as a user runs it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_quality_benchmark_runs_on_a_tiny_model(tmp_path):
    rows = ["base", "sft", "filtered_sft", "grpo", "dpo", "nado_decoding", "cadet", "cadet_parallel", "cadet_adaptive"]
    trained = {"sft", "filtered_sft", "grpo", "dpo", "cadet", "cadet_parallel", "cadet_adaptive"}
    uses_oracle = {"filtered_sft", "grpo", "dpo", "nado_decoding", "cadet", "cadet_parallel", "cadet_adaptive"}
    # An oracle-call budget other than CADET's own 16 (2 rounds x 4 prompts x 2 samples), so that every method has
    # to resize its sampling; 24 divides evenly under every rule, so each method gets exactly 24 calls
    budget = 24
    # `--model tiny` defaults: 4 steps, 8 oracle-phase and 8 evaluation prompts, 2 generations, 16 new tokens
    result = run_script(
        "quality.py",
        "--model",
        "tiny",
        "--budget",
        "both",
        "--oracle_calls",
        str(budget),
        "--threads",
        "1",
        "--output_dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    report = json.loads((tmp_path / "quality.json").read_text())
    judges = report["settings"]["judges"]
    assert report["settings"]["oracle"] in judges and len(judges) == 2
    found = {(row["budget"], row["row"]): row for row in report["rows"]}
    assert set(found) == {(budget_name, row) for budget_name in ("steps", "oracle_calls") for row in rows}
    for (budget_name, name), row in found.items():
        assert row["error"] is None, (budget_name, name, row.get("traceback"))
        metrics = [row["perplexity"], row["wall_clock_s"], row["peak_rss_mib"]]
        for judge in judges:
            metrics += [
                row["toxicity"][judge]["expected_max_toxicity"],
                row["toxicity"][judge]["toxicity_probability"],
            ]
        assert all(isinstance(m, int | float) and math.isfinite(m) for m in metrics), (budget_name, name, metrics)
        assert row["peak_rss_mib"] > 0
        if name in trained:
            assert row["wall_clock_s"] > 0 and row["lm_steps"] > 0, (budget_name, name)
        else:
            assert row["lm_steps"] == 0, (budget_name, name)
        if name not in uses_oracle:
            assert row["oracle_calls"] == 0, (budget_name, name)
        # The budgets hold what they say: equal LM steps, or equal oracle calls
        if budget_name == "steps" and name in trained:
            assert row["lm_steps"] == 4, (name, row["lm_steps"])
        if budget_name == "oracle_calls" and name in uses_oracle:
            assert row["oracle_calls"] == budget, (name, row["oracle_calls"])
    assert found[("steps", "cadet")]["oracle_calls"] == 16
    for budget_name in ("steps", "oracle_calls"):  # the wrapper counts what CADETTrainer counts
        cadet = found[(budget_name, "cadet")]
        assert cadet["info"]["cadet_oracle_calls"] == cadet["oracle_calls"]
    assert found[("oracle_calls", "grpo")]["lm_steps"] == 6  # 24 calls / 4 completions a step
    assert found[("steps", "sft")]["run_id"] == found[("oracle_calls", "sft")]["run_id"]  # no oracle: run once
    assert "cadet" in result.stdout and "oracle calls" in result.stdout  # the table
    assert (tmp_path / "quality_steps.png").is_file() and (tmp_path / "quality_oracle_calls.png").is_file()
