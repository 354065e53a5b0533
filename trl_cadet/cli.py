"""The `trl-cadet` command line.

Usage:

```bash
# Toxicity of 25 samples per prompt under two judges, and perplexity on held-out text
trl-cadet evaluate --model outputs/cadet --prompts prompts.jsonl --texts heldout.jsonl \\
    --judges jigsaw,profanity --num_samples 25 --output outputs/cadet/eval.json

# Toxicity against perplexity for several reports; a λ sweep when the reports carry `lambda`
trl-cadet plot outputs/base/eval.json outputs/cadet/eval.json --output toxicity_vs_ppl.png
```

`python -m trl_cadet ...` is the same as `trl-cadet ...`.

File formats: `--prompts` is a `.json` file holding a list, or a `.jsonl` file with one item a line. An item is a
string, a list of chat messages, or an object with a `prompt` field (a string, a list of messages, or
RealToxicityPrompts' `{"text": ...}`). `--texts` is the same with a `text` or `messages` field, or a `.txt` file with
one text a line.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A wrong command line or input file: reported without a traceback."""


# Data loading


def _read_items(path: str) -> list[Any]:
    if not os.path.isfile(path):
        raise UsageError(f"No file at `{path}`.")
    suffix = Path(path).suffix.lower()
    with open(path, encoding="utf-8") as f:
        if suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            items = json.load(f)
            if isinstance(items, dict) and len(items) == 1:  # {"prompts": [...]} and the like
                items = next(iter(items.values()))
            if not isinstance(items, list):
                raise UsageError(f"`{path}` must hold a JSON list (or an object with one list in it).")
            return items
        if suffix == ".txt":
            return [line.rstrip("\n") for line in f if line.strip()]
    raise UsageError(f"Cannot read `{path}`: use a `.json`, `.jsonl` (or, for texts, `.txt`) file.")


def _unwrap(item: Any, keys: tuple[str, ...], path: str) -> Any:
    for key in keys:
        if isinstance(item, dict) and key in item:
            item = item[key]
            break
    if isinstance(item, dict) and "text" in item:  # RealToxicityPrompts: {"prompt": {"text": ...}}
        item = item["text"]
    if isinstance(item, str) or (isinstance(item, list) and item and all(isinstance(m, dict) for m in item)):
        return item
    raise UsageError(
        f"Cannot read the item {str(item)[:80]!r} of `{path}`: an item must be a string, a list of chat messages, or "
        f"an object with a {' or '.join(f'`{k}`' for k in keys)} field holding one."
    )


def load_prompts(value: str) -> list[str | list[dict[str, str]]]:
    """Read the prompts named by `--prompts`: a `.json`/`.jsonl` file (see the module docstring)."""
    if not os.path.isfile(value):
        raise UsageError(f"`--prompts {value}` is not a file. Pass the path of a `.json` or `.jsonl` file.")
    return [_unwrap(item, ("prompt",), value) for item in _read_items(value)]


def load_texts(value: str) -> list[str | list[dict[str, str]]]:
    """Read the held-out texts of `--texts`: a `.json`/`.jsonl`/`.txt` file (see the module docstring)."""
    if not os.path.isfile(value):
        raise UsageError(f"`--texts {value}` is not a file. Pass the path of a `.json`, `.jsonl` or `.txt` file.")
    return [_unwrap(item, ("text", "messages"), value) for item in _read_items(value)]


