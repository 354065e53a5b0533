"""Parallel against sequential rounds: the same CADET run under both schedules, its wall-clock per round and its
final quality.

Both runs are the demo's (`examples/run_demo.py`: its corpus from `build_detox_corpus`, conversational, with its
oracle-phase prompts; its `DEMO_DEFAULTS`, LoRA included; its seed), with the same model, prompts, seeds and number of
steps; only `round_schedule` differs. The default is the demo's: 30 steps in 3 rounds of 10. Any other option of the
demo can be added to the command line (e.g. `--cadet_lambda 2`).

Schedules (METHOD.md, "Rounds: sequential and parallel"): round k has an oracle phase O_k (sample, label, train the
NADO model) and a fine-tuning phase F_k. Sequential: O_k, then F_k with its NADO; a round costs O + F. Parallel:
O_k samples a snapshot of the policy in the background while F_k runs with the NADO of round k-1, so a round costs
max(O, F), when the two phases have a device each. Round 0 costs O + F under both schedules: before its first oracle
phase the parallel schedule has no NADO to fine-tune with, so it runs O_0 first.

"Two devices or processes available", here: `CADETTrainer` runs the parallel oracle phase in a background thread of
the training process, on `oracle_device` (default: the training device).
- On CPU (the 2 cores this benchmark was written on) the two devices are two cores. torch's intra-op thread count is
  per thread, and a new thread starts with the count last given to `torch.set_num_threads`; so `--threads 1` (the
  default) gives fine-tuning (the main thread) one core and the background oracle phase (its own thread) another: one
  core per phase. The sequential schedule runs on `--sequential_threads` cores (default: `--threads`), one device as
  in the paper's comparison; `--sequential_threads 2` gives it the whole machine instead, which is the comparison for
  someone deciding how to spend two cores.
- On GPUs: `--oracle_device cuda:1` puts the parallel schedule's policy snapshot and NADO training on a second GPU,
  while the sequential schedule uses the first only. Without it both phases share one GPU, and the parallel schedule
  gains only what the GPU's idle time allows.

Measured per schedule:
- `round_s`: wall-clock of each round, from the start of its first step to the start of the next round's (for the
  last round, to the return of `trainer.train()`, which waits for the parallel schedule's last oracle phase). In the
  parallel schedule the wait for O_{k-1} happens at the start of round k, so it is counted in round k.
- `logged_round_s`: the trainer's own `time/round` log, the same boundaries (the last round's is logged when training ends).
- `oracle_phase_s`, `finetune_phase_s`: the logged `time/oracle_phase` of each phase (a background phase runs as long
  as it takes beside fine-tuning) and `time/finetune_phase` (a round minus the time it held training up).
- `train_runtime`: Trainer's; it stops before `on_train_end`, so it leaves out the wait for the parallel schedule's
  last oracle phase, which `wall_clock_s` (around `trainer.train()`, set-up included) includes.
- Quality, as the demo evaluates: expected maximum toxicity and toxicity probability under the judges `jigsaw` and
  `profanity` on the held-out prompts, and perplexity on the held-out conversations (`evaluate_model`).
Then the speed-up sequential / parallel, per round and over all rounds (`rounds_total_s`, the sum of `round_s`).

The tiny Llama of the tests (`--models tiny`, a smoke test with `TINY_DEFAULTS`) emits byte soup that a toxicity
classifier always calls clean; it is trained with the `toy` oracle of `round_cost.py` and judged by the real judges.

    python benchmarks/schedules.py --models smollm2                 # SmolLM2-135M (offline), 4 rounds of 10 steps
    python benchmarks/schedules.py --models tiny --json out.json     # a smoke test, under a minute
    python benchmarks/schedules.py --models smollm2 --sequential_threads 2
    python benchmarks/schedules.py --models smollm2 --oracle_device cuda:1   # two GPUs
    python benchmarks/schedules.py --models smollm2 --dry_run       # build both trainers, train nothing
"""

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_rows import TINY_DEFAULTS as QUALITY_TINY_DEFAULTS  # noqa: E402
from round_cost import demo_module, load_training_oracle, tiny_model_path  # noqa: E402


ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = ("sequential", "parallel")
JUDGES = ("jigsaw", "profanity")

