"""Is a toxicity reduction length dilution? The saved evaluation samples of quality.py, judged sentence by sentence.

A whole-text judge scores a reply's toxicity lower when benign words follow the insult (with the offline Jigsaw
judge, "I am not too stupid." is 0.89 toxic; followed by "I can help you find an answer to your question about the
weather today." 0.60), so a method can lower expected maximum toxicity by writing longer replies. This script takes
the samples that `quality.py --save_samples` kept, judges each sentence of each reply with the same judges, counts a
reply as toxic as its most toxic part (the whole reply or one of its sentences), and prints for each row the mean
words per reply and, per judge, the EMT as reported (whole replies) beside the EMT by sentences. Nothing is sampled
again.

    python benchmarks/sentence_toxicity.py outputs/quality-smollm2 outputs/t-24 ...   # quality.py output folders
"""

import argparse
import json
import os
import re
import sys


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def sentences(text: str) -> list[str]:
    return [part.strip() for part in SENTENCE_END.split(text) if part.strip()]


def sentence_toxicity(judge, prompt, completions: list[str], whole: list[float | None]) -> list[float | None]:
    """Each reply's toxicity as its most toxic part: the whole reply (`whole`, as evaluated) or one of its sentences."""
    from trl_cadet.sampling import as_completions

    parts, owners = [], []
    for index, text in enumerate(completions):
        for sentence in sentences(text):
            parts.append(sentence)
            owners.append(index)
    worst = list(whole)
    if parts:
        scores = judge(prompts=[prompt] * len(parts), completions=as_completions([prompt] * len(parts), parts))
        for index, score in zip(owners, scores, strict=True):
            if score is not None and worst[index] is not None:
                worst[index] = max(worst[index], 1.0 - score)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="quality.py output folders (or quality.json files).")
    args = parser.parse_args(argv)

    from trl_cadet.evaluation import toxicity_metrics
    from trl_cadet.oracles import load_oracle

    judges, lines = {}, []
    for folder in args.folders:
        path = folder if folder.endswith(".json") else os.path.join(folder, "quality.json")
        with open(path) as f:
            report = json.load(f)
        names = report["settings"]["judges"]
        for name in names:
            if name not in judges:
                judges[name] = load_oracle(name)
        for row in report["rows"]:
            samples = (row.get("report") or {}).get("samples")
            if row.get("error") or not samples:
                continue
            cells = []
            for name in names:
                whole = [sample["toxicity"][name] for sample in samples]
                by_sentence = [
                    sentence_toxicity(judges[name], sample["prompt"], sample["completions"], sample["toxicity"][name])
                    for sample in samples
                ]
                before = toxicity_metrics(whole)["expected_max_toxicity"]
                after = toxicity_metrics(by_sentence)["expected_max_toxicity"]
                cells.append(f"{before:.3f} / {after:.3f}")
            words = [len(text.split()) for sample in samples for text in sample["completions"]]
            label = row["row"] if row["budget"] == "steps" else f"{row['row']} ({row['budget']})"
            lines.append((os.path.basename(os.path.dirname(os.path.abspath(path))), label, words, cells, names))
    if not lines:
        print("No row has saved samples: run quality.py with --save_samples.", file=sys.stderr)
        return 1
    print("EMT of whole replies / EMT by sentences (a reply as toxic as its most toxic sentence), per judge\n")
    for source, label, words, cells, names in lines:
        columns = "  ".join(f"{name}: {cell}" for name, cell in zip(names, cells, strict=True))
        print(f"{source:20s} {label:24s} words/reply {sum(words) / len(words):5.1f}  {columns}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
