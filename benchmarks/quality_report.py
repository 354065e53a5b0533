"""The report of `quality.py`: the table, the toxicity-against-perplexity plot of each budget, and `--merge`."""

import json
import os


def format_table(rows: list[dict], judges: list[str], oracle: str) -> str:
    def judge_name(judge):
        return f"{judge}*" if judge == oracle else judge

    def number(value, spec):
        return "-" if value is None else format(value, spec)

    header = ["budget", "row"]
    header += [f"EMT[{judge_name(j)}]" for j in judges] + [f"P(tox)[{judge_name(j)}]" for j in judges]
    gpu = any(row.get("peak_cuda_mib") is not None for row in rows)
    useful = any(row.get("useful_perplexity") is not None for row in rows)
    header += ["ppl"] + ["useful ppl"] * useful + ["gen. ppl", "dist-2"]
    header += ["LM steps", "oracle calls", "wall s", "peak MiB"] + (["peak GPU MiB"] if gpu else []) + ["error"]
    lines = [header]
    for row in rows:
        tox = row.get("toxicity") or {}
        line = [row["budget"], row["row"]]
        line += [number(tox.get(j, {}).get("expected_max_toxicity"), ".3f") for j in judges]
        line += [number(tox.get(j, {}).get("toxicity_probability"), ".3f") for j in judges]
        fluency = row.get("fluency") or {}
        line += [number(row.get("perplexity"), ".2f")]
        line += [number(row.get("useful_perplexity"), ".2f")] * useful
        line += [number(fluency.get("generation_perplexity"), ".2f"), number(fluency.get("distinct_2"), ".3f")]
        line += [
            number(row.get("lm_steps"), "d"),
            number(row.get("oracle_calls"), "d"),
            number(row.get("wall_clock_s"), ".1f"),
            number(row.get("peak_rss_mib"), ".0f"),
            *([number(row.get("peak_cuda_mib"), ".0f")] if gpu else []),
            (row.get("error") or "")[:60],
        ]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines)


def _curve_lambda(row: dict) -> float | None:
    """Where a row sits on the λ curve: its `--lambdas` value, or for a CADET row at the default λ the constant λ it
    trained with (`final_lambda`); `None` (off the curve) for the baselines, an adaptive λ and a run with its own
    `cadet_min_p`."""
    plan = row["plan"]
    if "cadet_min_p" in plan or plan.get("lambda_schedule", "constant") != "constant":
        return None
    return plan.get("cadet_lambda", (row.get("info") or {}).get("final_lambda"))


def plot(rows: list[dict], output_dir: str) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("No plot: matplotlib is not installed (it is in the `demo` extra).")
        return []
    from trl_cadet.plotting import plot_reports

    paths = []
    for budget in dict.fromkeys(row["budget"] for row in rows):
        entries = [
            {"label": row["row"], "lambda": _curve_lambda(row), "report": row["report"]}
            for row in rows
            if row["budget"] == budget and row.get("report")
        ]
        if entries:
            path = os.path.join(output_dir, f"quality_{budget}.png")
            plot_reports(entries, path)
            paths.append(path)
    return paths


def merge_runs(sources: list[str], output_dir: str, no_plot: bool = False) -> int:
    """One table and one plot from the `quality.json` of several runs (`--merge`)."""
    loaded = []
    for source in sources:
        path = source if source.endswith(".json") else os.path.join(source, "quality.json")
        if not os.path.isfile(path):
            print(f"quality.py: error: --merge: {path} does not exist; give the --output_dir of a finished run.")
            return 2
        with open(path) as f:
            loaded.append((source, json.load(f)))
    settings = loaded[0][1]["settings"]
    same = ("model_path", "judges", "oracle", "demo_args")
    for source, other in loaded[1:]:
        differ = [key for key in same if other["settings"].get(key) != settings.get(key)]
        if differ:
            print(
                f"quality.py: error: --merge: {source} differs from {sources[0]} in {', '.join(differ)}; merge only "
                "runs of the same model, corpus, judges and evaluation."
            )
            return 2
    rows, seen = [], set()
    for source, run in loaded:
        for row in run["rows"]:
            label = row["row"]
            if (row["budget"], label) in seen:  # the same row in two runs: name its run
                label = f"{label} ({os.path.basename(os.path.normpath(source))})"
            seen.add((row["budget"], label))
            rows.append({**row, "row": label, "source": source, "passthrough": run["settings"].get("passthrough")})
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "quality.json")
    with open(path, "w") as f:
        json.dump({"settings": {**settings, "merged_from": sources}, "rows": rows}, f, indent=2, default=str)
    print(f"Merged {len(rows)} rows of {len(sources)} runs; * the training oracle\n")
    print(format_table(rows, settings["judges"], settings["oracle"]))
    if not no_plot:
        for plot_path in plot(rows, output_dir):
            print(f"Plot: {plot_path}")
    print(f"Results: {path}")
    return 0
