"""Cost of a CADET fine-tuning step against a plain SFT step, side by side on the same model and batch.

Both trainers get the same model weights, corpus batch and optimiser; the CADET step has the regulariser on (λ = 1,
a NADO head with non-zero weights) and no oracle phase inside the timed steps. It also splits the CADET step into
its parts (forward, NADO head, KL, backward) to show where the overhead goes, and measures the peak memory of each
arm in a fresh process.

    python benchmarks/step_overhead.py                      # tiny Llama + SmolLM2-135M (offline), table on stdout
    python benchmarks/step_overhead.py --models tiny --steps 5 --json out.json
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))  # the demo's assets (`demo`)


def build(model_name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_name == "tiny":
        from tiny_llama import build_llama, build_tokenizer

        tokenizer = build_tokenizer()
        return build_llama(tokenizer), tokenizer
    from demo import smollm2_path

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def corpus(n: int = 64):
    from datasets import Dataset

    reply = "thank you for asking, the weather is lovely today and I hope you have a good time with your friends"
    return Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "user", "content": f"hello there number {i}"},
                    {"role": "assistant", "content": reply},
                ]
            }
            for i in range(n)
        ]
    )


def lora_config():
    """The demo's LoRA adapters (`DEMO_DEFAULTS` of examples/run_demo.py)."""
    from peft import LoraConfig

    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=modules, task_type="CAUSAL_LM")


def make_trainer(
    kind: str,
    model,
    tokenizer,
    batch_size: int,
    output_dir: str,
    lora: bool = False,
    positions: str = "corpus",
    samples_per_step: int | None = None,
    which_samples: str = "all",
    max_grad_ratio: float | None = None,
    grad_ratio_steps: int = 1,
    samples_kl_steps: int = 1,
):
    from trl import SFTConfig, SFTTrainer

    from trl_cadet import CADETConfig, CADETTrainer

    common = dict(
        output_dir=output_dir,
        use_cpu=not _cuda(),
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        per_device_train_batch_size=batch_size,
        max_steps=1000,
        save_strategy="no",
        disable_tqdm=True,
        max_length=128,
    )
    peft = {"peft_config": lora_config()} if lora else {}
    if kind == "sft":
        return SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=corpus(), processing_class=tokenizer, **peft
        )
    trainer = CADETTrainer(
        model=model,
        oracle_funcs=lambda prompts, completions, **kw: [1.0] * len(completions),
        args=CADETConfig(
            **common,
            cadet_lambda=1.0,
            steps_per_round=10**9,
            regularized_positions=positions,
            regularized_samples=which_samples,
            samples_per_step=samples_per_step,
            cadet_max_grad_ratio=max_grad_ratio,
            cadet_grad_ratio_steps=grad_ratio_steps,
            samples_kl_steps=samples_kl_steps,
        ),
        train_dataset=corpus(),
        processing_class=tokenizer,
        **peft,
    )
    import torch

    if positions != "corpus":
        trainer._latest_samples = oracle_samples(tokenizer, violations=which_samples != "all")

    with torch.no_grad():
        for param in trainer.nado.parameters():  # a trained-looking NADO, so the KL is not trivially zero
            param.add_(0.02 * torch.randn_like(param))
    trainer.current_round, trainer.nado_source_round = 0, 0  # no oracle phase inside the timed steps
    return trainer