# The demo's rounds of 10 steps, stated here so that the benchmark keeps them if the demo changes
SMOLLM2_DEFAULTS = {"steps_per_round": 10}
# A smoke test on the tiny Llama: the quality benchmark's options for it (`--model tiny`), with shorter samples
TINY_DEFAULTS = {**QUALITY_TINY_DEFAULTS, "eval_max_new_tokens": 8, "max_completion_length": 8}
# Flags of this script that set an option of the demo (DemoArguments or CADETConfig)
DEMO_FLAGS = (
    "max_steps",
    "steps_per_round",
    "prompts_per_round",
    "num_generations",
    "max_completion_length",
    "generation_batch_size",
    "nado_epochs",
    "nado_batch_size",
    "num_oracle_prompts",
    "num_eval_prompts",
    "eval_num_samples",
    "eval_max_new_tokens",
)


def make_round_clock(steps_per_round: int):
    from transformers import TrainerCallback

    class RoundClock(TrainerCallback):
        """The time at which each round's first step starts (`CADETTrainer` begins a round inside that step)."""

        def __init__(self):
            self.starts: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % steps_per_round == 0:
                self.starts.append(time.perf_counter())

    return RoundClock()


def configs(demo, model_name: str, args, passthrough: list[str], schedule: str, output_dir: str):
    """(DemoArguments, CADETConfig, ModelConfig) as the demo's parser makes them, for one schedule."""
    defaults = dict(TINY_DEFAULTS if model_name == "tiny" else SMOLLM2_DEFAULTS)
    defaults.update({name: getattr(args, name) for name in DEMO_FLAGS if getattr(args, name) is not None})
    defaults.update(
        output_dir=output_dir,
        round_schedule=schedule,
        oracle_device=args.oracle_device if schedule == "parallel" else None,
        logging_steps=1,  # one `time/round` per log, whatever `steps_per_round`
        save_strategy="no",
        report_to="none",
        push_to_hub=False,
        disable_tqdm=True,
    )
    parser = demo.make_parser()
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=list(passthrough), look_for_args_file=False)


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def run_schedule(context: dict, schedule: str, args) -> dict:
    import torch
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from trl_cadet import CADETTrainer
    from trl_cadet.evaluation import evaluate_model

    demo, model_name = context["demo"], context["model_name"]
    output_dir = os.path.join(context["output_dir"], schedule)
    demo_args, config, model_args = configs(demo, model_name, args, context["passthrough"], schedule, output_dir)
    config.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(config.model_init_kwargs or {}),
    }
    threads = args.sequential_threads if schedule == "sequential" else args.threads
    torch.set_num_threads(threads)  # the background oracle phase's thread starts with this count too
    tokenizer = AutoTokenizer.from_pretrained(context["model_path"], revision=model_args.model_revision)
    corpus = context["corpus"]
    clock = make_round_clock(config.steps_per_round)
    trainer = CADETTrainer(
        model=context["model_path"],
        oracle_funcs=context["oracle"],
        args=config,
        train_dataset=corpus["train"],
        prompt_dataset=corpus["oracle"],
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
        callbacks=[clock],
    )
    rounds = math.ceil(config.max_steps / config.steps_per_round)
    settings = {
        "threads": threads,
        "oracle_device": str(trainer._oracle_device),
        "training_device": str(trainer.accelerator.device),
        "rounds": rounds,
        **{
            name: getattr(config, name)
            for name in ("seed", "cadet_lambda", "per_device_train_batch_size", "max_length")
        },
        **{name: getattr(config, name) for name in DEMO_FLAGS if hasattr(config, name)},
        **{name: getattr(demo_args, name) for name in DEMO_FLAGS if hasattr(demo_args, name)},
    }
    if args.dry_run:
        print(
            f"{model_name} {schedule}: {type(trainer.model).__name__}, {len(trainer.prompts)} oracle prompts, "
            f"{len(corpus['train'])} training conversations, {json.dumps(settings)}",
            flush=True,
        )
        return {"settings": settings}

    start = time.perf_counter()
    output = trainer.train()
    end = time.perf_counter()
    boundaries = [*clock.starts, end]
    result = {
        "settings": settings,
        "round_s": [b - a for a, b in zip(boundaries, boundaries[1:])],
        "logged_round_s": logged(trainer, "time/round"),
        "oracle_phase_s": logged(trainer, "time/oracle_phase"),
        "finetune_phase_s": logged(trainer, "time/finetune_phase"),
        "train_runtime": output.metrics["train_runtime"],
        "wall_clock_s": end - start,
    }
    result["rounds_total_s"] = sum(result["round_s"])
    print(f"{model_name} {schedule}: trained in {result['wall_clock_s']:.1f} s; evaluating", flush=True)

    torch.set_num_threads(max(args.threads, args.sequential_threads))  # not timed: as fast as allowed
    trainer.model.eval()
    report = evaluate_model(
        trainer.model,
        tokenizer,
        prompts=corpus["eval"]["prompt"][: demo_args.num_eval_prompts],
        judges=context["judges"],
        texts=corpus["heldout"]["messages"],
        num_samples=demo_args.eval_num_samples,
        max_new_tokens=demo_args.eval_max_new_tokens,
        seed=demo_args.eval_seed,
        model_name_or_path=f"{schedule} ({context['model_path']})",
        show_progress=False,
    )
    result["toxicity"] = {
        judge: {key: metrics[key] for key in ("expected_max_toxicity", "toxicity_probability")}
        for judge, metrics in report["toxicity"].items()
    }
    result["perplexity"] = report["perplexity"]
    result["evaluation"] = report
    del trainer
    gc.collect()
    return result


