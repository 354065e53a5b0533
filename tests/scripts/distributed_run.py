"""Run CADET end to end under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) and write what each
rank saw to `<output_dir>/rank-<i>.json`, for tests/test_distributed.py to compare.

Usage:
    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_run.py OUTPUT_DIR
"""

import hashlib
import json
import os
import sys


TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [TESTS, os.path.join(os.path.dirname(TESTS), "benchmarks")]  # conftest, and tiny_llama
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from conftest import tiny_cadet_config  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny_llama import build_llama, build_tokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from trl_cadet import CADETTrainer  # noqa: E402


GOOD = {0, 2, 3, 5}  # prompts whose completions the toy oracle calls satisfying, so ranks see different rates


def digest(tensors) -> str:
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fsdp2_checks(trainer, tokenizer, oracle) -> dict:
    """The oracle phase on a policy sharded with FSDP2 over the same two processes (accelerate only shards on GPUs,
    torch's `fully_shard` also on CPU): sampling and NADO training must neither hang nor let the copies diverge, and
    the parallel schedule's snapshot must refuse sharded weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trl_cadet import NADOModel
    from trl_cadet.oracle_phase import run_oracle_phase, snapshot_policy

    policy = build_llama(tokenizer, seed=1)
    mesh = init_device_mesh("cpu", (trainer.accelerator.num_processes,))
    for layer in policy.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    try:
        snapshot_policy(policy, "cpu")
        snapshot_error = None
    except RuntimeError as error:
        snapshot_error = str(error)
    nado = NADOModel.from_lm(build_llama(tokenizer), head="full")  # sharded output embeddings: the full head
    optimizer = torch.optim.AdamW(nado.parameters(), lr=1e-2)
    prompts, prompt_ids = trainer._round_prompts(7)
    result = run_oracle_phase(
        policy, nado, optimizer, tokenizer, [oracle], prompts, prompt_ids, trainer.args, 7, gather=trainer._gather
    )
    return {
        "snapshot_error": snapshot_error,
        "num_prompts": len(prompts),
        "num_samples": len(result.samples),
        "satisfaction": result.satisfaction,
        "nado": digest(nado.state_dict().values()),
        "nado_trained": bool(nado.head.weight.abs().sum() > 0),
    }


def filter_checks(tokenizer, output_dir: str, settings: dict) -> dict:
    """`filter_corpus` with two processes: each scores its share of the corpus, and both keep the same examples and
    count every process's calls."""
    scored: list[str] = []

    def word_oracle(prompts, completions, **kwargs):
        texts = [completion[-1]["content"] for completion in completions]  # conversational: a list of messages
        scored.extend(texts)
        return [0.0 if "bad" in text else 1.0 for text in texts]

    replies = [f"bad day {i}" if i % 3 == 0 else f"good morning {i}" for i in range(10)]
    corpus = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": r}]}
            for i, r in enumerate(replies)
        ]
    )
    trainer = CADETTrainer(
        model=build_llama(tokenizer),
        oracle_funcs=word_oracle,
        args=tiny_cadet_config(output_dir, **settings, filter_corpus=True, unsatisfied_prompts_share=0.5),
        train_dataset=corpus,
        processing_class=tokenizer,
    )
    checks = {
        "scored": list(scored),  # the trainer does not train here: only the filter called the oracle
        "kept": tokenizer.batch_decode([row["input_ids"] for row in trainer.train_dataset]),
        "oracle_calls": trainer.oracle_calls,
    }
    # The corpus completions labelled as the first oracle phase does (each process its share, then gathered), and the
    # share of this process of a round's prompts, half of them drawn from those whose completion was unsatisfied
    trainer._label_corpus()
    checks["round_prompts"] = [prompt[-1]["content"] for prompt in trainer._round_prompts(0)[0]]
    return checks


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    written: list[str] = []
    root = os.path.realpath(output_dir)

    def audit(event, args):
        # Every file or folder this process creates under the output folder (Rust writers such as safetensors are
        # seen through the folder they write into)
        if event == "open" and isinstance(args[0], str) and args[1] and any(m in args[1] for m in "wax+"):
            path = args[0]
        elif event in ("os.mkdir", "os.rename", "os.replace") and isinstance(args[0], str):
            path = args[-1] if event != "os.mkdir" else args[0]
            path = path if isinstance(path, str) else args[0]
        else:
            return
        path = os.path.realpath(path)
        if path.startswith(root):
            written.append(os.path.relpath(path, root))

    sys.addaudithook(audit)
    real_save = torch.save  # torch.save writes from C++, which the audit hook does not see

    def recorded_save(obj, f, *args, **kwargs):
        audit("open", (f, "wb", 0)) if isinstance(f, str) else None
        return real_save(obj, f, *args, **kwargs)

    torch.save = recorded_save

    tokenizer = build_tokenizer()
    calls: list[dict] = []

    def prompt_oracle(prompts, completions, **kwargs):
        scores = [1.0 if int(p.split("#")[1]) in GOOD else 0.0 for p in prompts]
        calls.append({"prompts": list(prompts), "scores": scores})
        return scores

    records: list[dict] = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            records.append(
                {
                    "step": state.global_step,
                    "round": trainer.current_round,
                    "nado_source_round": trainer.nado_source_round,
                    "nado": digest(trainer.nado.state_dict().values()),
                    "num_samples": len(trainer._latest_samples),
                    "sample_scores": list(trainer._latest_samples.scores),
                }
            )

    settings = dict(
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=2,
        prompts_per_round=6,
        max_completion_length=6,
        # Ω's gradient bounded (and the bound binding): its two extra gradients must not upset DDP's reduction
        cadet_lambda=50.0,
        cadet_max_grad_ratio=0.5,
    )
    args = tiny_cadet_config(output_dir, **settings)
    corpus = Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "good morning"}]}
            for _ in range(16)
        ]
    )
    prompts = Dataset.from_list([{"prompt": f"prompt #{i}"} for i in range(8)])
    trainer = CADETTrainer(
        model=build_llama(tokenizer),
        oracle_funcs=prompt_oracle,
        args=args,
        train_dataset=corpus,
        processing_class=tokenizer,
        prompt_dataset=prompts,
        callbacks=[Record()],
    )
    rank = trainer.accelerator.process_index
    shares = {r: trainer._round_prompts(r)[0] for r in range(2)}
    before = digest(p for _, p in sorted(trainer.model.named_parameters()))
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    trainer.accelerator.wait_for_everyone()
    training_calls = list(calls)
    fsdp = fsdp2_checks(trainer, tokenizer, prompt_oracle)
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "shares": shares,
        "oracle_calls": training_calls,
        "records": records,
        "logged_satisfaction": [
            e["oracle/satisfaction"] for e in trainer.state.log_history if "oracle/satisfaction" in e
        ],
        "logged_dropped": [e["oracle/dropped"] for e in trainer.state.log_history if "oracle/dropped" in e],
        "omega_scales": [e["cadet/omega_scale"] for e in trainer.state.log_history if "cadet/omega_scale" in e],
        "lm_before": before,
        "lm_after": digest(p for _, p in sorted(trainer.accelerator.unwrap_model(trainer.model).named_parameters())),
        "written": sorted(set(written)),
        "fsdp2": fsdp,
    }
    result["filter"] = filter_checks(tokenizer, output_dir, settings)
    # Last: a further trainer resets the accelerator state the first one uses
    try:
        CADETTrainer(
            model=build_llama(tokenizer),
            oracle_funcs=prompt_oracle,
            args=tiny_cadet_config(output_dir, **settings, round_schedule="parallel"),
            train_dataset=corpus,
            processing_class=tokenizer,
        )
        result["parallel_error"] = None
    except ValueError as error:
        result["parallel_error"] = str(error)
    with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