def load_model_and_tokenizer(model_path: str, dtype: str = "float32"):
    """Load a saved causal LM, or a PEFT adapter folder on top of its base model, and its tokenizer."""
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    tokenizer_path = model_path
    if os.path.isfile(os.path.join(model_path, "adapter_config.json")):
        import torch
        from peft import AutoPeftModelForCausalLM, PeftConfig

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = AutoPeftModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        if torch.cuda.is_available():
            model = model.to("cuda")
        if not os.path.isfile(os.path.join(model_path, "tokenizer_config.json")):
            tokenizer_path = PeftConfig.from_pretrained(model_path).base_model_name_or_path
    else:
        model = create_model_from_path(model_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return model, tokenizer


# Commands


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Saved model folder, or a PEFT adapter folder.")
    parser.add_argument("--prompts", help="Prompts file (.json/.jsonl).")
    parser.add_argument("--texts", help="Held-out texts file (.json/.jsonl/.txt) for perplexity.")
    parser.add_argument(
        "--judges",
        default=None,
        help="Comma-separated judges: `jigsaw`, `profanity`, `detoxify`, or paths of sequence-classification models.",
    )
    parser.add_argument("--num_samples", type=int, default=25, help="Samples per prompt (k).")
    parser.add_argument("--max_prompts", type=int, default=None, help="Evaluate only the first N prompts.")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--top_k", type=int, default=0, help="0 turns top-k filtering off.")
    parser.add_argument("--batch_size", type=int, default=32, help="Sequences per generation call.")
    parser.add_argument("--threshold", type=float, default=0.5, help="Toxicity threshold of `toxicity_probability`.")
    parser.add_argument("--perplexity_batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=512, help="Tokens kept per held-out text.")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--save_samples", action="store_true", help="Write the samples into the report.")
    parser.add_argument("--label", default=None, help="Label of this model in `trl-cadet plot`.")
    parser.add_argument(
        "--lambda", dest="lambda_", type=float, default=None, help="λ of this model, for the λ sweep of `plot`."
    )
    parser.add_argument("--output", default=None, help="JSON report path; the report is printed when not given.")


def evaluate_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run `trl-cadet evaluate` and return the report."""
    from .evaluation import evaluate_model
    from .oracles.registry import load_oracle

    if args.prompts is None and args.texts is None:
        raise UsageError("Nothing to evaluate: pass `--prompts` (with `--judges`) and/or `--texts`.")
    prompts = None
    judges = None
    if args.prompts is not None:
        if not args.judges:
            raise UsageError("`--prompts` needs `--judges` to score the samples, e.g. `--judges jigsaw,profanity`.")
        prompts = load_prompts(args.prompts)
        if args.max_prompts is not None:
            prompts = prompts[: args.max_prompts]
        try:
            judges = {name: load_oracle(name) for name in (n.strip() for n in args.judges.split(",")) if name}
        except ValueError as error:  # an unknown judge name
            raise UsageError(str(error)) from error
    texts = load_texts(args.texts) if args.texts is not None else None

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    report = evaluate_model(
        model,
        tokenizer,
        prompts=prompts,
        judges=judges,
        texts=texts,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        batch_size=args.batch_size,
        threshold=args.threshold,
        perplexity_batch_size=args.perplexity_batch_size,
        max_length=args.max_length,
        seed=args.seed,
        save_samples=args.save_samples,
        model_name_or_path=args.model,
    )
    report["settings"].update({"prompts": args.prompts, "texts": args.texts, "dtype": args.dtype})
    if args.label is not None:
        report["label"] = args.label
    if args.lambda_ is not None:
        report["lambda"] = args.lambda_

    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.output is None:
        print(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        summary = ", ".join(
            f"{name}: EMT {m['expected_max_toxicity']:.3f}, P(toxic) {m['toxicity_probability']:.3f}"
            for name, m in report["toxicity"].items()
            if m["expected_max_toxicity"] is not None
        )
        if report["perplexity"] is not None:
            summary += f"{', ' if summary else ''}perplexity {report['perplexity']:.2f}"
        print(f"Wrote {args.output} ({summary})")
    return report


def _read_plot_entries(paths: list[str]) -> list[dict[str, Any]]:
    """Read reports into `{"label", "lambda", "report"}` entries, from reports or JSON lists of such entries."""
    entries = []
    for path in paths:
        if not os.path.isfile(path):
            raise UsageError(f"No report at `{path}`.")
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        items = content if isinstance(content, list) else [content]
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise UsageError(f"`{path}` must hold a report or a list of `{{label, lambda, report}}` objects.")
            report = item.get("report", item)
            if isinstance(report, str):  # a path to a report, relative to the list's file
                with open(Path(path).parent / report, encoding="utf-8") as f:
                    report = json.load(f)
            if "toxicity" not in report and "perplexity" not in report:
                raise UsageError(f"Item {index} of `{path}` is not a `trl-cadet evaluate` report.")
            label = item.get("label", report.get("label"))
            if label is None:
                label = Path(path).stem if len(items) == 1 else f"{Path(path).stem}[{index}]"
            entries.append({"label": str(label), "lambda": item.get("lambda", report.get("lambda")), "report": report})
    return entries


def plot_command(args: argparse.Namespace) -> None:
    """Run `trl-cadet plot`."""
    from .plotting import plot_reports

    judges = [name.strip() for name in args.judges.split(",")] if args.judges else None
    plot_reports(_read_plot_entries(args.reports), args.output, judges=judges)
    print(f"Wrote {args.output}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-cadet", description="CADET tools (detoxification evaluation).")
    subparsers = parser.add_subparsers(dest="command")
    evaluate = subparsers.add_parser(
        "evaluate", help="Sampled toxicity under judges, and perplexity, of a saved model; writes a JSON report."
    )
    _add_evaluate_arguments(evaluate)
    plot = subparsers.add_parser("plot", help="Plot toxicity vs perplexity (and vs λ) from JSON reports.")
    plot.add_argument(
        "reports", nargs="+", help="Reports of `evaluate`, or JSON lists of `{label, lambda, report}` objects."
    )
    plot.add_argument("--output", required=True, help="PNG path.")
    plot.add_argument("--judges", default=None, help="Comma-separated judges to plot (all by default).")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-cadet` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "evaluate":
            evaluate_command(args)
        elif args.command == "plot":
            plot_command(args)
    except UsageError as error:
        parser.exit(2, f"trl-cadet {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