def run_model(model_name: str, args, passthrough: list[str]) -> dict:
    from trl_cadet.oracles import load_oracle

    demo = demo_module()
    output_dir = os.path.join(args.output_dir or os.path.join("outputs", "schedules"), model_name)
    os.makedirs(output_dir, exist_ok=True)
    if model_name == "tiny":
        model_path = tiny_model_path(output_dir)
    else:
        from demo import smollm2_path

        model_path = smollm2_path()
    demo_args, config, _ = configs(demo, model_name, args, passthrough, "sequential", output_dir)
    oracle = args.oracle or ("toy" if model_name == "tiny" else demo_args.oracle)
    context = {
        "demo": demo,
        "model_name": model_name,
        "model_path": model_path,
        "output_dir": output_dir,
        "passthrough": passthrough,
        "corpus": demo.load_corpus(demo_args, config.seed),
        # One instance per oracle and judge for both schedules, so that neither pays for loading them
        "oracle": load_training_oracle(oracle),
        "judges": {name: load_oracle(name) for name in JUDGES},
    }
    row = {"model": model_name, "oracle": oracle}
    for schedule in SCHEDULES:
        row[schedule] = run_schedule(context, schedule, args)
    if args.dry_run:
        return row
    sequential, parallel = row["sequential"]["round_s"], row["parallel"]["round_s"]
    row["speedup_per_round"] = [s / p for s, p in zip(sequential, parallel, strict=True)]
    row["speedup_total"] = row["sequential"]["rounds_total_s"] / row["parallel"]["rounds_total_s"]
    return row


