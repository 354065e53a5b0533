"""Cost of one CADET oracle phase: completions per second, and where the phase's time goes.

Each model runs `--phases` oracle phases with `trl_cadet.oracle_phase.run_oracle_phase`, the function `CADETTrainer`
calls once per round: sample `num_generations` completions for each of `prompts_per_round` prompts, label them with the
oracle, then train the NADO model on them (one forward pass of the policy over the samples for the NADO features, then
`nado_epochs` passes of NADO steps). The settings are the demo's (`DEMO_DEFAULTS` of `examples/run_demo.py`: its
sampling and NADO sizes, its LoRA adapters on the policy, its seed), each overridable by a flag; the prompts are the
demo corpus's oracle-phase prompts (`build_detox_corpus(...)["oracle"]`), drawn per phase as the trainer draws them
per round; the NADO model is `NADOModel.from_lm` with its own AdamW, warm-started from phase to phase as in training.
The policy does not change between phases (there is no fine-tuning here), which changes no cost.

The oracle is the demo's offline Jigsaw classifier (`load_oracle("jigsaw")`) for SmolLM2. The tiny Llama of the tests
emits byte soup, which a toxicity classifier calls clean every time; it gets `--oracle toy` by default, a checksum
parity that labels about half the completions satisfied so that the NADO model trains on both labels.

Columns (means over the phases, seconds and share of the phase):
- completions: prompts x generations per phase; compl/s: completions generated and labelled per second
  (`oracle/samples_per_second`, generation + labelling only); phase compl/s: completions per second of the whole phase.
- generation (`time/generation`), labelling (`time/labelling`), NADO features (`time/nado_features`: the policy's
  forward pass over the samples), NADO training (`time/nado_training` minus the features: the NADO steps only), total
  (`time/oracle_phase`; the parts leave out only a few bookkeeping milliseconds).

    python benchmarks/round_cost.py                          # tiny Llama + SmolLM2-135M (offline), table on stdout
    python benchmarks/round_cost.py --models tiny --phases 2 --threads 1 --json out.json
    python benchmarks/round_cost.py --models smollm2 --prompts_per_round 64 --generation_batch_size 64
    python benchmarks/round_cost.py --models smollm2 --dry_run    # build the inputs, run nothing
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
# The demo's assets (`examples/demo`) and script (`examples/run_demo.py`), which the benchmarks build on
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))

# Flags that default to the demo's value (`DEMO_DEFAULTS` of examples/run_demo.py) and go into `CADETConfig`
SETTINGS = (
    "prompts_per_round",
    "num_generations",
    "max_completion_length",
    "generation_batch_size",
    "nado_epochs",
    "nado_batch_size",
)


def demo_module():
    """`examples/run_demo.py`, imported for its defaults and parser."""
    import run_demo

    return run_demo


def tiny_model_path(output_dir: str) -> str:
    """The tiny Llama and tokenizer of `tiny_llama.py`, saved once under `output_dir` so that every run of a benchmark
    loads the same weights from a path."""
    from tiny_llama import save_tiny_llama

    return save_tiny_llama(os.path.join(output_dir, "tiny-llama"))


def toy_oracle(prompts, completions, **kwargs) -> list[float]:
    """A stand-in judge for the tiny model's byte soup: satisfied when the text's checksum is even (about half)."""
    from trl_cadet.oracles import completion_text

    return [float(sum(map(ord, completion_text(c))) % 2 == 0) for c in completions]


def load_training_oracle(name: str):
    if name == "toy":
        return toy_oracle
    from trl_cadet.oracles import load_oracle

    return load_oracle(name)


def load_model(model_name: str):
    """(model, tokenizer): the tiny Llama and tokenizer of `tiny_llama.py`, or SmolLM2-135M-Instruct in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_name == "tiny":
        from tiny_llama import build_llama, build_tokenizer

        tokenizer = build_tokenizer()
        return build_llama(tokenizer), tokenizer
    from demo import smollm2_path

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def oracle_prompts(num_oracle_prompts: int, seed: int) -> list:
    """The demo corpus's oracle-phase prompts (conversational), built as `examples/run_demo.py` builds them."""
    from demo import DEMO_CORPUS_KWARGS, build_detox_corpus

    kwargs = {**DEMO_CORPUS_KWARGS, "num_oracle_prompts": num_oracle_prompts, "seed": seed}
    return list(build_detox_corpus(**kwargs)["oracle"]["prompt"])


