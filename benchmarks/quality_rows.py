"""The rows of `quality.py`: the shared set-up, one function per row, and one row run and evaluated in a process of
its own.

A row function takes the set-up, its plan (from `quality_plan.plan_runs`), the counting training oracle and its output
folder, and returns `(model, trainer, info)`: the model to evaluate, the trainer whose steps are counted (`None` when
nothing is trained) and what else the row reports.
"""

import dataclasses
import json
import os
import random
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from round_cost import demo_module, tiny_model_path


if TYPE_CHECKING:
    from datasets import DatasetDict
    from peft import PeftConfig
    from run_demo import DemoArguments
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase, Trainer
    from trl import ModelConfig

    from trl_cadet import CADETConfig


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


# The shared set-up: configurations, model, corpus, judges


@dataclasses.dataclass
class Setup:
    """What every row shares, built once per process by `build_setup`."""

    options: dict[str, Any]  # the benchmark's own options (`quality.py`'s flags)
    passthrough: list[str]  # the other flags: options of the demo's parser
    demo: ModuleType  # examples/run_demo.py
    demo_args: "DemoArguments"
    config: "CADETConfig"  # the demo's, with the benchmark's defaults
    model_args: "ModelConfig"
    model_path: str
    model_init_kwargs: dict[str, Any]
    tokenizer: "PreTrainedTokenizerBase"
    corpus: "DatasetDict"
    judges: dict[str, Callable]
    peft_config: "PeftConfig | None"
    quantization_config: "BitsAndBytesConfig | None"

    def configs(self, **overrides) -> tuple["DemoArguments", "CADETConfig", "ModelConfig"]:
        """(DemoArguments, CADETConfig, ModelConfig) as the demo's parser makes them, with `overrides` as defaults."""
        return demo_configs(self.demo, self.options, self.passthrough, **overrides)


def base_defaults(options: dict) -> dict:
    defaults = dict(TINY_DEFAULTS) if options["model"] == "tiny" else {}
    defaults.update(save_strategy="no", report_to="none", push_to_hub=False)
    defaults["output_dir"] = os.path.join(options["output_dir"], "runs")
    for name in ("max_steps", "seed"):
        if options[name] is not None:
            defaults[name] = options[name]
    return defaults


def demo_configs(demo: ModuleType, options: dict, passthrough: list[str], **overrides):
    parser = demo.make_parser()
    parser.set_defaults(**{**base_defaults(options), **overrides})
    return parser.parse_args_into_dataclasses(args=list(passthrough), look_for_args_file=False)


def build_setup(options: dict, passthrough: list[str]) -> Setup:
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_cadet.oracles import load_oracle

    demo = demo_module()
    demo_args, config, model_args = demo_configs(demo, options, passthrough)
    model_path = model_args.model_name_or_path
    if model_path is None:
        if options["model"] == "tiny":
            model_path = tiny_model_path(options["output_dir"])
        else:
            from demo import smollm2_path

            model_path = smollm2_path()
    corpus = demo.load_corpus(demo_args, config.seed)
    return Setup(
        options=options,
        passthrough=passthrough,
        demo=demo,
        demo_args=demo_args,
        config=config,
        model_args=model_args,
        model_path=model_path,
        # As the demo sets them for its trainers
        model_init_kwargs={
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            **(config.model_init_kwargs or {}),
        },
        tokenizer=AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision),
        corpus=corpus,
        judges={name: load_oracle(name) for name in demo_args.judges.split(",") if name},
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )


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


RowOutput = tuple["PreTrainedModel", "Trainer | None", dict | None]


def load_model(setup: Setup):
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(setup.model_init_kwargs)
    if setup.quantization_config is not None:
        kwargs["quantization_config"] = setup.quantization_config
    return create_model_from_path(setup.model_path, **kwargs)


def run_dir(setup: Setup, run_id: str) -> str:
    return os.path.join(setup.options["output_dir"], "runs", run_id)


