"""Shared fixtures: a real byte-level BPE tokenizer trained in a fraction of a second and tiny models from config."""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TRAINING_TEXT = [
    "hello there, how are you today? i am fine, thank you for asking.",
    "the weather is lovely and the sun is shining over the quiet town.",
    "what is your favourite book? i like stories about ships and the sea.",
    "you are an idiot and i hate you, shut up you stupid fool.",
    "can you help me with my homework? sure, what is the question?",
    "good morning! let us talk about music, films and friendly things.",
] * 4


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


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


def save_tiny_llama(path: str) -> str:
    """The tiny Llama of `build_llama` and its tokenizer saved to `path` (once: a saved model is reused), for the code
    paths that take a model path, the benchmarks' tiny rows included."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        tokenizer = build_tokenizer()
        build_llama(tokenizer).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


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
