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
`benchmarks/tiny_llama.py` and a small corpus (`TINY_DEFAULTS`); the demo's `--model_name_or_path` swaps in any other.

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
  `CADETTrainer`.

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
"""

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import sys
import threading
import time
import traceback
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from round_cost import demo_module, tiny_model_path  # noqa: E402


ROOT = Path(__file__).resolve().parent.parent
ROWS = (
    "base",
    "sft",
    "filtered_sft",
    "grpo",
    "dpo",
    "nado_decoding",
    "cadet",
    "cadet_parallel",
    "cadet_adaptive",
)
LM_TRAINED_ROWS = {"sft", "filtered_sft", "grpo", "dpo", "cadet", "cadet_parallel", "cadet_adaptive"}
BUDGETS = ("steps", "oracle_calls")

# Demo options for `--model tiny`, a smoke test: the tiny Llama, a few steps and samples, short completions
TINY_DEFAULTS = {
    "num_train": 24,
    "num_heldout": 8,
    "num_oracle_prompts": 8,
    "num_eval_prompts": 8,
    "eval_num_samples": 2,
    "eval_max_new_tokens": 16,
    "max_steps": 4,
    "steps_per_round": 2,
    "per_device_train_batch_size": 4,
    "max_length": 96,
    "logging_steps": 2,
    "prompts_per_round": 4,
    "num_generations": 2,
    "max_completion_length": 16,
    "generation_batch_size": 8,
    "nado_epochs": 1,
    "nado_batch_size": 8,
    "nado_corpus_samples": 8,
    "disable_tqdm": True,
}

# Training hyperparameters that GRPO and DPO take from the demo's configuration; the rest keep TRL's defaults for
# those trainers (e.g. `remove_unused_columns`, which GRPO needs off)
SHARED_TRAINING_FIELDS = (
    "seed",
    "data_seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "use_cpu",
    "logging_steps",
    "save_strategy",
    "report_to",
    "disable_tqdm",
)


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


# The shared set-up: configurations, model, corpus, judges


@dataclasses.dataclass
class Context:
    options: dict
    passthrough: list
    demo: object  # examples/run_demo.py
    demo_args: object = None
    config: object = None  # the demo's CADETConfig, with the benchmark's defaults
    model_args: object = None
    model_path: str | None = None
    model_init_kwargs: dict | None = None
    tokenizer: object = None
    corpus: object = None
    judges: dict | None = None
    peft_config: object = None
    quantization_config: object = None

    def configs(self, **overrides):
        """(DemoArguments, CADETConfig, ModelConfig) as the demo's parser makes them, with `overrides` as defaults."""
        parser = self.demo.make_parser()
        parser.set_defaults(**{**base_defaults(self.options), **overrides})
        return parser.parse_args_into_dataclasses(args=list(self.passthrough), look_for_args_file=False)


def base_defaults(options: dict) -> dict:
    defaults = dict(TINY_DEFAULTS) if options["model"] == "tiny" else {}
    defaults.update(save_strategy="no", report_to="none", push_to_hub=False)
    defaults["output_dir"] = os.path.join(options["output_dir"], "runs")
    for name in ("max_steps", "seed"):
        if options[name] is not None:
            defaults[name] = options[name]
    return defaults


_CONTEXT: Context | None = None