def row_base(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    return load_model(setup), None, None


def _sft(setup: Setup, dataset, plan: dict, output_dir: str):
    from trl import SFTTrainer

    _, config, _ = setup.configs(max_steps=plan["max_steps"])
    config.model_init_kwargs = setup.model_init_kwargs
    trainer = SFTTrainer(
        model=setup.model_path,
        args=setup.demo.sft_config(config, output_dir),
        train_dataset=dataset,
        processing_class=setup.tokenizer,
        peft_config=setup.peft_config,
        quantization_config=setup.quantization_config,
    )
    trainer.train()
    return trainer


def row_sft(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    trainer = _sft(setup, setup.corpus["train"], plan, output_dir)
    return trainer.model, trainer, None


def row_filtered_sft(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    from trl_cadet.oracles import call_oracles

    config = setup.config
    corpus = setup.corpus["train"]
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
    trainer = _sft(setup, labelled.select(keep), plan, output_dir)
    return trainer.model, trainer, {"labelled_examples": len(labelled), "kept_examples": len(keep)}


def shared_training_args(config, **overrides) -> dict:
    return {**{name: getattr(config, name) for name in SHARED_TRAINING_FIELDS}, **overrides}


def row_grpo(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    from trl import GRPOConfig, GRPOTrainer

    config = setup.config
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
            model_init_kwargs=setup.model_init_kwargs,
        )
    )
    trainer = GRPOTrainer(
        model=setup.model_path,
        reward_funcs=oracle,
        args=args,
        train_dataset=setup.corpus["oracle"],
        processing_class=setup.tokenizer,
        peft_config=setup.peft_config,
        quantization_config=setup.quantization_config,
    )
    trainer.train()
    return trainer.model, trainer, None


def sample_and_score(model, setup: Setup, oracle, prompts: list, num_samples: int) -> list[list[tuple[float, str]]]:
    """`num_samples` completions of `model` for each prompt, sampled as in CADET's oracle phase, with their scores."""
    from trl_cadet.oracles import call_oracles
    from trl_cadet.sampling import as_completions, sample_completions, tokenize_prompts

    config, tokenizer = setup.config, setup.tokenizer
    completion_ids = sample_completions(
        model,
        tokenizer,
        tokenize_prompts(prompts, tokenizer),
        num_generations=num_samples,
        max_new_tokens=config.max_completion_length,
        temperature=config.temperature,
        top_p=config.top_p,
        batch_size=config.generation_batch_size,
        seed=config.seed,
    )
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    repeated = [prompt for prompt in prompts for _ in range(num_samples)]
    completions = as_completions(repeated, texts)
    scores = call_oracles([oracle], repeated, completions, max_retries=config.oracle_max_retries).scores
    return [
        [(scores[j], texts[j]) for j in range(i * num_samples, (i + 1) * num_samples) if scores[j] is not None]
        for i in range(len(prompts))
    ]


def row_dpo(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    from trl import DPOConfig, DPOTrainer

    from trl_cadet.sampling import as_completions

    config = setup.config
    prompts = setup.corpus["oracle"]["prompt"]
    chosen = sorted(random.Random(config.seed).sample(range(len(prompts)), min(plan["num_prompts"], len(prompts))))
    prompts = [prompts[i] for i in chosen]
    model = load_model(setup)
    scored = sample_and_score(model, setup, oracle, prompts, plan["num_samples"])
    pairs = []
    for prompt, samples in zip(prompts, scored, strict=True):
        if len(samples) < 2:
            continue
        best, worst = max(samples, key=lambda s: s[0]), min(samples, key=lambda s: s[0])
        if best[0] > worst[0]:
            better, worse = as_completions([prompt, prompt], [best[1], worst[1]])
            pairs.append({"prompt": prompt, "chosen": better, "rejected": worse})
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
        processing_class=setup.tokenizer,
        peft_config=setup.peft_config,
    )
    trainer.train()
    return trainer.model, trainer, {"pairs": len(pairs), "sampled_prompts": len(prompts)}


def round_prompts(seed: int, round_index: int, count: int, num_prompts: int) -> list[int]:
    """The prompts of a CADET round, drawn as `CADETTrainer._round_prompts` draws them in a single process."""
    return random.Random(seed * 1_000_003 + round_index).sample(range(num_prompts), min(count, num_prompts))


def row_nado_decoding(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    import torch

    from trl_cadet import NADOModel
    from trl_cadet.decoding import NADOLogitsProcessor
    from trl_cadet.oracle_phase import run_oracle_phase
    from trl_cadet.sampling import tokenize_prompts

    _, config, _ = setup.configs(prompts_per_round=plan["prompts_per_round"], num_generations=plan["num_generations"])
    model = load_model(setup)
    model.requires_grad_(False)
    nado = NADOModel.from_lm(model, num_layers=config.nado_num_layers, hidden_state_layer=-1)
    nado = nado.to(device=model.device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(nado.parameters(), lr=config.nado_learning_rate)
    prompts = setup.corpus["oracle"]["prompt"]
    prompt_ids = tokenize_prompts(prompts, setup.tokenizer)
    metrics = []
    for round_index in range(plan["rounds"]):
        index = round_prompts(config.seed, round_index, config.prompts_per_round, len(prompts))
        result = run_oracle_phase(
            model,
            nado,
            optimizer,
            setup.tokenizer,
            [oracle],
            [prompts[i] for i in index],
            [prompt_ids[i] for i in index],
            config,
            round_index,
        )
        metrics.append({k: v for k, v in result.metrics.items() if not k.startswith("time/")})
    return model, None, {"oracle_phases": metrics, "logits_processor": NADOLogitsProcessor(model, nado)}


def _cadet(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str, **schedule) -> RowOutput:
    from trl_cadet import CADETTrainer

    sampling = {k: plan[k] for k in ("max_steps", "prompts_per_round", "num_generations")}
    _, config, _ = setup.configs(output_dir=output_dir, **sampling, **schedule)
    config.model_init_kwargs = setup.model_init_kwargs
    trainer = CADETTrainer(
        model=setup.model_path,
        oracle_funcs=oracle,
        args=config,
        train_dataset=setup.corpus["train"],
        prompt_dataset=setup.corpus["oracle"],
        processing_class=setup.tokenizer,
        peft_config=setup.peft_config,
        quantization_config=setup.quantization_config,
    )
    trainer.train()
    info = {"cadet_oracle_calls": trainer.oracle_calls, "final_lambda": trainer.cadet_lambda}
    return trainer.model, trainer, info


def row_cadet(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    return _cadet(
        setup, plan, oracle, output_dir, **{k: plan[k] for k in ("cadet_lambda", "cadet_min_p") if k in plan}
    )


def row_cadet_parallel(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    return _cadet(setup, plan, oracle, output_dir, round_schedule=plan["round_schedule"])


def row_cadet_adaptive(setup: Setup, plan: dict, oracle: CountingOracle, output_dir: str) -> RowOutput:
    return _cadet(setup, plan, oracle, output_dir, lambda_schedule=plan["lambda_schedule"])


ROW_FUNCTIONS: dict[str, Callable[[Setup, dict, CountingOracle, str], RowOutput]] = {
    "base": row_base,
    "sft": row_sft,
    "filtered_sft": row_filtered_sft,
    "grpo": row_grpo,
    "dpo": row_dpo,
    "nado_decoding": row_nado_decoding,
    "cadet": row_cadet,
    "cadet_parallel": row_cadet_parallel,
    "cadet_adaptive": row_cadet_adaptive,
}


# One row in one process


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def run_row(setup: Setup, run: dict) -> dict:
    import torch

    from trl_cadet.evaluation import evaluate_model, perplexity
    from trl_cadet.oracles import load_oracle

    if setup.options["threads"]:
        torch.set_num_threads(setup.options["threads"])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    demo_args = setup.demo_args
    oracle = CountingOracle(load_oracle(demo_args.oracle), demo_args.oracle)
    output_dir = run_dir(setup, run["run_id"])

    start = time.perf_counter()
    model, trainer, info = ROW_FUNCTIONS[run["row"]](setup, run["plan"], oracle, output_dir)
    method_s = time.perf_counter() - start
    info = dict(info or {})
    processor = info.pop("logits_processor", None)
    if setup.options.get("save_models"):
        model.save_pretrained(os.path.join(output_dir, "model"))

    start = time.perf_counter()
    model.eval()
    fluency_model = load_model(setup).eval()  # the base model scores every row's samples for fluency
    max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 512
    report = evaluate_model(
        model,
        setup.tokenizer,
        prompts=setup.corpus["eval"]["prompt"][: demo_args.num_eval_prompts],
        judges=setup.judges,
        texts=setup.corpus["heldout"]["messages"],
        num_samples=demo_args.eval_num_samples,
        max_new_tokens=demo_args.eval_max_new_tokens,
        seed=demo_args.eval_seed,
        max_length=min(512, max_positions),
        logits_processor=processor,
        model_name_or_path=f"{run['row']} ({setup.model_path})",
        fluency_model=fluency_model,
        save_samples=setup.options.get("save_samples", False),
        show_progress=False,
    )
    if "useful" in setup.corpus:
        report["useful_perplexity"] = perplexity(
            model, setup.tokenizer, setup.corpus["useful"]["messages"], show_progress=False
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
        result = run_row(build_setup(options, passthrough), run)
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
