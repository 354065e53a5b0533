"""Quality of CADET against what a user would pick instead, side by side in one run on the same model, corpus, prompts,
seeds and judges.

    python benchmarks/quality.py                                  # SmolLM2-135M (offline), both budgets
    python benchmarks/quality.py --budget steps --rows base,sft,cadet
    python benchmarks/quality.py --model tiny --threads 1         # a tiny Llama: a smoke test in about a minute
    python benchmarks/quality.py --cadet_lambda 2 --eval_num_samples 25   # any option of examples/run_demo.py
    python benchmarks/quality.py --merge outputs/l8,outputs/l32 --output_dir outputs/sweep   # one table and plot

Everything the demo (`examples/run_demo.py`) sets is taken from it: its corpus (`build_detox_corpus`), its defaults
(`DEMO_DEFAULTS`, parsed by its own `make_parser`, so any of its options can be added to the command line), its
training oracle (`--oracle`, Jigsaw) and judges (`--judges`, Jigsaw and alt-profanity-check), and its evaluation
(`evaluate_model` on the held-out prompts and conversations, `--eval_num_samples` samples each, `--eval_seed`). So
the `base`, `sft` and `cadet` rows here are the demo's rows. `--model tiny` swaps in the tiny Llama and tokenizer of
`benchmarks/tiny_llama.py` and a small corpus (`TINY_DEFAULTS` of `quality_rows.py`); the demo's
`--model_name_or_path` swaps in any other.

Rows (`--rows` picks a subset):

- `base`: the model, no training.
- `sft`: TRL `SFTTrainer` on the corpus.
- `filtered_sft`: the corpus examples whose assistant reply the training oracle labels unsatisfied (satisfaction below
  `oracle_threshold`, CADET's hard-label rule) are dropped, then TRL `SFTTrainer` on the rest.
- `grpo`: TRL `GRPOTrainer` on the oracle-phase prompts, with the training oracle as its reward (a satisfaction score
  in [0, 1] is a TRL reward function as it is).
- `dpo`: TRL `DPOTrainer` on pairs of base-model samples: `--dpo_num_samples` completions per oracle-phase prompt,
  scored by the training oracle; the best and the worst completion of a prompt make a pair when their scores differ.
- `nado_decoding`: no fine-tuning; a NADO model is trained on base-model samples by the oracle phase of
  `trl_cadet.oracle_phase` (as many phases, prompts and samples as CADET's), and evaluation samples through
  `trl_cadet.decoding.NADOLogitsProcessor`.
- `cadet`, `cadet_parallel` (`round_schedule="parallel"`), `cadet_adaptive` (`lambda_schedule="adaptive"`):
  `CADETTrainer`. With the demo's `filter_corpus=True` (`--filter_corpus false` turns it off) they train on
  `filtered_sft`'s examples, in its order (the corpus scored by the training oracle first; at λ = 0 the
  `filtered_sft` row), with the regulariser on top.

Every trained row uses the demo's LoRA, learning rate, batch size, scheduler and seed, and is evaluated like the demo's
rows. Each row runs in a process of its own, so its peak memory is its own: forked from a multiprocessing fork server
that has only imported the libraries (a fresh interpreter where there is no fork server), never from this process,
whose torch thread pool may already run (forking a running GNU OpenMP pool hangs the child at its first parallel
operation). A row that fails records its error and the run goes on; the exit status is 1 when a row failed.

Budgets (`--budget steps`, `--budget oracle_calls`, or `--budget both`, the default):

- `steps`: every trained row makes `--max_steps` LM optimizer steps (the demo's 30 by default), with its own sampling
  sizes: CADET `prompts_per_round` x `num_generations` per round (its oracle calls are the samples it labels), GRPO
  `per_device_train_batch_size` completions per step (rounded up to a multiple of `--grpo_num_generations`; its oracle
  calls are the completions it scores), DPO `--dpo_num_samples` samples for each oracle-phase prompt (the samples it
  labels), filtered SFT the whole corpus (the examples it labels). NADO decoding samples and labels what CADET does.
- `oracle_calls`: every row that uses the oracle gets the same number B of oracle calls (`--oracle_calls`; by
  default what CADET uses under the step budget, so that CADET and NADO decoding run once and appear in both tables).
  The rule, per method:
    - CADET (all three) and NADO decoding keep `--max_steps` and `steps_per_round`, hence the number of rounds R; CADET
      first labels its `nado_corpus_samples` corpus completions, bisects the U unsatisfied ones and makes U rollouts a
      round (C calls in all, computed before the runs with the training oracle as the trainer will make them; NADO
      decoding labels none, so C = 0 for it), then each round labels (B - C) // R samples: `num_generations` is raised
      to ceil(((B - C) // R) / #prompts) when the oracle-phase prompts are too few, and `prompts_per_round` =
      ((B - C) // R) // `num_generations`.
    - GRPO keeps its per-step batch b and makes B // b optimizer steps (each step scores b fresh completions).
    - DPO keeps `--max_steps`; it samples k = max(`--dpo_num_samples`, ceil(B / #prompts)) completions for each of
      B // k oracle-phase prompts (drawn with `--seed`).
    - Filtered SFT keeps `--max_steps`; it labels the first min(B, corpus size) examples of the corpus shuffled with
      `--seed` and trains on those that the oracle labels satisfied (unlabelled examples are not trained on).
  Where B does not divide evenly a method gets the largest count below B (but at least one GRPO step, one DPO prompt
  and one CADET sample per round); the oracle calls actually made are counted (a wrapper around the training
  oracle) and reported. `base` and `sft` use no oracle and run once.

Columns: expected maximum toxicity (EMT) and toxicity probability under each judge (the training oracle is marked
`*`), perplexity on the held-out conversations, LM optimizer steps, oracle calls, wall-clock of the method (sampling,
labelling and training, not the evaluation), and peak memory (resident set of the row's process; on CUDA, also
`torch.cuda.max_memory_allocated`). The table is printed, the rows go to `quality.json` in `--output_dir` (with each
row's full `evaluate_model` report), and, when matplotlib is installed, toxicity against perplexity to
`quality_<budget>.png`.

This file is the command line and the run; the budget rules are `quality_plan.py` (a pure function of the sizes), the
rows `quality_rows.py`, and the table, the plots and `--merge` `quality_report.py`.
"""