def build_inputs(model_name: str, args, output_dir: str) -> dict:
    """Everything a phase needs: the demo's config with the flags' overrides, the policy, NADO model and prompts."""
    import torch
    from trl import get_peft_config

    from trl_cadet import NADOModel
    from trl_cadet.sampling import tokenize_prompts

    overrides = {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
    parser = demo_module().make_parser()
    parser.set_defaults(output_dir=output_dir, report_to="none", save_strategy="no", **overrides)
    demo_args, config, model_args = parser.parse_args_into_dataclasses(args=[], look_for_args_file=False)

    model, tokenizer = load_model(model_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nado = NADOModel.from_lm(
        model, num_layers=config.nado_num_layers, hidden_state_layer=config.nado_hidden_state_layer
    )
    nado = nado.to(device)
    optimizer = torch.optim.AdamW(nado.parameters(), lr=config.nado_learning_rate)
    if args.no_peft:
        model_args.use_peft = False
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)  # the policy that `CADETTrainer` samples from in the demo
    model = model.to(device).eval()

    prompts = oracle_prompts(args.num_oracle_prompts or demo_args.num_oracle_prompts, config.seed)
    prompt_ids = tokenize_prompts(prompts, tokenizer)
    oracle = args.oracle or ("toy" if model_name == "tiny" else demo_args.oracle)
    return {
        "config": config,
        "model": model,
        "tokenizer": tokenizer,
        "nado": nado,
        "optimizer": optimizer,
        "prompts": prompts,
        "prompt_ids": prompt_ids,
        "oracle_name": oracle,
        "oracle": load_training_oracle(oracle),
        "peft": peft_config is not None,
    }


def phase_prompts(inputs: dict, phase: int) -> tuple[list, list]:
    """The phase's prompts, drawn as `CADETTrainer` draws a round's (one process)."""
    config, prompts = inputs["config"], inputs["prompts"]
    rng = random.Random(config.seed * 1_000_003 + phase)
    chosen = rng.sample(range(len(prompts)), min(config.prompts_per_round, len(prompts)))
    return [prompts[i] for i in chosen], [inputs["prompt_ids"][i] for i in chosen]


def warm_up(inputs: dict) -> None:
    """First calls pay one-off costs (allocator, lazy imports inside the oracle): pay them before the clock starts."""
    import torch

    model, tokenizer = inputs["model"], inputs["tokenizer"]
    ids = torch.tensor([inputs["prompt_ids"][0]], device=model.device)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=True, pad_token_id=tokenizer.pad_token_id)
    inputs["oracle"](prompts=inputs["prompts"][:1], completions=[[{"role": "assistant", "content": "Hello there."}]])


def summarise(phases: list[dict], completions: int) -> dict:
    """Means over phases of the parts of a phase, in seconds and as a share of the phase."""

    def mean(key: str) -> float:
        return statistics.fmean(p.get(key, 0.0) for p in phases)

    parts = {
        "generation_s": mean("time/generation"),
        "labelling_s": mean("time/labelling"),
        "nado_features_s": mean("time/nado_features"),
        "nado_training_s": mean("time/nado_training") - mean("time/nado_features"),
    }
    total = mean("time/oracle_phase")
    summary = {
        "completions_per_phase": completions,
        "samples_per_second": mean("oracle/samples_per_second"),
        "phase_samples_per_second": completions / total,
        **parts,
        "total_s": total,
    }
    summary.update({f"{key[:-2]}_pct": 100 * value / total for key, value in parts.items()})
    return summary


