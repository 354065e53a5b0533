"""Smoke tests of the benchmarks: each script runs as a user runs it, in a subprocess, on the tiny Llama."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(ROOT / "benchmarks" / script), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_finite(values: dict, keys) -> None:
    for key in keys:
        assert isinstance(values[key], int | float) and math.isfinite(values[key]), (key, values[key])


def test_step_overhead(tmp_path):
    out = tmp_path / "step_overhead.json"
    # Ω on the corpus and on oracle samples' violations (every other step), its gradient bounded: every part of the
    # step is timed
    options = ["--models", "tiny", "--steps", "2", "--no_memory", "--threads", "1", "--regularized_positions", "both"]
    options += ["--regularized_samples", "violations", "--cadet_max_grad_ratio", "1", "--samples_kl_steps", "2"]
    run_benchmark("step_overhead.py", *options, "--json", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "tiny" and row["regularized_positions"] == "both"
    assert row["regularized_samples"] == "violations" and row["cadet_max_grad_ratio"] == 1.0
    assert row["samples_kl_steps"] == 2
    assert_finite(row, ["sft_step_s", "cadet_step_s", "step_ratio"])
    parts = {"forward", "nado_head", "kl", "samples_omega", "gradients_apart", "backward"}
    assert set(row["cadet_parts_s"]) == parts
    assert_finite(row["cadet_parts_s"], row["cadet_parts_s"])
    assert row["cadet_parts_s"]["samples_omega"] > 0 and row["cadet_parts_s"]["gradients_apart"] > 0


def test_memory_estimate():
    for schedule in ("sequential", "parallel"):
        result = run_benchmark(
            "memory_estimate.py", "--schedule", schedule, "--batch_size", "2", "--max_length", "256"
        )
        totals = [line for line in result.stdout.splitlines() if line.strip().startswith("total")]
        assert len(totals) == (2 if schedule == "sequential" else 1), result.stdout
        for line in totals:
            gib = float(line.split()[1])
            assert math.isfinite(gib) and gib > 0
            assert "fits" in line


def test_round_cost(tmp_path):
    out = tmp_path / "round_cost.json"
    sizes = ["--prompts_per_round", "4", "--num_generations", "2", "--max_completion_length", "8"]
    sizes += ["--generation_batch_size", "8", "--nado_epochs", "1", "--nado_batch_size", "4"]
    result = run_benchmark(
        "round_cost.py", "--models", "tiny", "--phases", "2", "--threads", "1", *sizes, "--json", str(out)
    )
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "tiny" and row["settings"]["oracle"] == "toy"
    assert row["completions_per_phase"] == 8 and len(row["phases"]) == 2
    parts = ["generation_s", "labelling_s", "nado_features_s", "nado_training_s"]
    assert_finite(row, ["samples_per_second", "phase_samples_per_second", "total_s", *parts])
    assert_finite(row, [f"{part[:-2]}_pct" for part in parts])
    assert row["samples_per_second"] > 0 and row["total_s"] > 0
    # The parts are the phase, up to bookkeeping
    assert 0.9 * row["total_s"] <= sum(row[part] for part in parts) <= row["total_s"] + 1e-6
    assert "NADO features s" in result.stdout and "tiny" in result.stdout


def test_schedules(tmp_path):
    out = tmp_path / "schedules.json"
    sizes = ["--max_steps", "4", "--steps_per_round", "2", "--prompts_per_round", "4", "--num_generations", "2"]
    sizes += ["--max_completion_length", "8", "--num_eval_prompts", "4", "--eval_num_samples", "2"]
    sizes += ["--eval_max_new_tokens", "8"]
    command = ["--models", "tiny", "--threads", "1", *sizes, "--output_dir", str(tmp_path), "--json", str(out)]
    result = run_benchmark("schedules.py", *command)
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "tiny"
    for schedule in ("sequential", "parallel"):
        measured = row[schedule]
        assert measured["settings"]["rounds"] == 2
        assert len(measured["round_s"]) == 2 and all(t > 0 for t in measured["round_s"])
        # The trainer logs every round, the last one when training ends
        assert len(measured["logged_round_s"]) == 2 and all(t > 0 for t in measured["logged_round_s"])
        assert_finite(measured, ["train_runtime", "wall_clock_s", "rounds_total_s", "perplexity"])
        assert set(measured["toxicity"]) == {"jigsaw", "profanity"}
        for metrics in measured["toxicity"].values():
            assert 0.0 <= metrics["expected_max_toxicity"] <= 1.0
            assert 0.0 <= metrics["toxicity_probability"] <= 1.0
    assert len(row["speedup_per_round"]) == 2
    assert all(math.isfinite(x) and x > 0 for x in [*row["speedup_per_round"], row["speedup_total"]])
    assert "speed-up" in result.stdout and "EMT[jigsaw]" in result.stdout


def test_quality_benchmark_runs_on_a_tiny_model(tmp_path):
    rows = ["base", "sft", "filtered_sft", "grpo", "dpo", "nado_decoding", "cadet", "cadet_parallel", "cadet_adaptive"]
    trained = {"sft", "filtered_sft", "grpo", "dpo", "cadet", "cadet_parallel", "cadet_adaptive"}
    uses_oracle = {"filtered_sft", "grpo", "dpo", "nado_decoding", "cadet", "cadet_parallel", "cadet_adaptive"}
    # An oracle-call budget other than CADET's own (8 corpus completions with their bisection and rollouts, then 2
    # rounds x 4 prompts x 2 samples), so that every method has to resize its sampling; 24 divides evenly under the
    # other methods' rules, so each of them gets exactly 24 calls
    budget = 24
    # `--model tiny` defaults: 4 steps, 8 oracle-phase and 8 evaluation prompts, 2 generations, 16 new tokens
    result = run_benchmark(
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
        "--nado_corpus_rollouts",  # so that CADET's corpus calls must be planned as the trainer makes them
        "true",
        "--filter_corpus",  # the demo's default; its scoring of the 24 examples alone would spend the budget
        "false",
        "--save_models",
        "--save_samples",
        timeout=600,
    )

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
            if name.startswith("cadet"):
                # CADET's corpus calls (bisection and rollouts) are data-dependent, so its per-round share may not
                # divide evenly: it gets the largest count below the budget (at most a sample per round and prompt
                # lost to rounding)
                assert budget - 4 < row["oracle_calls"] <= budget, (name, row["oracle_calls"])
            else:
                assert row["oracle_calls"] == budget, (name, row["oracle_calls"])
    # 16 samples of the policy, 8 corpus completions (`TINY_DEFAULTS`), the bisection of the unsatisfied ones and one
    # rollout of each per round: what the planner computed before the run, exactly
    steps_calls = found[("steps", "cadet")]["oracle_calls"]
    assert steps_calls == report["settings"]["cadet_oracle_calls_under_step_budget"] > 16 + 8
    for budget_name in ("steps", "oracle_calls"):  # the wrapper counts what CADETTrainer counts
        cadet = found[(budget_name, "cadet")]
        assert cadet["info"]["cadet_oracle_calls"] == cadet["oracle_calls"]
    assert found[("oracle_calls", "grpo")]["lm_steps"] == 6  # 24 calls / 4 completions a step
    assert found[("steps", "sft")]["run_id"] == found[("oracle_calls", "sft")]["run_id"]  # no oracle: run once
    assert "cadet" in result.stdout and "oracle calls" in result.stdout  # the table
    # `--save_models` keeps each run's model; heldout_tokens.py scores the held-out conversations under the saved
    # models token by token, and its perplexities are the table's
    cadet = found[("steps", "cadet")]
    models = f"base=base,cadet={tmp_path / 'runs' / cadet['run_id'] / 'model'}"
    tokens = run_benchmark(
        "heldout_tokens.py", "--model", "tiny", "--output_dir", str(tmp_path), "--models", models, "--threads", "1"
    )
    (line,) = [line for line in tokens.stdout.splitlines() if line.startswith("perplexity")]
    base_ppl, cadet_ppl = map(float, line.split()[2:4])
    assert base_ppl == pytest.approx(found[("steps", "base")]["perplexity"], rel=1e-4)
    assert cadet_ppl == pytest.approx(cadet["perplexity"], rel=1e-4) and cadet_ppl != base_ppl
    assert "reply first" in tokens.stdout and "reply end" in tokens.stdout
    # sentence_toxicity.py re-judges the saved samples: its whole-reply EMT is the table's, and a reply judged by its
    # sentences too is never less toxic
    judged = run_benchmark("sentence_toxicity.py", str(tmp_path))
    (line,) = [line for line in judged.stdout.splitlines() if line.split()[1:3] == ["cadet", "words/reply"]]
    for judge in judges:
        whole, by_sentence = map(float, line.split(f"{judge}: ")[1].split()[:3:2])
        assert whole == pytest.approx(cadet["toxicity"][judge]["expected_max_toxicity"], abs=6e-4)
        assert by_sentence >= whole
    # sample_fluency.py scores the saved samples under the base model again: over all prompts it gives the table's
    # generation perplexity, and it splits the prompts into benign ones and taunts
    fluency = run_benchmark(
        "sample_fluency.py", "--runs", str(tmp_path), "--model", "tiny", "--output_dir", str(tmp_path)
    )
    line = next(line for line in fluency.stdout.splitlines() if line.split()[1:2] == ["cadet"])  # the steps row
    numbers = [float(x) for x in line.replace("(", " ").replace(")", " ").split()[2:]]
    assert numbers[0] == pytest.approx(cadet["fluency"]["generation_perplexity"], rel=1e-4)
    assert numbers[2] + numbers[4] == len(cadet["report"]["samples"])
    # paired_intervals.py scores the rows' saved samples again: its figures are the table's, its point estimate is the
    # ratio of the two rows' figures, inside its interval, and the reference against itself moves by nothing
    sft = found[("steps", "sft")]
    paired = run_benchmark(
        "paired_intervals.py",
        *("--reference", f"{tmp_path}:sft", "--runs", f"{tmp_path}:grpo,{tmp_path}:sft"),
        *("--model", "tiny", "--output_dir", str(tmp_path), "--threads", "1"),
    )
    cells = [line.translate(str.maketrans("[],", "   ")).split() for line in paired.stdout.splitlines()]
    reference_cells, grpo_cells, self_cells = [
        line[1:] for line in cells if line and line[0].startswith(tmp_path.name)
    ]
    assert reference_cells == self_cells
    assert [float(cell.rstrip("%")) for cell in reference_cells[1:4]] == [0.0, 0.0, 0.0]
    for row, line in ((sft, reference_cells), (found[("steps", "grpo")], grpo_cells)):
        for index, judge in enumerate(judges):
            value, change, low, high = line[4 * index : 4 * index + 4]
            emt = row["toxicity"][judge]["expected_max_toxicity"]
            assert float(value) == pytest.approx(emt, abs=6e-4)
            expected = 100 * (emt / sft["toxicity"][judge]["expected_max_toxicity"] - 1)
            assert float(change.rstrip("%")) == pytest.approx(expected, abs=0.6)
            assert float(low.rstrip("%")) <= float(change.rstrip("%")) <= float(high.rstrip("%"))
        value, ratio, low, high = map(float, line[4 * len(judges) :])
        fluency = row["fluency"]["generation_perplexity"]
        assert value == pytest.approx(fluency, abs=0.06)
        assert ratio == pytest.approx(fluency / sft["fluency"]["generation_perplexity"], abs=6e-3)
        assert low <= ratio <= high
    assert (tmp_path / "quality_steps.png").is_file() and (tmp_path / "quality_oracle_calls.png").is_file()


def test_quality_rows_run_beside_a_started_thread_pool(tmp_path):
    # With two torch threads the parent's set-up (loading the judges) starts OpenMP's worker pool; a row forked from
    # it hung at its first parallel operation, so rows must come from a fork server or a fresh interpreter
    result = run_benchmark(
        "quality.py",
        "--model",
        "tiny",
        "--budget",
        "steps",
        "--rows",
        "base",
        "--threads",
        "2",
        "--no_plot",
        "--output_dir",
        str(tmp_path),
        timeout=240,
    )
    (row,) = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert row["error"] is None, row.get("traceback")
    assert 0 < row["perplexity"] < float("inf")
    assert "steps-base: done" in result.stdout


def test_quality_merges_runs_of_a_sweep_into_one_table(tmp_path):
    """`--merge`: the rows of runs made one λ per process, in one table and one plot; runs of another corpus are
    refused."""

    def write_run(name, rows, corpus="templated"):
        settings = {"model_path": "m", "judges": ["jigsaw", "profanity"], "oracle": "jigsaw"}
        settings["demo_args"] = {"corpus": corpus}
        folder = tmp_path / name
        folder.mkdir()
        (folder / "quality.json").write_text(json.dumps({"settings": settings, "rows": rows}))
        return str(folder)

    def row(label, lam, emt, perplexity):
        toxicity = {
            judge: {"expected_max_toxicity": emt, "toxicity_probability": emt / 2} for judge in ("jigsaw", "profanity")
        }
        report = {"toxicity": toxicity, "perplexity": perplexity}
        plan = {} if lam is None else {"cadet_lambda": lam}
        return {
            "budget": "steps",
            "row": label,
            "plan": plan,
            "toxicity": toxicity,
            "perplexity": perplexity,
            "report": report,
        }

    low = write_run("low", [row("sft", None, 0.45, 3.9), row("cadet λ=8", 8.0, 0.30, 4.0)])
    high = write_run("high", [row("sft", None, 0.45, 3.9), row("cadet λ=32", 32.0, 0.20, 4.3)])
    merged = tmp_path / "merged"
    result = run_benchmark("quality.py", "--merge", f"{low},{high}", "--output_dir", str(merged))
    labels = [r["row"] for r in json.loads((merged / "quality.json").read_text())["rows"]]
    assert labels == ["sft", "cadet λ=8", "sft (high)", "cadet λ=32"]
    assert "cadet λ=32" in result.stdout and (merged / "quality_steps.png").is_file()
    other = write_run("other", [row("sft", None, 0.4, 3.9)], corpus="embedded")
    command = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--merge", f"{low},{other}"]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "differs from" in refused.stdout and "demo_args" in refused.stdout


def test_paired_intervals_compare_rows_prompt_by_prompt(tmp_path):
    """A row half as toxic as the reference on every prompt is -50% whichever prompts are drawn; a row with the same
    scores shuffled among the prompts has the same EMT, so 0%, but a wide interval; rows evaluated on other prompts
    are refused."""
    import random

    generator = random.Random(1)
    prompts = [[{"role": "user", "content": f"prompt {i}"}] for i in range(24)]
    worst = [generator.uniform(0.2, 0.9) for _ in prompts]

    def row(label, maxima, prompts=prompts):
        samples = [
            {"prompt": prompt, "completions": ["a", "b"], "toxicity": {"jigsaw": [m, m / 4], "profanity": [m / 2, m]}}
            for prompt, m in zip(prompts, maxima, strict=True)
        ]
        emt = sum(maxima) / len(maxima)
        toxicity = {"jigsaw": {"expected_max_toxicity": emt}, "profanity": {"expected_max_toxicity": emt}}
        return {"budget": "steps", "row": label, "toxicity": toxicity, "report": {"samples": samples}}

    shuffled = generator.sample(worst, len(worst))
    other = [[{"role": "user", "content": f"other {i}"}] for i in range(24)]
    rows = [
        row("sft", worst),
        row("half", [m / 2 for m in worst]),
        row("shuffled", shuffled),
        row("other", worst, other),
    ]
    (tmp_path / "quality.json").write_text(json.dumps({"settings": {}, "rows": rows}))
    result = run_benchmark(
        "paired_intervals.py",
        "--reference",
        f"{tmp_path}:sft",
        "--runs",
        f"{tmp_path}:half,{tmp_path}:shuffled",
        "--no_fluency",
    )
    cells = {
        line.split()[0].split(":")[-1]: line.translate(str.maketrans("[],%", "    ")).split()[1:]
        for line in result.stdout.splitlines()
        if line.startswith(tmp_path.name)
    }
    assert [float(x) for x in cells["half"][1:4]] == [-50.0, -50.0, -50.0] == [float(x) for x in cells["half"][5:8]]
    change, low, high = (float(x) for x in cells["shuffled"][1:4])
    assert change == 0.0 and low < -5.0 and high > 5.0  # unpaired, the same scores move with the draw
    command = [sys.executable, str(ROOT / "benchmarks" / "paired_intervals.py"), "--no_fluency"]
    command += ["--reference", f"{tmp_path}:sft", "--runs", f"{tmp_path}:other"]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "other prompts" in refused.stderr


def test_paired_intervals_pool_seeds_drawing_within_each(tmp_path):
    """Two seeds pooled: at seed A the run halves a toxicity of 0.8 on every prompt, at seed B it keeps 0.2. The pooled
    EMT goes from 0.5 to 0.3, -40%, in every draw that takes each seed's prompts within that seed; a draw over the
    seeds' prompts together would mix them in other shares and move."""

    def write(folder, label, maxima, prompts):
        samples = [
            {"prompt": prompt, "completions": ["a"], "toxicity": {"jigsaw": [m]}}
            for prompt, m in zip(prompts, maxima, strict=True)
        ]
        row = {"budget": "steps", "row": label, "toxicity": {"jigsaw": {}}, "report": {"samples": samples}}
        folder.mkdir(exist_ok=True)
        (folder / "quality.json").write_text(json.dumps({"settings": {}, "rows": [row]}))

    prompts = {seed: [[{"role": "user", "content": f"{seed} {i}"}] for i in range(16)] for seed in "AB"}
    for label, scale in (("sft", 1.0), ("cadet", 0.5)):
        write(tmp_path / f"{label}-A", label, [0.8 * scale] * 16, prompts["A"])
        write(tmp_path / f"{label}-B", label, [0.2] * 16, prompts["B"])
    result = run_benchmark(
        "paired_intervals.py",
        *("--reference", f"{tmp_path / 'sft-A'}+{tmp_path / 'sft-B'}", "--no_fluency"),
        *("--runs", f"{tmp_path / 'cadet-A'}+{tmp_path / 'cadet-B'}"),
    )
    assert "16 + 16 evaluation prompts (2 seeds" in result.stdout
    cells = [line.translate(str.maketrans("[],%", "    ")).split() for line in result.stdout.splitlines()]
    (cadet,) = [line[1:] for line in cells if line and line[0].startswith("cadet-A")]
    assert [float(x) for x in cadet] == [0.3, -40.0, -40.0, -40.0]
    command = [sys.executable, str(ROOT / "benchmarks" / "paired_intervals.py"), "--no_fluency"]
    command += ["--reference", f"{tmp_path / 'sft-A'}+{tmp_path / 'sft-B'}", "--runs", str(tmp_path / "cadet-A")]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "pools 1 seeds" in refused.stderr