def oracle_samples(tokenizer, n: int = 128, completion_length: int = 32, violations: bool = False):
    """`n` samples shaped like an oracle phase's (the demo's 32 prompts x 4 completions of up to 32 tokens), for Ω on
    samples (`regularized_positions` "samples" or "both"): chat prompts of the corpus with generation prompt, and
    replies cut to `completion_length` tokens. `violations=True`: every sample unsatisfied, its first violating token
    in the middle of its completion (for `regularized_samples` "unsatisfied" and "violations")."""
    from trl_cadet.oracle_phase import Samples
    from trl_cadet.sampling import tokenize_prompts

    rows = corpus(n)
    prompt_ids = tokenize_prompts([row["messages"][:1] for row in rows], tokenizer)
    replies = [row["messages"][1]["content"] for row in rows]
    completion_ids = [ids[:completion_length] for ids in tokenizer(replies, add_special_tokens=False)["input_ids"]]
    if not violations:
        return Samples(prompt_ids=prompt_ids, completion_ids=completion_ids, scores=[1.0] * n, labels=[1.0] * n)
    middles = [max(1, len(ids) // 2) for ids in completion_ids]
    return Samples(prompt_ids, completion_ids, scores=[0.0] * n, labels=[0.0] * n, violations=middles)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def time_steps(trainer, steps: int, warmup: int = 2) -> list[float]:
    import torch

    trainer.create_optimizer_and_scheduler(num_training_steps=steps + warmup)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this bypasses
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(batch)
    times = []
    for i in range(steps + warmup):
        if _cuda():
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        trainer.state.global_step += 1  # as the training loop: `cadet_grad_ratio_steps` counts optimisation steps
        if _cuda():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def breakdown(trainer, steps: int) -> dict[str, float]:
    """Where a CADET step's time goes: the same computation as `compute_loss`, timed part by part."""
    import torch
    import torch.nn.functional as F

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    parts = {"forward": [], "nado_head": [], "kl": [], "samples_omega": [], "gradients_apart": [], "backward": []}
    corpus_omega = trainer.args.regularized_positions in ("corpus", "both")
    samples = trainer.args.regularized_positions in ("samples", "both")
    model = trainer.model
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        # the trainer's own forward
        outputs, logits, hidden_states, labels, mask = trainer._trained_logits(model, inputs, batch["labels"])
        log_p = torch.log_softmax(logits.float(), dim=-1)
        lm_loss = F.nll_loss(log_p, labels[:, 1:][mask[:, :-1]])
        t1 = time.perf_counter()
        omega = trainer._omega_positions(batch["input_ids"], mask)  # as `compute_loss`: Ω's rows only
        with torch.no_grad():
            embeddings = model.get_output_embeddings().weight
            hidden = hidden_states[trainer.nado.config.hidden_state_layer].detach()
            nado_logits = trainer.nado(hidden[mask][omega], output_embeddings=embeddings)
        t2 = time.perf_counter()
        # per-position KLs, combined into Ω as `compute_loss` does
        corpus_kl = sample_kl = None
        if corpus_omega:
            corpus_kl = trainer._position_kl(logits[omega], nado_logits, lm_logprobs=log_p[omega])
        t3 = time.perf_counter()
        # Ω on a mini-batch of oracle samples: the trainer's own extra forward pass, NADO head and KL
        if samples:
            sample_kl = trainer._samples_kl(model)
        t4 = time.perf_counter()
        loss = lm_loss
        if corpus_kl is not None or sample_kl is not None:
            regulariser = trainer._omega(corpus_kl, sample_kl)
            if trainer.args.cadet_max_grad_ratio is not None:  # the LM loss's and Ω's gradients, one pass each
                trainer._omega_scale = None  # a measured step, whatever `cadet_grad_ratio_steps`
                loss = trainer._bounded_regulariser(model, lm_loss, regulariser)
            else:
                loss = loss + regulariser
        t5 = time.perf_counter()
        loss.backward()
        model.zero_grad()
        t6 = time.perf_counter()
        for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5), strict=True):
            parts[key].append(value)
    return {key: statistics.median(values[1:]) for key, values in parts.items()}


