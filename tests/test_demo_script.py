"""The example scripts end to end on a tiny model: the demo that `make demo` runs, shortened so that CI can afford it,
and the training script."""

import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What both scripts train here: two steps of one round each, a few short samples
TINY_RUN = [
    "--use_cpu", "True",
    "--max_steps", "2",
    "--steps_per_round", "1",
    "--per_device_train_batch_size", "2",
    "--max_length", "64",
    "--prompts_per_round", "4",
    "--num_generations", "2",
    "--max_completion_length", "4",
    "--nado_batch_size", "4",
]  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_demo_script_trains_evaluates_and_reports(tiny_llama_path, tmp_path):
    output_dir = tmp_path / "demo"
    command = [
        sys.executable,
        os.path.join(ROOT, "examples", "run_demo.py"),
        "--model_name_or_path", tiny_llama_path,
        "--output_dir", str(output_dir),
        *TINY_RUN,
        "--logging_steps", "1",
        "--num_train", "60",
        "--num_heldout", "4",
        "--num_eval_prompts", "4",
        "--eval_num_samples", "2",
        "--eval_max_new_tokens", "4",
        "--disable_tqdm", "True",
        "--cadet_lambda", "2.5",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    reports = json.loads((output_dir / "report.json").read_text())
    assert [r["label"] for r in reports] == ["base", "sft", "cadet"]
    assert [r.get("lambda") for r in reports] == [None, 0.0, 2.5]  # the flag reaches the trainer
    for report in reports:
        assert set(report["toxicity"]) == {"jigsaw", "profanity"}
        for scores in report["toxicity"].values():
            assert 0.0 <= scores["expected_max_toxicity"] <= 1.0
        assert report["perplexity"] > 1.0
    assert (output_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output_dir / "nado" / "config.json").is_file()  # the NADO model travels with the saved LM
    assert (output_dir / "adapter_config.json").is_file()  # LoRA by default
    assert (output_dir / "sft" / "adapter_config.json").is_file()  # the baseline is kept, to be judged again
    for report in reports:  # fluency of the samples beside their toxicity
        assert report["fluency"]["generation_perplexity"] > 1.0 and 0.0 < report["fluency"]["distinct_1"] <= 1.0
    table = result.stdout.splitlines()
    header = next(line for line in table if line.startswith("model"))
    assert "EMT[jigsaw]" in header and "EMT[profanity]" in header and "ppl" in header and "gen. ppl" in header
    assert [line.split()[0] for line in table if line.split()[:1] in (["base"], ["sft"], ["cadet"])][:2] == [
        "base",
        "sft",
    ]  # each model's figures are printed as soon as they are measured, before the final table
    assert any(line.startswith("cadet") for line in table)
    assert f"Plain SFT baseline: {output_dir / 'sft'}" in result.stdout  # the run says where everything went
    card = (output_dir / "README.md").read_text()  # the CADET model card, not PEFT's blank template, with the figures
    assert "## CADET" in card and "## Evaluation (this run)" in card and "[More Information Needed]" not in card


def test_training_script_trains_and_saves_without_the_comparison(tiny_llama_path, tmp_path):
    """`examples/cadet_llama.py`, TRL's script shape: train, save the LM with its NADO model; nothing evaluated."""
    output_dir = tmp_path / "cadet"
    command = [
        sys.executable,
        os.path.join(ROOT, "examples", "cadet_llama.py"),
        "--model_name_or_path", tiny_llama_path,
        "--output_dir", str(output_dir),
        *TINY_RUN,
        "--nado_corpus_samples", "4",
        "--report_to", "none",
        "--disable_tqdm", "True",
        "--use_peft",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (output_dir / "adapter_config.json").is_file() and (output_dir / "nado" / "config.json").is_file()
    assert not (output_dir / "report.json").exists() and not (output_dir / "sft").exists()
    assert f"Model saved to {output_dir}." in result.stdout


def test_the_qlora_recipe_parses_with_the_demo_parser(monkeypatch):
    """Every key of the shipped Llama-2-7B recipe is an option of the script, and `--config` values reach the configs
    (the GPU run itself is not part of CI; `--bf16 False --use_cpu True` only let the config validate on a CPU)."""
    from run_demo import make_parser

    recipe = os.path.join(ROOT, "examples", "recipes", "llama2_7b_qlora.yaml")
    args = ["--config", recipe, "--bf16", "False", "--use_cpu", "True", "--nado_epochs", "3"]
    demo_args, training_args, model_args = make_parser().parse_args_and_config(args=args)
    assert model_args.model_name_or_path == "meta-llama/Llama-2-7b-chat-hf"
    assert model_args.load_in_4bit and model_args.use_peft and model_args.lora_target_modules == "all-linear"
    assert demo_args.oracle == "detoxify" and demo_args.eval_num_samples == 25
    assert training_args.max_steps == 600 and training_args.cadet_lambda == 1.0 and training_args.warmup_steps == 0.03
    assert training_args.nado_epochs == 3  # the command line overrides the recipe


def test_the_shipped_accelerate_configs_load():
    """accelerate reads every config in `examples/accelerate_configs/` (it refuses unknown keys) as the launch it
    names."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    folder = os.path.join(ROOT, "examples", "accelerate_configs")
    expected = {
        "cpu_2proc.yaml": DistributedType.MULTI_CPU,
        "single_gpu.yaml": DistributedType.NO,
        "multi_gpu.yaml": DistributedType.MULTI_GPU,
        "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
        "deepspeed_zero3.yaml": DistributedType.DEEPSPEED,
        "fsdp.yaml": DistributedType.FSDP,
    }
    assert sorted(os.listdir(folder)) == sorted(expected)
    for name, distributed_type in expected.items():
        config = ClusterConfig.from_yaml_file(os.path.join(folder, name))
        assert config.distributed_type == distributed_type, name
    zero3 = ClusterConfig.from_yaml_file(os.path.join(folder, "deepspeed_zero3.yaml"))
    assert zero3.deepspeed_config["zero_stage"] == 3