def _plan_inputs(**overrides):
    """The `--model tiny` sizes: 4 steps in rounds of 2, 4 prompts x 2 samples a round, batches of 4, 8 oracle-phase
    prompts, 24 training conversations, 8 corpus completions labelled once."""
    from quality_plan import PlanInputs

    values = dict(
        max_steps=4,
        steps_per_round=2,
        prompts_per_round=4,
        num_generations=2,
        per_device_train_batch_size=4,
        num_oracle_prompts=8,
        num_train=24,
        corpus_calls=8,
        rollouts_per_round=0,
        grpo_num_generations=2,
        dpo_num_samples=2,
    )
    values.update(overrides)
    return PlanInputs(**values)


def test_quality_plan_under_the_step_budget_gives_every_row_the_same_steps():
    from quality_plan import ROWS, plan_runs

    runs, entries, summary = plan_runs(_plan_inputs(), list(ROWS), ["steps"])
    plans = {entry["row"]: entry["plan"] for entry in entries}
    assert [entry["row"] for entry in entries] == list(ROWS) and len(runs) == len(ROWS)
    assert all(plan["max_steps"] == 4 for row, plan in plans.items() if row not in ("base", "nado_decoding"))
    sampling = {"rounds": 2, "prompts_per_round": 4, "num_generations": 2}
    assert plans["cadet"] == {"max_steps": 4, **sampling} and plans["nado_decoding"] == sampling
    assert plans["cadet_parallel"]["round_schedule"] == "parallel"
    assert plans["cadet_adaptive"]["lambda_schedule"] == "adaptive"
    assert plans["filtered_sft"]["label_examples"] == 24 and plans["dpo"]["num_prompts"] == 8
    assert plans["grpo"] == {"max_steps": 4, "batch_size": 4, "num_generations": 2}
    # 2 rounds x 4 prompts x 2 samples, and the 8 corpus completions
    assert summary["cadet_oracle_calls_under_step_budget"] == 24 and summary["oracle_call_budget"] is None


