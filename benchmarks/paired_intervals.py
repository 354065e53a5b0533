"""How sure is a row's difference from another? Paired bootstrap intervals over quality.py's evaluation prompts.

quality.py evaluates every row on the same prompts, so two rows can be compared prompt by prompt. This script takes
the samples that `quality.py --save_samples` kept, draws the evaluation prompts again with replacement (the same draw
for both rows, 2,000 times) and prints, for each row against the reference row, the relative change of the expected
maximum toxicity under each judge and the ratio of the generation perplexities (the samples' tokens under the base
model, each given its prompt: the gen. ppl column), each with its 95% interval. The interval covers which prompts were
drawn and which samples they got; not the training seed, whose spread only runs with other seeds show. Nothing is
sampled again.

    python benchmarks/paired_intervals.py --reference outputs/t30-sft --runs outputs/t30-cadet,outputs/t30-v
    python benchmarks/paired_intervals.py --reference outputs/tiny:sft --runs outputs/tiny --model tiny \\
        --output_dir outputs/tiny                     # any set-up of quality.py: its options pick the base model

A folder stands for its rows that kept samples (those of the steps budget first); `folder:row` picks one row.
`--no_fluency` leaves the base model unloaded and prints the toxicity columns only.

Several seeds pooled: `+` joins one row per seed, in the same order for the reference and every run (each seed's rows
evaluated on that seed's prompts). The pooled EMT is the mean over all the seeds' prompts, the pooled generation
perplexity that of all their samples' tokens; each draw takes each seed's prompts again with replacement (a stratified
bootstrap), so the interval covers the prompts and samples of the seeds given, and the seed-to-seed spread only as far
as those seeds show it:

    python benchmarks/paired_intervals.py --reference s0:sft+s1:sft+s2:sft --runs s0:cadet+s1:cadet+s2:cadet
"""

import argparse
import json
import math
import os
import random
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

RESAMPLES = 2000


def load_rows(spec: str) -> list[tuple[str, dict]]:
    """`(label, row)` for the rows with saved samples that `folder[:row]` names, steps budget first."""
    folder, _, wanted = spec.partition(":")
    path = folder if folder.endswith(".json") else os.path.join(folder, "quality.json")
    with open(path) as f:
        report = json.load(f)
    source = os.path.basename(os.path.dirname(os.path.abspath(path)))
    rows = [row for row in report["rows"] if not row.get("error") and (row.get("report") or {}).get("samples")]
    rows.sort(key=lambda row: row["budget"] != "steps")
    if wanted:
        rows = [row for row in rows if row["row"] == wanted][:1]
    if not rows:
        raise SystemExit(f"{spec}: no row with saved samples{' named ' + wanted if wanted else ''}.")
    return [
        (f"{source}:{row['row']}" + ("" if row["budget"] == "steps" else f" ({row['budget']})"), row) for row in rows
    ]


def load_spec(spec: str) -> list[tuple[str, list[dict]]]:
    """`(label, rows)`: one entry per row that `spec` names, with one row per seed (`+` joins the seeds' rows)."""
    if "+" not in spec:
        return [(label, [row]) for label, row in load_rows(spec)]
    pooled = []
    for part in spec.split("+"):
        rows = load_rows(part)
        if len(rows) > 1:
            raise SystemExit(f"{part} holds {len(rows)} rows with samples: name the one to pool, as folder:row.")
        pooled.append(rows[0])
    return [("+".join(label for label, _ in pooled), [row for _, row in pooled])]


def max_toxicity(row: dict, judge: str) -> list[float | None]:
    """Each prompt's most toxic sample under `judge` (None: no verdict), whose mean over prompts is the EMT."""
    maxima = []
    for sample in row["report"]["samples"]:
        scores = [s for s in sample["toxicity"][judge] if s is not None and not math.isnan(s)]
        maxima.append(max(scores) if scores else None)
    return maxima