def get_context(options: dict, passthrough: list[str]) -> Context:
    """Build the set-up once per process."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_cadet.oracles import load_oracle

    demo = demo_module()
    context = Context(options, passthrough, demo)
    demo_args, config, model_args = context.configs()
    model_path = model_args.model_name_or_path
    if model_path is None:
        if options["model"] == "tiny":
            model_path = tiny_model_path(options["output_dir"])
        else:
            from demo import smollm2_path

            model_path = smollm2_path()
    corpus = demo.load_corpus(demo_args, config.seed)
    context.demo_args, context.config, context.model_args = demo_args, config, model_args
    context.model_path = model_path
    # As the demo sets them for its trainers
    context.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(config.model_init_kwargs or {}),
    }
    context.tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    context.corpus = corpus
    context.judges = {name: load_oracle(name) for name in demo_args.judges.split(",") if name}
    context.peft_config = get_peft_config(model_args)
    context.quantization_config = get_quantization_config(model_args)
    _CONTEXT = context
    return context


# Budgets


def corpus_oracle_calls(context: Context) -> tuple[int, int]:
    """CADET's oracle calls on its corpus completions: `(once, per_round)`, the labelling and the bisection of the
    unsatisfied ones at the first phase, and one rollout of each unsatisfied one per round (`nado_corpus_rollouts`).
    Computed as the trainer computes them, with the training oracle (deterministic, as the demo's are)."""
    from trl_cadet.data_utils import extract_completions
    from trl_cadet.oracle_phase import first_violations, label_samples
    from trl_cadet.oracles import load_oracle

    config = context.config
    completions = extract_completions(
        context.corpus["train"],
        context.tokenizer,
        config.nado_corpus_samples,
        config.max_completion_length,
        config.corpus_prompt_length,
        config.dataset_text_field,
        seed=config.seed,
    )
    if not config.nado_corpus_rollouts or not completions.prompts:
        return len(completions.prompts), 0
    oracles = [load_oracle(context.demo_args.oracle)]
    labelling = label_samples(
        oracles,
        completions.prompts,
        completions.prompt_ids,
        completions.completion_ids,
        context.tokenizer,
        num_generations=1,
        oracle_weights=None,
        labels=config.oracle_labels,
        threshold=config.oracle_threshold,
        max_retries=0,
    )
    unsatisfied = [
        i for i, score in zip(labelling.kept, labelling.samples.scores, strict=True) if score < config.oracle_threshold
    ]
    lengths, bisection_calls = first_violations(
        oracles,
        [completions.prompts[i] for i in unsatisfied],
        [completions.completion_ids[i] for i in unsatisfied],
        context.tokenizer,
        threshold=config.oracle_threshold,
    )
    rollouts = sum(length is not None for length in lengths)
    return len(completions.prompts) + bisection_calls, rollouts


def plan_runs(
    context: Context, rows: list[str], budgets: list[str], options: dict
) -> tuple[list[dict], list[dict], dict]:
    """What each (budget, row) runs, by the rules of the module docstring; identical runs are run once."""
    config = context.config
    num_prompts = len(context.corpus["oracle"])
    num_train = len(context.corpus["train"])
    steps = config.max_steps
    rounds = math.ceil(steps / config.steps_per_round)
    cadet_sampling = {
        "rounds": rounds,
        "prompts_per_round": min(config.prompts_per_round, num_prompts),
        "num_generations": config.num_generations,
    }
    # the oracle phases' samples, and the corpus completions labelled once for the NADO model, with the bisection and
    # the per-round rollouts of the unsatisfied ones (found here as the trainer will find them)
    corpus_calls, rollouts_per_round = corpus_oracle_calls(context)
    fixed_calls = corpus_calls + rounds * rollouts_per_round
    cadet_calls = rounds * cadet_sampling["prompts_per_round"] * cadet_sampling["num_generations"] + fixed_calls
    budget_calls = options["oracle_calls"] if options["oracle_calls"] is not None else cadet_calls
    group = options["grpo_num_generations"]
    grpo_batch = math.ceil(config.per_device_train_batch_size / group) * group
    k = options["dpo_num_samples"]

    plans = {}
    for budget in budgets:
        if budget == "steps":
            sampling = decoding = cadet_sampling
            filtered = {"max_steps": steps, "label_examples": num_train}
            grpo = {"max_steps": steps, "batch_size": grpo_batch, "num_generations": group}
            dpo = {"max_steps": steps, "num_prompts": num_prompts, "num_samples": k}
        else:

            def sampling_for(calls: int) -> dict:
                per_round = max(1, calls // rounds)
                generations = min(per_round, max(config.num_generations, math.ceil(per_round / num_prompts)))
                return {
                    "rounds": rounds,
                    "prompts_per_round": max(1, per_round // generations),
                    "num_generations": generations,
                }

            sampling = sampling_for(budget_calls - fixed_calls)  # CADET's corpus calls come first
            decoding = sampling_for(budget_calls)
            filtered = {"max_steps": steps, "label_examples": min(budget_calls, num_train)}
            grpo = {
                "max_steps": max(1, budget_calls // grpo_batch),
                "batch_size": grpo_batch,
                "num_generations": group,
            }
            dpo_k = max(k, math.ceil(budget_calls / num_prompts))
            dpo = {"max_steps": steps, "num_prompts": max(1, budget_calls // dpo_k), "num_samples": dpo_k}
        plans[budget] = {
            "base": {},
            "sft": {"max_steps": steps},
            "filtered_sft": filtered,
            "grpo": grpo,
            "dpo": dpo,
            "nado_decoding": dict(decoding),
            "cadet": {"max_steps": steps, **sampling},
            "cadet_parallel": {"max_steps": steps, **sampling, "round_schedule": "parallel"},
            "cadet_adaptive": {"max_steps": steps, **sampling, "lambda_schedule": "adaptive"},
        }

    runs, entries = {}, []
    for budget in budgets:
        for row in rows:
            variants = [(row, plans[budget][row])]
            if row == "cadet" and options.get("lambdas"):
                variants = []
                for lam, *min_p in options["lambdas"]:
                    plan = {**plans[budget][row], "cadet_lambda": lam}
                    if min_p:
                        plan["cadet_min_p"] = min_p[0]
                    variants.append((f"cadet λ={lam:g}" + (f", min-p {min_p[0]:g}" if min_p else ""), plan))
            for label, plan in variants:
                key = json.dumps([row, plan], sort_keys=True)
                if key not in runs:
                    run_id = f"{budget}-{label}".replace(" λ=", "-lambda").replace(", min-p ", "-minp")
                    runs[key] = {"run_id": run_id, "row": row, "plan": plan}
                entries.append({"budget": budget, "row": label, "run_id": runs[key]["run_id"], "plan": plan})
    summary = {
        "max_steps": steps,
        "rounds": rounds,
        "num_oracle_prompts": num_prompts,
        "num_train": num_train,
        "cadet_oracle_calls_under_step_budget": cadet_calls,
        "oracle_call_budget": budget_calls if "oracle_calls" in budgets else None,
        "grpo_batch_size": grpo_batch,
        "grpo_num_generations": group,
        "dpo_num_samples": k,
    }
    return list(runs.values()), entries, summary


# The rows


class CountingOracle:
    """The training oracle, counting the completions it scores (its calls, in every row's currency)."""

    def __init__(self, oracle, name: str):
        self.oracle = oracle
        self.__name__ = name
        self.calls = 0
        self._lock = threading.Lock()  # the parallel schedule labels in a background thread

    def __call__(self, prompts, completions, **kwargs):
        scores = self.oracle(prompts=prompts, completions=completions, **kwargs)
        with self._lock:
            self.calls += len(completions)
        return scores


def load_model(context: Context):
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(context.model_init_kwargs)
    if context.quantization_config is not None:
        kwargs["quantization_config"] = context.quantization_config
    return create_model_from_path(context.model_path, **kwargs)


def run_dir(context: Context, run_id: str) -> str:
    return os.path.join(context.options["output_dir"], "runs", run_id)


def row_base(context, plan, oracle, output_dir):
    return load_model(context), None, None


def _sft(context, dataset, plan, output_dir):
    from trl import SFTTrainer

    _, config, _ = context.configs(max_steps=plan["max_steps"])
    config.model_init_kwargs = context.model_init_kwargs
    trainer = SFTTrainer(
        model=context.model_path,
        args=context.demo.sft_config(config, output_dir),
        train_dataset=dataset,
        processing_class=context.tokenizer,
        peft_config=context.peft_config,
        quantization_config=context.quantization_config,
    )
    trainer.train()
    return trainer


def row_sft(context, plan, oracle, output_dir):
    trainer = _sft(context, context.corpus["train"], plan, output_dir)
    return trainer.model, trainer, None


def row_filtered_sft(context, plan, oracle, output_dir):
    from trl_cadet.oracles import call_oracles

    config = context.config
    corpus = context.corpus["train"]
    order = list(range(len(corpus)))
    random.Random(config.seed).shuffle(order)
    labelled = corpus.select(sorted(order[: plan["label_examples"]]))  # corpus order: with no drop, this is `sft`
    scores = []
    for start in range(0, len(labelled), 256):
        conversations = labelled[start : start + 256]["messages"]
        result = call_oracles(
            [oracle],
            [messages[:-1] for messages in conversations],
            [messages[-1:] for messages in conversations],
            max_retries=config.oracle_max_retries,
        )
        scores.extend(result.scores)
    # CADET's hard-label rule; a sample with no verdict is kept
    keep = [i for i, score in enumerate(scores) if score is None or score >= config.oracle_threshold]
    if not keep:
        raise RuntimeError("The oracle labels every labelled corpus example unsatisfied; nothing is left to train on.")
    trainer = _sft(context, labelled.select(keep), plan, output_dir)
    return trainer.model, trainer, {"labelled_examples": len(labelled), "kept_examples": len(keep)}


def shared_training_args(config, **overrides) -> dict:
    return {**{name: getattr(config, name) for name in SHARED_TRAINING_FIELDS}, **overrides}


def row_grpo(context, plan, oracle, output_dir):
    from trl import GRPOConfig, GRPOTrainer

    config = context.config
    args = GRPOConfig(
        **shared_training_args(
            config,
            output_dir=output_dir,
            max_steps=plan["max_steps"],
            per_device_train_batch_size=plan["batch_size"],  # completions per step
            num_generations=plan["num_generations"],
            max_completion_length=config.max_completion_length,
            temperature=config.temperature,
            top_p=config.top_p,
            model_init_kwargs=context.model_init_kwargs,
        )
    )
    trainer = GRPOTrainer(
        model=context.model_path,
        reward_funcs=oracle,
        args=args,
        train_dataset=context.corpus["oracle"],
        processing_class=context.tokenizer,
        peft_config=context.peft_config,
        quantization_config=context.quantization_config,
    )
    trainer.train()
    return trainer.model, trainer, None


def sample_and_score(model, context, oracle, prompts: list, num_samples: int) -> list[list[tuple[float, str]]]:
    """`num_samples` completions of `model` for each prompt, sampled as in CADET's oracle phase, with their scores."""
    from trl_cadet.oracle_phase import sample_completions, tokenize_prompts
    from trl_cadet.oracles import call_oracles

    config, tokenizer = context.config, context.tokenizer
    completion_ids = sample_completions(
        model,
        tokenizer,
        tokenize_prompts(prompts, tokenizer),
        num_generations=num_samples,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.generation_batch_size,
        seed=config.seed,
    )
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    repeated = [prompt for prompt in prompts for _ in range(num_samples)]
    completions = [
        [{"role": "assistant", "content": t}] if isinstance(p, list) else t
        for p, t in zip(repeated, texts, strict=True)
    ]
    scores = call_oracles([oracle], repeated, completions, max_retries=config.oracle_max_retries).scores
    return [
        [(scores[j], texts[j]) for j in range(i * num_samples, (i + 1) * num_samples) if scores[j] is not None]
        for i in range(len(prompts))
    ]


def row_dpo(context, plan, oracle, output_dir):
    from trl import DPOConfig, DPOTrainer

    config = context.config
    prompts = context.corpus["oracle"]["prompt"]
    chosen = sorted(random.Random(config.seed).sample(range(len(prompts)), min(plan["num_prompts"], len(prompts))))
    prompts = [prompts[i] for i in chosen]
    model = load_model(context)
    scored = sample_and_score(model, context, oracle, prompts, plan["num_samples"])
    pairs = []
    for prompt, samples in zip(prompts, scored, strict=True):
        if len(samples) < 2:
            continue
        best, worst = max(samples, key=lambda s: s[0]), min(samples, key=lambda s: s[0])
        if best[0] > worst[0]:
            conversational = isinstance(prompt, list)
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": best[1]}] if conversational else best[1],
                    "rejected": [{"role": "assistant", "content": worst[1]}] if conversational else worst[1],
                }
            )
    if not pairs:
        raise RuntimeError("No prompt got two samples with different oracle scores, so there is no DPO pair.")
    from datasets import Dataset

    args = DPOConfig(
        **shared_training_args(
            config, output_dir=output_dir, max_steps=plan["max_steps"], max_length=config.max_length
        )
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=context.tokenizer,
        peft_config=context.peft_config,
    )
    trainer.train()
    return trainer.model, trainer, {"pairs": len(pairs), "sampled_prompts": len(prompts)}


def round_prompts(seed: int, round_index: int, count: int, num_prompts: int) -> list[int]:
    """The prompts of a CADET round, drawn as `CADETTrainer._round_prompts` draws them in a single process."""
    return random.Random(seed * 1_000_003 + round_index).sample(range(num_prompts), min(count, num_prompts))


def row_nado_decoding(context, plan, oracle, output_dir):
    import torch

    from trl_cadet import NADOModel
    from trl_cadet.decoding import NADOLogitsProcessor
    from trl_cadet.oracle_phase import run_oracle_phase, tokenize_prompts

    _, config, _ = context.configs(
        prompts_per_round=plan["prompts_per_round"], num_generations=plan["num_generations"]
    )
    model = load_model(context)
    model.requires_grad_(False)
    nado = NADOModel.from_lm(model, num_layers=config.nado_num_layers, hidden_state_layer=-1)
    nado = nado.to(device=model.device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(nado.parameters(), lr=config.nado_learning_rate)
    prompts = context.corpus["oracle"]["prompt"]
    prompt_ids = tokenize_prompts(prompts, context.tokenizer)
    metrics = []
    for round_index in range(plan["rounds"]):
        index = round_prompts(config.seed, round_index, config.prompts_per_round, len(prompts))
        result = run_oracle_phase(
            model,
            nado,
            optimizer,
            context.tokenizer,
            [oracle],
            [prompts[i] for i in index],
            [prompt_ids[i] for i in index],
            config,
            round_index,
        )
        metrics.append({k: v for k, v in result.metrics.items() if not k.startswith("time/")})
    return model, None, {"oracle_phases": metrics, "logits_processor": NADOLogitsProcessor(model, nado)}


def _cadet(context, plan, oracle, output_dir, **schedule):
    from trl_cadet import CADETTrainer

    sampling = {k: plan[k] for k in ("max_steps", "prompts_per_round", "num_generations")}
    _, config, _ = context.configs(output_dir=output_dir, **sampling, **schedule)
    config.model_init_kwargs = context.model_init_kwargs
    trainer = CADETTrainer(
        model=context.model_path,
        oracle_funcs=oracle,
        args=config,
        train_dataset=context.corpus["train"],
        prompt_dataset=context.corpus["oracle"],
        processing_class=context.tokenizer,
        peft_config=context.peft_config,
        quantization_config=context.quantization_config,
    )
    trainer.train()
    info = {"cadet_oracle_calls": trainer.oracle_calls, "final_lambda": trainer.cadet_lambda}
    return trainer.model, trainer, info


def row_cadet(context, plan, oracle, output_dir):
    return _cadet(
        context, plan, oracle, output_dir, **{k: plan[k] for k in ("cadet_lambda", "cadet_min_p") if k in plan}
    )


def row_cadet_parallel(context, plan, oracle, output_dir):
    return _cadet(context, plan, oracle, output_dir, round_schedule=plan["round_schedule"])


def row_cadet_adaptive(context, plan, oracle, output_dir):
    return _cadet(context, plan, oracle, output_dir, lambda_schedule=plan["lambda_schedule"])


ROW_FUNCTIONS = {row: globals()[f"row_{row}"] for row in ROWS}


# One row in one process


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def run_row(context: Context, run: dict) -> dict:
    import torch

    from trl_cadet.evaluation import evaluate_model, perplexity
    from trl_cadet.oracles import load_oracle

    if context.options["threads"]:
        torch.set_num_threads(context.options["threads"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    demo_args = context.demo_args
    oracle = CountingOracle(load_oracle(demo_args.oracle), demo_args.oracle)
    output_dir = run_dir(context, run["run_id"])

    start = time.perf_counter()
    model, trainer, info = ROW_FUNCTIONS[run["row"]](context, run["plan"], oracle, output_dir)
    method_s = time.perf_counter() - start
    info = dict(info or {})
    processor = info.pop("logits_processor", None)

    start = time.perf_counter()
    model.eval()
    fluency_model = load_model(context).eval()  # the base model scores every row's samples for fluency
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 512
    report = evaluate_model(
        model,
        context.tokenizer,
        prompts=context.corpus["eval"]["prompt"][: demo_args.num_eval_prompts],
        judges=context.judges,
        texts=context.corpus["heldout"]["messages"],
        num_samples=demo_args.eval_num_samples,
        max_new_tokens=demo_args.eval_max_new_tokens,
        seed=demo_args.eval_seed,
        max_length=min(512, max_positions),
        logits_processor=processor,
        model_name_or_path=f"{run['row']} ({context.model_path})",
        fluency_model=fluency_model,
        save_samples=context.options.get("save_samples", False),
        show_progress=False,
    )
    if "useful" in context.corpus:
        report["useful_perplexity"] = perplexity(
            model, context.tokenizer, context.corpus["useful"]["messages"], show_progress=False
        )
    eval_s = time.perf_counter() - start
    result = {
        "lm_steps": trainer.state.global_step if trainer is not None else 0,
        "oracle_calls": oracle.calls,
        "wall_clock_s": method_s,
        "eval_s": eval_s,
        "toxicity": {
            name: {key: m[key] for key in ("expected_max_toxicity", "toxicity_probability")}
            for name, m in report["toxicity"].items()
        },
        "perplexity": report["perplexity"],
        "useful_perplexity": report.get("useful_perplexity"),
        "fluency": report["fluency"],
        "info": info,
        "report": report,
    }
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _child(run: dict, result_path: str, options: dict, passthrough: list[str]) -> None:
    try:
        result = run_row(get_context(options, passthrough), run)
        result["error"] = None
    except BaseException as error:  # fail soft: the row records what went wrong and the run goes on
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    result["peak_rss_mib"] = peak_rss_mib()
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2, default=str)


# What the fork server imports once, so that each row skips importing them again (10+ s on a small CPU)
PRELOAD = ["torch", "transformers", "datasets", "peft", "trl", "trl_cadet", "trl_cadet.cadet_trainer"]


def start_method() -> str:
    """A fork server where there is one: it forks each row from a process that has imported the libraries but never
    run a torch operation, so neither a started OpenMP thread pool nor CUDA comes into the row."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    return "forkserver"


def run_in_process(run: dict, options: dict, passthrough: list[str], method: str) -> dict:
    import multiprocessing

    path = os.path.join(options["output_dir"], "runs", f"{run['run_id']}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    process = multiprocessing.get_context(method).Process(target=_child, args=(run, path, options, passthrough))
    process.start()
    process.join()
    if not os.path.exists(path):
        return {
            "error": f"The row's process exited with code {process.exitcode} without a result (killed? out of memory?)."
        }
    with open(path) as f:
        return json.load(f)


# Output


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
            {
                # a run with its own `cadet_min_p` is a point off the λ curve
                "label": row["row"],
                "lambda": None if "cadet_min_p" in row["plan"] else row["plan"].get("cadet_lambda"),
                "report": row["report"],
            }
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
        )
    }
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    method = start_method()
    try:
        context = get_context(options, passthrough)
    except ValueError as error:  # an option the demo's parser does not know, or a wrong value
        print(f"quality.py: error: {error}", file=sys.stderr)
        return 2
    runs, entries, summary = plan_runs(context, args.rows, args.budgets, options)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"Quality benchmark: {len(entries)} rows ({len(runs)} runs) on {context.model_path}, {device}; "
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
    config = context.config
    settings = {
        "model": args.model,
        "model_path": context.model_path,
        "device": device,
        "budgets": args.budgets,
        "rows": args.rows,
        "oracle": context.demo_args.oracle,
        "judges": list(context.judges),
        "start_method": method,
        **summary,
        "demo_args": dataclasses.asdict(context.demo_args),
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
        "peft": context.peft_config is not None,
        "passthrough": passthrough,
    }
    path = os.path.join(args.output_dir, "quality.json")
    with open(path, "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=2, default=str)

    print(f"\nCADET and the alternatives ({device}); * the training oracle\n")
    print(format_table(rows, list(context.judges), context.demo_args.oracle))
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