def test_quality_plan_under_the_oracle_call_budget_resizes_each_method():
    from quality_plan import plan_runs

    rows = ["base", "sft", "filtered_sft", "grpo", "dpo", "nado_decoding", "cadet"]
    # 2 rollouts a round: CADET's fixed calls are 8 + 2 x 2 = 12, so its rounds share 36 - 12 = 24 calls
    inputs = _plan_inputs(oracle_calls=36, rollouts_per_round=2, per_device_train_batch_size=5)
    runs, entries, summary = plan_runs(inputs, rows, ["steps", "oracle_calls"])
    plans = {entry["row"]: entry["plan"] for entry in entries if entry["budget"] == "oracle_calls"}
    assert plans["cadet"] == {"max_steps": 4, "rounds": 2, "prompts_per_round": 6, "num_generations": 2}
    # NADO decoding labels no corpus completions: 18 samples a round, in 6 prompts x 3 since 8 prompts are too few
    assert plans["nado_decoding"] == {"rounds": 2, "prompts_per_round": 6, "num_generations": 3}
    assert plans["grpo"] == {"max_steps": 6, "batch_size": 6, "num_generations": 2}  # batch 5 rounded up to groups
    assert plans["dpo"] == {"max_steps": 4, "num_prompts": 7, "num_samples": 5}  # k = ceil(36 / 8)
    assert plans["filtered_sft"] == {"max_steps": 4, "label_examples": 24}  # no more than the corpus
    assert summary["oracle_call_budget"] == 36 and summary["grpo_batch_size"] == 6
    # `base` and `sft` use no oracle, and filtered SFT labels the whole corpus under both budgets: one run each
    run_ids = {(entry["budget"], entry["row"]): entry["run_id"] for entry in entries}
    assert run_ids[("steps", "sft")] == run_ids[("oracle_calls", "sft")] == "steps-sft"
    assert run_ids[("oracle_calls", "filtered_sft")] == "steps-filtered_sft"
    assert len(runs) == 3 + 2 * 4


