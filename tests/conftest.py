"""Shared fixtures: the tiny Llama and its real byte-level BPE tokenizer (built by `benchmarks/tiny_llama.py`, which the
benchmarks' `--model tiny` runs use too), and a `CADETConfig` sized for them."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_llama import build_llama, build_tokenizer, save_tiny_llama  # noqa: E402


def tiny_cadet_config(output_dir, **overrides):
    """A `CADETConfig` sized for the tiny Llama on CPU (2 rounds of 2 steps, a few short samples per round)."""
    from trl_cadet import CADETConfig

    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        max_steps=4,
        steps_per_round=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        prompts_per_round=4,
        num_generations=2,
        max_completion_length=8,
        generation_batch_size=8,
        nado_batch_size=4,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return CADETConfig(**values)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_llama(tokenizer):
    return build_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """Tiny models run fastest on one thread: more only adds synchronisation, and CI's two cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