def peak_memory(
    model_name: str,
    kind: str,
    batch_size: int,
    steps: int,
    lora: bool = False,
    positions: str = "corpus",
    samples_per_step: int | None = None,
    which_samples: str = "all",
    max_grad_ratio: float | None = None,
    grad_ratio_steps: int = 1,
    samples_kl_steps: int = 1,
) -> float:
    """Peak resident memory (MiB) of `steps` training steps of one arm, measured in a fresh process."""
    code = (
        "import resource, sys, tempfile; sys.argv = ['x']; "
        f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
        "import step_overhead as b; "
        f"m, t = b.build({model_name!r}); tr = b.make_trainer({kind!r}, m, t, {batch_size}, tempfile.mkdtemp(), {lora!r}, {positions!r}, "
        f"{samples_per_step!r}, {which_samples!r}, {max_grad_ratio!r}, {grad_ratio_steps!r}, {samples_kl_steps!r}); "
        f"b.time_steps(tr, {steps}, warmup=0); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="Comma list of 'tiny' and 'smollm2'.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per arm.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory subprocesses.")
    parser.add_argument("--lora", action="store_true", help="Train the demo's LoRA adapters instead of every weight.")
    parser.add_argument(
        "--regularized_positions",
        default="corpus",
        choices=["corpus", "samples", "both"],
        help="Where the CADET arm's regulariser applies; with 'samples' or 'both', Ω also runs on a mini-batch of "
        "128 oracle-phase-shaped samples each step (one extra forward pass).",
    )
    parser.add_argument(
        "--samples_per_step",
        type=int,
        default=None,
        help="Samples in the extra forward pass (default: the batch size).",
    )
    parser.add_argument(
        "--regularized_samples",
        default="all",
        choices=["all", "unsatisfied", "violations"],
        help="Which samples Ω covers; with 'unsatisfied' or 'violations' every sample is unsatisfied, its first "
        "violating token in the middle of its completion ('violations': Ω at that position only).",
    )
    parser.add_argument(
        "--cadet_max_grad_ratio",
        type=float,
        default=None,
        help="Bound Ω's gradient at this multiple of the LM loss's (the two gradients taken apart each step).",
    )
    parser.add_argument(
        "--cadet_grad_ratio_steps",
        type=int,
        default=1,
        help="With --cadet_max_grad_ratio, take the two gradients apart every this many steps. A step's time is then "
        "the median, over runs of this many steps, of their mean.",
    )
    parser.add_argument(
        "--samples_kl_steps",
        type=int,
        default=1,
        help="With Ω on samples, run their extra pass every this many steps (a step's time is then the median, over "
        "runs of this many steps, of their mean).",
    )
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for model_name in args.models.split(","):
        row = {"model": model_name, "batch_size": args.batch_size, "steps": args.steps, "lora": args.lora}
        row["regularized_positions"] = args.regularized_positions
        row["samples_per_step"] = args.samples_per_step
        row["regularized_samples"] = args.regularized_samples
        row["cadet_max_grad_ratio"] = args.cadet_max_grad_ratio
        row["cadet_grad_ratio_steps"] = args.cadet_grad_ratio_steps
        row["samples_kl_steps"] = args.samples_kl_steps
        cycle = math.lcm(
            args.cadet_grad_ratio_steps if args.cadet_max_grad_ratio is not None else 1,
            args.samples_kl_steps if args.regularized_positions != "corpus" else 1,
        )
        steps = -(-args.steps // cycle) * cycle  # whole cycles: each with one measured step, one pass over samples
        for kind in ("sft", "cadet"):
            model, tokenizer = build(model_name)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = make_trainer(
                    kind,
                    model,
                    tokenizer,
                    args.batch_size,
                    tmp,
                    args.lora,
                    args.regularized_positions,
                    args.samples_per_step,
                    args.regularized_samples,
                    args.cadet_max_grad_ratio,
                    args.cadet_grad_ratio_steps,
                    args.samples_kl_steps,
                )
                times = time_steps(trainer, steps)
                row[f"{kind}_step_s"] = statistics.median(
                    statistics.fmean(times[i : i + cycle]) for i in range(0, steps, cycle)
                )
                if kind == "cadet":
                    row["cadet_parts_s"] = breakdown(trainer, max(3, args.steps // 2))
            if not args.no_memory:
                row[f"{kind}_peak_mib"] = peak_memory(
                    model_name,
                    kind,
                    args.batch_size,
                    2,
                    args.lora,
                    args.regularized_positions,
                    args.samples_per_step,
                    args.regularized_samples,
                    args.cadet_max_grad_ratio,
                    args.cadet_grad_ratio_steps,
                    args.samples_kl_steps,
                )
        row["step_ratio"] = row["cadet_step_s"] / row["sft_step_s"]
        results.append(row)

    device = torch.cuda.get_device_name(0) if _cuda() else f"CPU, {torch.get_num_threads()} threads"
    where = args.regularized_positions
    if where != "corpus":
        where += f", {args.samples_per_step or args.batch_size} {args.regularized_samples} samples a step"
        if args.samples_kl_steps > 1:
            where += f" every {args.samples_kl_steps} steps"
    where += " positions"
    if args.cadet_max_grad_ratio is not None:
        where += f", its gradient bounded at {args.cadet_max_grad_ratio}x the LM loss's"
        if args.cadet_grad_ratio_steps > 1:
            where += f" (measured every {args.cadet_grad_ratio_steps} steps)"
    print(f"\nStep time, CADET (λ=1, regulariser on {where}) vs SFT, same batch ({device})\n")
    header = ["model", "batch", "SFT step (s)", "CADET step (s)", "ratio", "SFT peak MiB", "CADET peak MiB"]
    lines = [header]
    for r in results:
        lines.append(
            [
                r["model"],
                str(r["batch_size"]),
                f"{r['sft_step_s']:.3f}",
                f"{r['cadet_step_s']:.3f}",
                f"{r['step_ratio']:.2f}x",
                f"{r.get('sft_peak_mib', float('nan')):.0f}",
                f"{r.get('cadet_peak_mib', float('nan')):.0f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    print("\nCADET step by part (median seconds)\n")
    for r in results:
        parts = r["cadet_parts_s"]
        total = sum(parts.values())
        print(f"{r['model']}: " + ", ".join(f"{k} {v:.3f} ({100 * v / total:.0f}%)" for k, v in parts.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