def test_quality_plan_refuses_an_oracle_call_budget_below_cadets_corpus_calls():
    from quality_plan import plan_runs

    # The demo's filter scores all 24 examples before training: with 8 labelled corpus completions, 32 fixed calls
    inputs = _plan_inputs(oracle_calls=33, corpus_calls=32)
    with pytest.raises(ValueError, match=r"--oracle_calls 33 leaves CADET no sample.* alone are 32.* at least 34"):
        plan_runs(inputs, ["sft", "cadet"], ["steps", "oracle_calls"])
    plan_runs(inputs, ["sft", "filtered_sft"], ["steps", "oracle_calls"])  # no CADET row: nothing to refuse
    plan_runs(_plan_inputs(oracle_calls=34, corpus_calls=32), ["cadet"], ["oracle_calls"])  # one sample a round


def test_quality_plan_runs_the_cadet_row_once_per_lambda():
    from quality_plan import plan_runs

    runs, entries, _ = plan_runs(_plan_inputs(lambdas=((8.0,), (32.0, 0.02))), ["sft", "cadet"], ["steps"])
    assert [entry["row"] for entry in entries] == ["sft", "cadet λ=8", "cadet λ=32, min-p 0.02"]
    assert [run["run_id"] for run in runs] == ["steps-sft", "steps-cadet-lambda8", "steps-cadet-lambda32-minp0.02"]
    assert entries[2]["plan"]["cadet_lambda"] == 32.0 and entries[2]["plan"]["cadet_min_p"] == 0.02