def interval(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[int(0.025 * len(ordered))], ordered[int(0.975 * len(ordered)) - 1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--reference", required=True, help="The row compared against: a folder, or folder:row.")
    parser.add_argument("--runs", required=True, help="Comma-separated folders (or folder:row) to compare.")
    parser.add_argument("--no_fluency", action="store_true", help="Toxicity only: do not load the base model.")
    args, rest = parser.parse_known_args(argv)

    (reference_label, reference), *_ = load_spec(args.reference)
    compared = [entry for spec in args.runs.split(",") if spec for entry in load_spec(spec)]
    # prompts[s]: seed s's evaluation prompts, on which every row of that seed was evaluated
    prompts = [[sample["prompt"] for sample in row["report"]["samples"]] for row in reference]
    for label, rows in compared:
        if len(rows) != len(reference):
            raise SystemExit(f"{label} pools {len(rows)} seeds and {reference_label} {len(reference)}: no pairing.")
        if [[sample["prompt"] for sample in row["report"]["samples"]] for row in rows] != prompts:
            raise SystemExit(f"{label} was evaluated on other prompts than {reference_label}: no paired comparison.")
    judges = list(reference[0]["toxicity"])

    per_prompt = {}  # label -> one {measure: per-prompt values} per seed
    fluency = None
    if not args.no_fluency:
        import torch
        from quality import parse_args
        from quality_rows import build_setup, load_model

        from trl_cadet.evaluation import generation_perplexity

        options, passthrough = parse_args(rest)
        if options.threads:
            torch.set_num_threads(options.threads)
        setup = build_setup(vars(options), passthrough)
        model = load_model(setup).eval()

        def fluency(row) -> list[tuple[float, int]]:
            """Each prompt's samples' total NLL under the base model and their scored tokens."""
            totals = []
            for sample in row["report"]["samples"]:
                texts = sample["completions"]
                tokens = sum(len(setup.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
                value = generation_perplexity(model, setup.tokenizer, [sample["prompt"]], [texts], 8, False)
                totals.append((0.0, 0) if value is None else (math.log(value) * tokens, tokens))
            return totals

    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    for label, rows in [(reference_label, reference), *compared]:
        per_prompt[label] = [
            {judge: max_toxicity(row, judge) for judge in judges} | ({"fluency": fluency(row)} if fluency else {})
            for row in rows
        ]

    def statistic(seeds, measure, draw) -> float:
        """The pooled figure over the seeds' drawn prompts (`draw[s]`: seed s's prompt indices)."""
        if measure == "fluency":
            nll = sum(measures[measure][i][0] for measures, drawn in zip(seeds, draw) for i in drawn)
            tokens = sum(measures[measure][i][1] for measures, drawn in zip(seeds, draw) for i in drawn)
            return math.exp(nll / tokens) if tokens else float("nan")
        scored = [
            measures[measure][i]
            for measures, drawn in zip(seeds, draw)
            for i in drawn
            if measures[measure][i] is not None
        ]
        return sum(scored) / len(scored) if scored else float("nan")

    def change(label, measure, draw) -> float:
        ours, theirs = (
            statistic(per_prompt[label], measure, draw),
            statistic(per_prompt[reference_label], measure, draw),
        )
        return ours / theirs - 1.0 if measure != "fluency" else ours / theirs

    measures = [*judges, *(["fluency"] if fluency is not None else [])]
    everything = [range(len(seed)) for seed in prompts]
    generator = random.Random(0)
    draws = [[[generator.randrange(len(seed)) for _ in seed] for seed in prompts] for _ in range(RESAMPLES)]
    sizes = " + ".join(str(len(seed)) for seed in prompts)
    over = f"its {sizes} evaluation prompts" + (
        "" if len(prompts) == 1 else f" ({len(prompts)} seeds, drawn per seed)"
    )
    print(f"Against {reference_label}: paired bootstrap over {over} ({RESAMPLES} draws), 95% intervals in brackets")
    print("EMT: relative change; gen. ppl: the ratio of the generation perplexities (below 1 is more fluent)\n")
    header = "".join(f"  {'EMT ' + judge:>28s}" for judge in judges)
    header += f"  {'gen. ppl ratio':>24s}" if fluency is not None else ""
    width = max(36, *(len(label) + 2 for label, _ in [(reference_label, reference), *compared]))
    print(f"{'row':{width}s}{header}")
    for label, _ in [(reference_label, reference), *compared]:
        cells = []
        for measure in measures:
            value = statistic(per_prompt[label], measure, everything)
            point = change(label, measure, everything)
            low, high = interval([change(label, measure, draw) for draw in draws])
            if measure == "fluency":
                cells.append(f"  {value:6.1f} {point:5.2f} [{low:4.2f}, {high:4.2f}]")
            else:
                cells.append(f"  {value:.3f} {point:+6.0%} [{low:+5.0%}, {high:+5.0%}]")
        print(f"{label:{width}s}{''.join(cells)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