import argparse
import dataclasses
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_plan import BUDGETS, ROWS, PlanInputs, corpus_oracle_calls, plan_runs  # noqa: E402
from quality_report import format_table, merge_runs, plot  # noqa: E402
from quality_rows import build_setup, run_in_process, start_method  # noqa: E402


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # the other options go to the demo's parser, whose names must not be taken for ours
        epilog="Any other option is an option of examples/run_demo.py (DemoArguments, CADETConfig, ModelConfig), "
        "e.g. --cadet_lambda 2 --eval_num_samples 25 --oracle jigsaw --judges jigsaw,profanity. See the module "
        "docstring for the rows and the budget rules.",
    )
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"], help="The LM (default: smollm2).")
    parser.add_argument("--budget", default="both", choices=[*BUDGETS, "both"], help="What is held equal.")
    parser.add_argument("--max_steps", type=int, default=None, help="LM optimizer steps (default: the demo's 30).")
    parser.add_argument(
        "--oracle_calls", type=int, default=None, help="B of the oracle-call budget (default: CADET's calls)."
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated subset of: {', '.join(ROWS)}.")
    parser.add_argument("--output_dir", default=None, help="Where to write (default: outputs/quality-<model>).")
    parser.add_argument("--seed", type=int, default=None, help="Training and sampling seed (default: the demo's 42).")
    parser.add_argument(
        "--grpo_num_generations", type=int, default=None, help="GRPO group size (default: 4; tiny: 2)."
    )
    parser.add_argument(
        "--dpo_num_samples", type=int, default=None, help="DPO samples per prompt, k (default: 4; tiny: 2)."
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument(
        "--lambdas",
        default=None,
        help="Comma-separated λ values: the `cadet` row runs once per value (a trade-off curve, as the paper's "
        "Figure 3). A value `λ:min_p` also sets `cadet_min_p` for that run (a point off the curve). Default: the "
        "demo's λ only.",
    )
    parser.add_argument("--no_plot", action="store_true", help="Do not write the plots.")
    parser.add_argument(
        "--save_samples", action="store_true", help="Keep each row's evaluation samples in quality.json."
    )
    parser.add_argument(
        "--save_models",
        action="store_true",
        help="Save each row's trained model (its adapter, with LoRA) in `runs/<run id>/model` of --output_dir.",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the runs that the budgets give, and exit.")
    parser.add_argument(
        "--merge",
        default=None,
        help="Comma-separated output directories (or quality.json files) of earlier runs on the same model, corpus "
        "and judges, e.g. a λ sweep run one value per process: print one table of all their rows, write it to "
        "--output_dir with one plot, and exit. Nothing is trained.",
    )
    args, passthrough = parser.parse_known_args(argv)
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = [row for row in rows if row not in ROWS]
    if unknown or not rows:
        parser.error(f"--rows: unknown row(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}.")
    args.rows = [row for row in ROWS if row in rows]
    args.budgets = list(BUDGETS) if args.budget == "both" else [args.budget]
    tiny = args.model == "tiny"
    if args.grpo_num_generations is None:
        args.grpo_num_generations = 2 if tiny else 4
    if args.dpo_num_samples is None:
        args.dpo_num_samples = 2 if tiny else 4
    if args.grpo_num_generations < 2 or args.dpo_num_samples < 2:
        parser.error("--grpo_num_generations and --dpo_num_samples must be at least 2 (GRPO groups and DPO pairs).")
    for name in ("max_steps", "oracle_calls"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.output_dir is None:
        args.output_dir = os.path.join("outputs", f"quality-{args.model}")
    if args.lambdas is not None:
        try:
            args.lambdas = [tuple(float(x) for x in value.split(":")) for value in args.lambdas.split(",") if value]
        except ValueError:
            parser.error(f"--lambdas: expected values such as 4,8 or 8:0.02 (λ:min_p), got {args.lambdas!r}.")
        if any(len(value) > 2 for value in args.lambdas):
            parser.error(f"--lambdas: a value is λ or λ:min_p, got {args.lambdas!r}.")
    return args, passthrough


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads collapse on shared cores
    args, passthrough = parse_args(argv)
    if args.merge:
        return merge_runs([source for source in args.merge.split(",") if source], args.output_dir, args.no_plot)
    options = {
        name: getattr(args, name)
        for name in (
            "model",
            "max_steps",
            "oracle_calls",
            "output_dir",
            "seed",
            "grpo_num_generations",
            "dpo_num_samples",
            "threads",
            "lambdas",
            "save_samples",
            "save_models",
        )
    }
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    method = start_method()
    try:
        setup = build_setup(options, passthrough)
    except ValueError as error:  # an option the demo's parser does not know, or a wrong value
        print(f"quality.py: error: {error}", file=sys.stderr)
        return 2
    config = setup.config
    corpus_calls, rollouts_per_round = corpus_oracle_calls(
        setup.corpus, setup.tokenizer, config, setup.demo_args.oracle
    )
    inputs = PlanInputs(
        max_steps=config.max_steps,
        steps_per_round=config.steps_per_round,
        prompts_per_round=config.prompts_per_round,
        num_generations=config.num_generations,
        per_device_train_batch_size=config.per_device_train_batch_size,
        num_oracle_prompts=len(setup.corpus["oracle"]),
        num_train=len(setup.corpus["train"]),
        corpus_calls=corpus_calls,
        rollouts_per_round=rollouts_per_round,
        grpo_num_generations=args.grpo_num_generations,
        dpo_num_samples=args.dpo_num_samples,
        oracle_calls=args.oracle_calls,
        lambdas=tuple(args.lambdas) if args.lambdas else None,
    )
    try:
        runs, entries, summary = plan_runs(inputs, args.rows, args.budgets)
    except ValueError as error:  # a budget too small for the rows asked for
        print(f"quality.py: error: {error}", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"Quality benchmark: {len(entries)} rows ({len(runs)} runs) on {setup.model_path}, {device}; "
        f"budgets: {', '.join(args.budgets)}; {json.dumps(summary)}",
        flush=True,
    )

    if args.dry_run:
        for entry in entries:
            shared = "" if entry["run_id"] == f"{entry['budget']}-{entry['row']}" else f" (run {entry['run_id']})"
            print(f"{entry['budget']:>12}  {entry['row']:<15} {json.dumps(entry['plan'])}{shared}")
        return 0

    results = {}
    for i, run in enumerate(runs, 1):
        print(f"\n=== [{i}/{len(runs)}] {run['run_id']}: {json.dumps(run['plan'])}", flush=True)
        results[run["run_id"]] = run_in_process(run, options, passthrough, method)
        result = results[run["run_id"]]
        print(
            f"=== {run['run_id']}: "
            + (f"error: {result['error']}" if result.get("error") else f"done in {result['wall_clock_s']:.1f} s"),
            flush=True,
        )

    rows = [{**entry, **results[entry["run_id"]]} for entry in entries]
    settings = {
        "model": args.model,
        "model_path": setup.model_path,
        "device": device,
        "budgets": args.budgets,
        "rows": args.rows,
        "oracle": setup.demo_args.oracle,
        "judges": list(setup.judges),
        "start_method": method,
        **summary,
        "demo_args": dataclasses.asdict(setup.demo_args),
        "training": {
            name: getattr(config, name)
            for name in (
                "per_device_train_batch_size",
                "learning_rate",
                "lr_scheduler_type",
                "max_length",
                "seed",
                "cadet_lambda",
                "cadet_min_p",
                "steps_per_round",
                "prompts_per_round",
                "num_generations",
                "max_completion_length",
                "nado_epochs",
                "oracle_threshold",
            )
        },
        "peft": setup.peft_config is not None,
        "passthrough": passthrough,
    }
    path = os.path.join(args.output_dir, "quality.json")
    with open(path, "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=2, default=str)

    print(f"\nCADET and the alternatives ({device}); * the training oracle\n")
    print(format_table(rows, list(setup.judges), setup.demo_args.oracle))
    if not args.no_plot:
        for plot_path in plot(rows, args.output_dir):
            print(f"Plot: {plot_path}")
    print(f"Results: {path}")
    failed = [row for row in rows if row.get("error")]
    if failed:
        names = ", ".join(f"{row['budget']}/{row['row']}" for row in failed)
        print(f"{len(failed)} row(s) failed: {names}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