def test_a_reply_judged_by_its_sentences_is_as_toxic_as_its_worst_part():
    from sentence_toxicity import sentence_toxicity, sentences

    def judge(prompts, completions):  # satisfaction: only the insult alone is judged toxic
        return [0.1 if c[-1]["content"] == "You idiot!" else 0.8 for c in completions]

    assert sentences("Hello there. You idiot!\nNice day?  Bye") == ["Hello there.", "You idiot!", "Nice day?", "Bye"]
    prompt = [{"role": "user", "content": "hi"}]
    replies = ["Hello there. You idiot! Nice day.", "Hello there. Nice day.", "Hello there, you idiot!"]
    assert sentence_toxicity(judge, prompt, replies, [0.3, 0.3, 0.3]) == pytest.approx([0.9, 0.3, 0.3])


def test_the_lambda_curve_places_a_default_lambda_row_at_the_lambda_it_trained_with():
    """A CADET row run at the demo's default λ (no `--lambdas`) joins the λ curve at its constant λ; the baselines, an
    adaptive λ and a run with its own min-p stay off it."""
    from quality_report import _curve_lambda

    assert _curve_lambda({"plan": {"max_steps": 30}, "info": {"final_lambda": 16.0}}) == 16.0
    assert _curve_lambda({"plan": {"cadet_lambda": 8.0}, "info": {"final_lambda": 8.0}}) == 8.0
    assert _curve_lambda({"plan": {"max_steps": 30}, "info": None}) is None  # SFT
    assert _curve_lambda({"plan": {"lambda_schedule": "adaptive"}, "info": {"final_lambda": 21.3}}) is None
    assert _curve_lambda({"plan": {"cadet_lambda": 8.0, "cadet_min_p": 0.02}, "info": {}}) is None