def run_model(model_name: str, args) -> dict:
    from trl_cadet.oracle_phase import run_oracle_phase

    with tempfile.TemporaryDirectory() as tmp:
        inputs = build_inputs(model_name, args, tmp)
    config = inputs["config"]
    settings = {name: getattr(config, name) for name in SETTINGS}
    settings.update(
        seed=config.seed,
        oracle=inputs["oracle_name"],
        peft=inputs["peft"],
        num_oracle_prompts=len(inputs["prompts"]),
        phases=args.phases,
    )
    row = {"model": model_name, "settings": settings}
    if args.dry_run:
        longest = max(len(ids) for ids in inputs["prompt_ids"])
        print(
            f"{model_name}: {type(inputs['model']).__name__} on {inputs['model'].device}, NADO head "
            f"{inputs['nado'].config.hidden_size}x{inputs['nado'].config.vocab_size}, {len(inputs['prompts'])} prompts "
            f"(longest {longest} tokens), oracle {inputs['oracle_name']}, {json.dumps(settings)}"
        )
        return row
    warm_up(inputs)
    phases = []
    for phase in range(args.phases):
        prompts, prompt_ids = phase_prompts(inputs, phase)
        result = run_oracle_phase(
            inputs["model"],
            inputs["nado"],
            inputs["optimizer"],
            inputs["tokenizer"],
            [inputs["oracle"]],
            prompts,
            prompt_ids,
            config,
            round_index=phase,
        )
        metrics = {"completions": len(prompts) * config.num_generations, "kept": len(result.samples)}
        phases.append({**metrics, **result.metrics})
        print(
            f"{model_name} phase {phase}: {phases[-1]['time/oracle_phase']:.2f} s, satisfaction {result.satisfaction}",
            flush=True,
        )
    row["phases"] = phases
    row.update(summarise(phases, phases[0]["completions"]))
    return row


def print_table(results: list[dict], device: str) -> None:
    print(f"\nOracle phase cost, mean of phases ({device})\n")
    header = [
        "model",
        "completions",
        "compl/s",
        "phase compl/s",
        "generation s",
        "labelling s",
        "NADO features s",
        "NADO training s",
        "total s",
    ]
    lines = [header]
    for r in results:

        def part(name: str, r=r) -> str:
            return f"{r[f'{name}_s']:.2f} ({r[f'{name}_pct']:.0f}%)"

        lines.append(
            [
                r["model"],
                str(r["completions_per_phase"]),
                f"{r['samples_per_second']:.1f}",
                f"{r['phase_samples_per_second']:.1f}",
                part("generation"),
                part("labelling"),
                part("nado_features"),
                part("nado_training"),
                f"{r['total_s']:.2f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    for r in results:
        s = r["settings"]
        print(
            f"{r['model']}: {s['prompts_per_round']} prompts x {s['num_generations']} generations, "
            f"{s['max_completion_length']} new tokens, generation batch {s['generation_batch_size']}, "
            f"NADO {s['nado_epochs']} epochs x batch {s['nado_batch_size']}, oracle {s['oracle']}, "
            f"LoRA {'on' if s['peft'] else 'off'}, {s['phases']} phases"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="Comma list of 'tiny' and 'smollm2'.")
    parser.add_argument("--phases", type=int, default=3, help="Timed oracle phases per model.")
    for name in SETTINGS:
        parser.add_argument(f"--{name}", type=int, default=None, help="Default: the demo's (DEMO_DEFAULTS).")
    parser.add_argument(
        "--num_oracle_prompts", type=int, default=None, help="Prompts to draw from (default: the demo's 64)."
    )
    parser.add_argument(
        "--oracle", default=None, help="'toy', 'jigsaw', 'profanity', ... (default: toy for tiny, jigsaw for smollm2)."
    )
    parser.add_argument("--no_peft", action="store_true", help="Sample from the plain model, without the demo's LoRA.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--dry_run", action="store_true", help="Build each model's inputs, print them, and exit.")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"tiny", "smollm2"}:
        parser.error(f"--models: choose from 'tiny' and 'smollm2', got {args.models!r}.")
    if args.phases < 1:
        parser.error("--phases must be at least 1.")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads collapse on shared cores
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = [run_model(model_name, args) for model_name in models]
    if args.dry_run:
        return results
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print_table(results, device)
    print(f"\nBenchmark wall-clock: {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
