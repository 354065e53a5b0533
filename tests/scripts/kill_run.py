"""A small CADET run for tests/test_reliability.py to kill with SIGKILL and then resume in a new process.

Usage:
    python tests/scripts/kill_run.py OUTPUT_DIR {oracle,save,resume}

`oracle`: the oracle of the third oracle phase (after checkpoint-4) writes OUTPUT_DIR/../marker and sleeps.
`save`: the save of checkpoint-4 writes the marker and sleeps when it reaches the NADO optimiser state, so the
checkpoint is half written. `resume`: `train(resume_from_checkpoint=True)` to the end; writes OUTPUT_DIR/../result.json.
"""

import json
import os
import sys
import time


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


def main(output_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    marker = os.path.join(os.path.dirname(output_dir), "marker")
    calls = []

    def oracle(prompts, completions, **kwargs):
        calls.append(len(completions))
        if mode == "oracle" and len(calls) == 3:
            open(marker, "w").close()
            time.sleep(600)
        return [0.0 if "idiot" in c else 1.0 for c in completions]

    if mode == "save":
        real_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            if isinstance(f, str) and f.endswith("nado_optimizer.pt") and "checkpoint-4" in f:
                open(marker, "w").close()
                time.sleep(600)
            return real_save(obj, f, *args, **kwargs)

        torch.save = slow_save

    steps_run = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps_run.append(state.global_step)

    tokenizer = build_tokenizer()
    args = tiny_cadet_config(
        output_dir,
        max_steps=6,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=2,
        prompts_per_round=2,
        max_completion_length=6,
        nado_corpus_samples=0,  # the oracle's calls are the phases' only
    )
    corpus = Dataset.from_list([{"text": f"hello there, you are number {i}"} for i in range(16)])
    trainer = CADETTrainer(
        model=build_llama(tokenizer),
        oracle_funcs=oracle,
        args=args,
        train_dataset=corpus,
        processing_class=tokenizer,
        callbacks=[Record()],
    )
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    result = {"global_step": trainer.state.global_step, "steps_run": steps_run, "round": trainer.current_round}
    with open(os.path.join(os.path.dirname(output_dir), "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
