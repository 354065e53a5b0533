"""The budget planning of `quality.py`: what each (budget, row) runs, by the rules of its docstring.

`plan_runs` is a pure function of the sizes in `PlanInputs`; the one input that needs the oracle, CADET's calls on its
corpus completions, is computed first by `corpus_oracle_calls`.
"""

import json
import math
from dataclasses import dataclass


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
BUDGETS = ("steps", "oracle_calls")


@dataclass(frozen=True)
class PlanInputs:
    """What the plan depends on: the demo's training sizes, the corpus's sizes and the benchmark's options."""

    max_steps: int
    steps_per_round: int
    prompts_per_round: int
    num_generations: int
    per_device_train_batch_size: int
    num_oracle_prompts: int  # the corpus's oracle-phase prompts
    num_train: int  # the corpus's training conversations
    corpus_calls: int  # CADET's calls on its corpus completions at the first phase (`corpus_oracle_calls`)
    rollouts_per_round: int  # and its rollouts of the unsatisfied ones, each round
    grpo_num_generations: int
    dpo_num_samples: int
    oracle_calls: int | None = None  # B of the oracle-call budget; CADET's calls under the step budget when None
    lambdas: tuple[tuple[float, ...], ...] | None = None  # `--lambdas`: (λ,) or (λ, min_p) per `cadet` run


def plan_runs(inputs: PlanInputs, rows: list[str], budgets: list[str]) -> tuple[list[dict], list[dict], dict]:
    """What each (budget, row) runs, by the rules of the module docstring of `quality.py`; identical runs are run once.

    Returns:
        `(runs, entries, summary)`: the runs to make (`run_id`, `row`, `plan`), one entry per (budget, row) of the
        table (`budget`, `row`, `run_id`, `plan`), and the sizes the plan was made from.
    """
    steps = inputs.max_steps
    num_prompts = inputs.num_oracle_prompts
    num_train = inputs.num_train
    rounds = math.ceil(steps / inputs.steps_per_round)
    cadet_sampling = {
        "rounds": rounds,
        "prompts_per_round": min(inputs.prompts_per_round, num_prompts),
        "num_generations": inputs.num_generations,
    }
    # the oracle phases' samples, and the corpus completions labelled once for the NADO model, with the bisection and
    # the per-round rollouts of the unsatisfied ones
    fixed_calls = inputs.corpus_calls + rounds * inputs.rollouts_per_round
    cadet_calls = rounds * cadet_sampling["prompts_per_round"] * cadet_sampling["num_generations"] + fixed_calls
    budget_calls = inputs.oracle_calls if inputs.oracle_calls is not None else cadet_calls
    cadet_rows = any(row.startswith("cadet") for row in rows)
    if "oracle_calls" in budgets and cadet_rows and budget_calls < fixed_calls + rounds:
        raise ValueError(
            f"--oracle_calls {budget_calls} leaves CADET no sample to label: its calls on the corpus completions "
            f"alone are {fixed_calls} (the corpus scoring of `filter_corpus`, the NADO model's labelled corpus "
            f"completions and their rollouts), and each of its {rounds} rounds needs at least one. Give at least "
            f"{fixed_calls + rounds}, or lower those calls (`--filter_corpus false`, `--nado_corpus_samples`)."
        )
    group = inputs.grpo_num_generations
    grpo_batch = math.ceil(inputs.per_device_train_batch_size / group) * group
    k = inputs.dpo_num_samples

    def sampling_for(calls: int) -> dict:
        per_round = max(1, calls // rounds)
        generations = min(per_round, max(inputs.num_generations, math.ceil(per_round / num_prompts)))
        return {
            "rounds": rounds,
            "prompts_per_round": max(1, per_round // generations),
            "num_generations": generations,
        }

    plans = {}
    for budget in budgets:
        if budget == "steps":
            sampling = decoding = cadet_sampling
            filtered = {"max_steps": steps, "label_examples": num_train}
            grpo = {"max_steps": steps, "batch_size": grpo_batch, "num_generations": group}
            dpo = {"max_steps": steps, "num_prompts": num_prompts, "num_samples": k}
        else:
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
            if row == "cadet" and inputs.lambdas:
                variants = []
                for lam, *min_p in inputs.lambdas:
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


def corpus_oracle_calls(corpus, tokenizer, config, oracle_name: str) -> tuple[int, int]:
    """CADET's oracle calls on its corpus completions: `(once, per_round)`, the scoring of every completion before
    training (`filter_corpus`), the labelling and the bisection of the unsatisfied ones at the first phase, and one
    rollout of each unsatisfied one per round (`nado_corpus_rollouts`). Computed as the trainer computes them, with the
    training oracle (deterministic, as the demo's are)."""
    from trl_cadet.data_utils import extract_completions, row_completions
    from trl_cadet.oracle_phase import first_violations, label_samples
    from trl_cadet.oracles import load_oracle

    completions = extract_completions(
        corpus["train"],
        tokenizer,
        config.nado_corpus_samples,
        config.max_completion_length,
        config.corpus_prompt_length,
        config.dataset_text_field,
        seed=config.seed,
    )
    filtering = 0
    if config.filter_corpus:
        filtering = sum(len(row_completions(example, config.dataset_text_field)) for example in corpus["train"])
    if not config.nado_corpus_rollouts or not completions.prompts:
        return filtering + len(completions.prompts), 0
    oracles = [load_oracle(oracle_name)]
    labelling = label_samples(
        oracles,
        completions.prompts,
        completions.prompt_ids,
        completions.completion_ids,
        tokenizer,
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
        tokenizer,
        threshold=config.oracle_threshold,
    )
    rollouts = sum(length is not None for length in lengths)
    return filtering + len(completions.prompts) + bisection_calls, rollouts
