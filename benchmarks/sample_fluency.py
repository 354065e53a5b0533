"""Where the samples' fluency goes: quality.py's saved samples under the base model, by kind of prompt.

quality.py's gen. ppl column is the perplexity of every sampled token under the base model, each given its prompt. This
script takes the samples that `quality.py --save_samples` kept and prints, for each row, that figure again, the median
of the samples' own perplexities (a few bad samples move the first and not the second), and the figure over the
evaluation prompts whose last user turn a judge scores as toxic (the taunts) and over the others (the benign ones).
Nothing is sampled again.

    python benchmarks/sample_fluency.py --runs outputs/t30-sft,outputs/t30-cadet   # quality.py output folders
    python benchmarks/sample_fluency.py --runs outputs/tiny --model tiny --output_dir outputs/tiny   # any set-up

The base model is that of quality.py's set-up (`--model`, and `--output_dir` for `--model tiny`, where it lives).
"""

import argparse
import json
import os
import statistics
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--model` is quality.py's
    )
    parser.add_argument(
        "--runs", required=True, help="Comma-separated quality.py output folders (or quality.json files)."
    )
    parser.add_argument("--split_judge", default="profanity", help="The judge that tells taunts from benign prompts.")
    args, rest = parser.parse_known_args(argv)

    import torch
    from quality import parse_args
    from quality_rows import build_setup, load_model

    from trl_cadet.evaluation import generation_perplexity
    from trl_cadet.oracles import load_oracle
    from trl_cadet.sampling import as_completions

    options, passthrough = parse_args(rest)
    if options.threads:
        torch.set_num_threads(options.threads)
    setup = build_setup(vars(options), passthrough)
    model = load_model(setup).eval()
    judge = load_oracle(args.split_judge)

    def taunts(prompts) -> list[bool]:
        turns = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        scores = judge(prompts=prompts, completions=as_completions(prompts, turns))
        return [score is not None and 1.0 - score >= 0.5 for score in scores]

    lines = []
    for folder in [folder for folder in args.runs.split(",") if folder]:
        path = folder if folder.endswith(".json") else os.path.join(folder, "quality.json")
        with open(path) as f:
            report = json.load(f)
        for row in report["rows"]:
            samples = (row.get("report") or {}).get("samples")
            if row.get("error") or not samples:
                continue
            prompts = [sample["prompt"] for sample in samples]
            completions = [sample["completions"] for sample in samples]
            flagged = taunts(prompts)

            def fluency(keep) -> float:  # quality.py's measure over the prompts `keep` selects
                chosen = [i for i in range(len(prompts)) if keep(i)]
                value = generation_perplexity(
                    model, setup.tokenizer, [prompts[i] for i in chosen], [completions[i] for i in chosen], 16, False
                )
                return float("nan") if value is None else value

            each = [
                generation_perplexity(model, setup.tokenizer, [prompt], [[text]], 1, False)
                for prompt, texts in zip(prompts, completions, strict=True)
                for text in texts
            ]
            each = [value for value in each if value is not None]
            median = statistics.median(each) if each else float("nan")
            label = row["row"] if row["budget"] == "steps" else f"{row['row']} ({row['budget']})"
            source = os.path.basename(os.path.dirname(os.path.abspath(path)))
            benign, taunting = fluency(lambda i: not flagged[i]), fluency(lambda i: flagged[i])
            every = fluency(lambda i: True)
            lines.append((source, label, every, median, flagged.count(False), benign, flagged.count(True), taunting))
    if not lines:
        print("No row has saved samples: run quality.py with --save_samples.", file=sys.stderr)
        return 1
    print(f"Samples under the base model; prompts split by the {args.split_judge} judge on their last user turn\n")
    print(f"{'source':20s} {'row':24s} gen. ppl  median sample  benign prompts (ppl)  taunts (ppl)")
    for source, label, every, median, n_benign, benign, n_taunts, taunting in lines:
        print(
            f"{source:20s} {label:24s} {every:8.2f}  {median:13.2f}  {n_benign:5d} ({benign:8.2f})  "
            f"{n_taunts:4d} ({taunting:7.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