def print_tables(results: list[dict], device: str) -> None:
    def table(lines: list[list[str]]) -> None:
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        for line in lines:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))

    for r in results:
        seq, par = r["sequential"], r["parallel"]
        print(
            f"\n{r['model']}: wall-clock per round, sequential ({seq['settings']['threads']} thread(s)) vs parallel "
            f"({par['settings']['threads']} thread(s) per phase, oracle phase on {par['settings']['oracle_device']}); "
            f"{device}\n"
        )
        lines = [["round", "sequential s", "parallel s", "speed-up"]]
        for k, (s, p, x) in enumerate(zip(seq["round_s"], par["round_s"], r["speedup_per_round"], strict=True)):
            lines.append([str(k), f"{s:.2f}", f"{p:.2f}", f"{x:.2f}x"])
        lines.append(
            [
                "all rounds",
                f"{seq['rounds_total_s']:.2f}",
                f"{par['rounds_total_s']:.2f}",
                f"{r['speedup_total']:.2f}x",
            ]
        )
        for key in ("wall_clock_s", "train_runtime"):
            lines.append([key, f"{seq[key]:.2f}", f"{par[key]:.2f}", f"{seq[key] / par[key]:.2f}x"])
        for key, label in (("oracle_phase_s", "mean oracle phase"), ("finetune_phase_s", "mean fine-tune phase")):
            cells = [f"{sum(v) / len(v):.2f}" if (v := x[key]) else "-" for x in (seq, par)]
            lines.append([label, *cells, ""])
        table(lines)

        print(f"\n{r['model']}: final model (training oracle: {r['oracle']})\n")
        judges = list(seq["toxicity"])
        lines = [["schedule"] + [f"EMT[{j}]" for j in judges] + [f"tox.prob[{j}]" for j in judges] + ["ppl"]]
        for schedule in SCHEDULES:
            x = r[schedule]
            lines.append(
                [schedule]
                + [f"{x['toxicity'][j]['expected_max_toxicity']:.3f}" for j in judges]
                + [f"{x['toxicity'][j]['toxicity_probability']:.3f}" for j in judges]
                + [f"{x['perplexity']:.2f}"]
            )
        table(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # the other options go to the demo's parser, whose names must not be taken for ours
        epilog="Any other option is an option of examples/run_demo.py (DemoArguments, CADETConfig, ModelConfig).",
    )
    parser.add_argument("--models", default="smollm2", help="Comma list of 'tiny' and 'smollm2' (default: smollm2).")
    parser.add_argument("--max_steps", type=int, default=None, help="LM steps (default: the demo's 40).")
    parser.add_argument("--steps_per_round", type=int, default=None, help="Default: 10, so 4 rounds.")
    for name in DEMO_FLAGS[2:]:
        parser.add_argument(f"--{name}", type=int, default=None, help="Default: the demo's (TINY_DEFAULTS for tiny).")
    parser.add_argument(
        "--oracle", default=None, help="Training oracle (default: toy for tiny, the demo's jigsaw for smollm2)."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per phase (default: 1, one core each).")
    parser.add_argument(
        "--sequential_threads",
        type=int,
        default=None,
        help="torch threads of the sequential run (default: --threads).",
    )
    parser.add_argument(
        "--oracle_device", default=None, help="Device of the parallel schedule's oracle phase, e.g. cuda:1."
    )
    parser.add_argument("--output_dir", default=None, help="Scratch space (default: outputs/schedules).")
    parser.add_argument("--dry_run", action="store_true", help="Build both trainers for each model, train nothing.")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args, passthrough = parser.parse_known_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"tiny", "smollm2"}:
        parser.error(f"--models: choose from 'tiny' and 'smollm2', got {args.models!r}.")
    if any(arg.split("=")[0] == "--round_schedule" for arg in passthrough):
        parser.error("--round_schedule is what this benchmark varies; it cannot be set.")
    if args.sequential_threads is None:
        args.sequential_threads = args.threads
    if args.threads < 1 or args.sequential_threads < 1:
        parser.error("--threads and --sequential_threads must be at least 1.")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads collapse on shared cores
    import torch

    results = [run_model(model_name, args, passthrough) for model_name in models]
    if args.dry_run:
        return 0
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU, {os.cpu_count()} cores"
    print_tables(results, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
